"""Projection of signed curvature onto the positive semi-definite cone."""

from __future__ import annotations

import torch
from laplace.utils import Kron, KronDecomposed
from laplace.utils.utils import symeig


def project_psd_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest PSD matrix in Frobenius norm: symmetrise, then clip negative eigenvalues."""
    sym = (matrix + matrix.T) / 2
    eigvals, eigvecs = torch.linalg.eigh(sym)
    return (eigvecs * eigvals.clamp(min=0)) @ eigvecs.T


def project_psd_diag(diag: torch.Tensor) -> torch.Tensor:
    """Clamp a signed diagonal at zero."""
    return diag.clamp(min=0)


def project_psd_kron(kron: Kron) -> Kron:
    """Project every Kronecker factor onto the PSD cone (eigenvalue clipping per factor)."""
    return Kron([[project_psd_matrix(f) for f in factors] for factors in kron.kfacs])


def decompose_psd_kron(kron: Kron, damping: bool = False) -> tuple[Kron, KronDecomposed]:
    """:func:`project_psd_kron` and its eigendecomposition from one ``eigh`` per factor.

    ``project_psd_kron(kron).decompose()`` eigendecomposes every factor twice (once to clip,
    once to decompose the clipped factor); the clipped factor's eigenvectors and eigenvalues
    are those of the first decomposition, so they are reused (laplace-torch's ``symeig``: the
    same jitter fallback and clipping at zero).

    Returns
    -------
    projected : laplace.utils.Kron
        The PSD-projected factors (``H_facs``).
    decomposed : laplace.utils.KronDecomposed
        Their eigendecomposition (``H``).
    """
    projected, eigvecs, eigvals = [], [], []
    for factors in kron.kfacs:
        fs, qs, ls = [], [], []
        for f in factors:
            if f.ndim > 1:
                values, vectors = symeig((f + f.T) / 2)
                fs.append((vectors * values) @ vectors.T)
            else:
                values = f.clamp(min=0)
                vectors = torch.eye(len(f), dtype=f.dtype, device=f.device)
                fs.append(values)
            qs.append(vectors)
            ls.append(values)
        projected.append(fs)
        eigvecs.append(qs)
        eigvals.append(ls)
    return Kron(projected), KronDecomposed(eigvecs, eigvals, damping=damping)


def normalise_kron(kron: Kron, n_pairs: int) -> Kron:
    """Divide the input-side factor ``A`` of every weight by the number of contributing pairs."""
    scale = 1.0 / max(n_pairs, 1)
    return Kron(
        [
            [(f if i == 0 else f * scale).contiguous().clone() for i, f in enumerate(factors)]
            for factors in kron.kfacs
        ]
    )


def add_curvature(total, batch):
    """Sum two curvature values (tensors or :class:`Kron`) without mutating either."""
    if total is None:
        return batch
    return total + batch
