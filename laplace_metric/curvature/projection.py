"""Projection of signed curvature onto the positive semi-definite cone."""

from __future__ import annotations

import torch
from laplace.utils import Kron


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


def normalise_kron(kron: Kron, n_pairs: int) -> Kron:
    """Divide the input-side factor ``A`` of every weight by the number of contributing pairs."""
    scale = 1.0 / max(n_pairs, 1)
    return Kron(
        [
            [f.clone() if i == 0 else f * scale for i, f in enumerate(factors)]
            for factors in kron.kfacs
        ]
    )


def add_curvature(total, batch):
    """Sum two curvature values (tensors or :class:`Kron`) without mutating either."""
    if total is None:
        return batch
    return total + batch
