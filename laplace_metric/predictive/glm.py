"""The GLM (linearised) predictive, in chunks whose working memory fits the budget.

Queries are processed in chunks (:func:`glm_chunks`) whose working memory fits the
estimator's ``memory_budget``. For a last-layer posterior over an ``nn.Linear`` head,
``J Sigma J^T`` is computed from the head's input features ``phi`` without forming the
``D x P`` Jacobian: the raw output's Jacobian is ``J_i = (I_D (x) phi_i^T | I_D)`` (weight
then bias), so

- diag: ``(J Sigma J^T)[d, d] = sum_n sigma_W[d, n] phi[n]^2 + sigma_b[d]``;
- kron (precision eigendecomposed as ``(Q_1 (x) Q_2) diag(w^-1) (Q_1 (x) Q_2)^T``, output
  factor first): ``Q_1 diag(w @ (Q_2^T phi)^2) Q_1^T`` plus the bias block, exact for any
  prior or damping;
- full (``Sigma = S S^T``): ``(J S)(J S)^T`` with ``J S = sum_n phi[n] S[(., n), :] + S_b``,
  never forming ``J``.

The normalisation Jacobian ``(I - z z^T) / ||g||`` is applied to the ``D x D`` result.
All-layer diag and kron posteriors go layer by layer (:func:`layer_predictor`: the backend's
own ``predictive_covariance``, or a :class:`~laplace_metric.curvature.HookPairGGN` over the
same model when the fit used BackPACK, ASDL or the reference); every other posterior, and
models the hook backend does not support, use the backend's ``(B, D, P)`` Jacobians.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from laplace.utils.enums import HessianStructure, SubsetOfWeights
from torch import nn

from laplace_metric.memory import check_fits, chunk_size, dtype_bytes, split
from laplace_metric.predictive.layer_path import (
    layer_path_bytes,
    layer_posterior,
    layer_predictor,
    uses_layer_path,
)
from laplace_metric.predictive.view import PredictiveView, as_view

#: Working copies of a ``D x P`` Jacobian per query on the Jacobian path (raw, normalised,
#: parameter selection / posterior product).
JACOBIAN_COPIES = 4
#: Extra copies that laplace-torch's Kronecker ``inv_square_form`` makes of the Jacobians.
KRON_JACOBIAN_COPIES = 3


def linear_head(la: PredictiveView) -> nn.Linear | None:
    """The last layer of a last-layer posterior when it is an ``nn.Linear``, else ``None``."""
    la = as_view(la)
    if not la.last_layer:
        return None
    last = la.model.last_layer
    return last if type(last) is nn.Linear else None


def _jacobian_params(la: PredictiveView) -> int:
    """Columns of the Jacobians the backend computes (before any subnetwork selection)."""
    if la.last_layer:
        return int(la.n_params)
    return sum(p.numel() for p in la.params)


def glm_bytes_per_query(la: PredictiveView, structured: bool) -> int:
    """Working memory of the GLM predictive for one query."""
    la = as_view(la)
    itemsize = dtype_bytes(la.dtype)
    D = int(la.n_outputs)
    if structured:
        head = la.model.last_layer
        n_in = head.in_features
        if la.structure == HessianStructure.FULL:
            return (2 * D * int(la.n_params) + 4 * D * D + 3 * n_in) * itemsize
        return (3 * n_in + 2 * D * n_in + 6 * D * D) * itemsize
    copies = JACOBIAN_COPIES + (
        KRON_JACOBIAN_COPIES if la.structure == HessianStructure.KRON else 0
    )
    return (copies * D * _jacobian_params(la) + 4 * D * D) * itemsize


def _jacobian_alternatives(la: PredictiveView) -> list[str]:
    options = ["pred_type='nn' (weight samples, no Jacobians)"]
    if la.subset == SubsetOfWeights.ALL:
        options.append("subset_of_weights='last_layer'")
    return options


def _project(cov: torch.Tensor, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``P cov P`` with ``P = (I - z z^T) / ||g||`` per input, for ``cov`` ``(B, D, D)``."""
    cz = cov @ z[:, :, None]  # (B, D, 1)
    zc = z[:, None, :] @ cov  # (B, 1, D)
    zcz = (zc @ z[:, :, None])[:, :, :1]  # (B, 1, 1)
    out = cov - z[:, :, None] * zc - cz * z[:, None, :] + z[:, :, None] * zcz * z[:, None, :]
    norms = g.norm(dim=-1)
    return out / (norms**2)[:, None, None]


def _project_joint(cov: torch.Tensor, g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``P_i cov[i, :, j, :] P_j`` for a joint covariance ``(B, D, B, D)``."""
    B, D = z.shape
    eye = torch.eye(D, dtype=z.dtype, device=z.device)
    proj = (eye - z[:, :, None] * z[:, None, :]) / g.norm(dim=-1)[:, None, None]  # (B, D, D)
    return torch.einsum("ida,iajb,jeb->idje", proj, cov, proj)


def kron_inverse_weights(
    ls: list[torch.Tensor], delta: torch.Tensor, damping: bool
) -> torch.Tensor:
    """Inverse eigenvalues of one Kronecker block of a ``KronDecomposed`` posterior precision
    (its eigenvalues ``ls``, prior ``delta`` and damping convention)."""
    if len(ls) == 1:
        return 1 / (ls[0] + delta)
    l1, l2 = ls
    if damping:
        return 1 / torch.outer(l1 + delta.sqrt(), l2 + delta.sqrt())
    return 1 / (torch.outer(l1, l2) + delta)


def _structured_raw_covariance(la: PredictiveView, phi: torch.Tensor, joint: bool) -> torch.Tensor:
    """``J Sigma J^T`` of the raw head output from features ``phi`` ``(B, N)``.

    Returns ``(B, D, D)``, or ``(B, D, B, D)`` when ``joint``.
    """
    head = la.model.last_layer
    D, N = head.out_features, head.in_features
    n_weight = D * N
    has_bias = head.bias is not None
    structure = la.structure
    if structure == HessianStructure.DIAG:
        var = la.posterior_variance
        var_w = var[:n_weight].reshape(D, N)
        if joint:
            c = torch.einsum("in,dn,jn->ijd", phi, var_w, phi)
            if has_bias:
                c = c + var[n_weight:]
            eye = torch.eye(D, dtype=phi.dtype, device=phi.device)
            return c[:, :, :, None].transpose(1, 2) * eye[None, :, None, :]
        diag = phi.square() @ var_w.T
        if has_bias:
            diag = diag + var[n_weight:]
        return torch.diag_embed(diag)
    if structure == HessianStructure.KRON:
        precision = la.posterior_precision
        Q1, Q2 = precision.eigenvectors[0]
        w = kron_inverse_weights(precision.eigenvalues[0], precision.deltas[0], precision.damping)
        psi = phi @ Q2  # (B, N)
        if joint:
            s = torch.einsum("kl,il,jl->ijk", w, psi, psi)
            cov = torch.einsum("dk,ijk,ek->idje", Q1, s, Q1)
        else:
            s = psi.square() @ w.T  # (B, D)
            cov = (Q1[None] * s[:, None, :]) @ Q1.T
        if has_bias:
            Qb = precision.eigenvectors[1][0]
            wb = kron_inverse_weights(
                precision.eigenvalues[1], precision.deltas[1], precision.damping
            )
            bias = (Qb * wb) @ Qb.T
            if joint:
                cov = cov + bias[None, :, None, :]
            else:
                cov = cov + bias
        return cov
    scale = la.posterior_scale  # (P, P), Sigma = S S^T
    js = torch.einsum("bn,dnp->bdp", phi, scale[:n_weight].reshape(D, N, -1))
    if has_bias:
        js = js + scale[n_weight:]
    if joint:
        flat = js.reshape(-1, js.shape[-1])
        return (flat @ flat.T).reshape(len(phi), D, len(phi), D)
    return js @ js.transpose(-1, -2)


def structured_glm(
    la: PredictiveView, x: torch.Tensor, joint: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM predictive of a last-layer ``nn.Linear`` posterior from the head's features.

    Returns the embedding mean ``(B, D)`` and covariance ``(B, D, D)`` (``joint``: the mean
    flattened to ``(B*D,)`` and the covariance ``(B*D, B*D)``).
    """
    la = as_view(la)
    g, phi = la.model.forward_with_features(x)
    if phi.ndim != 2:
        raise ValueError("structured_glm needs (batch, features) inputs to the last layer.")
    cov = _structured_raw_covariance(la, phi, joint)
    z = la.likelihood.embed(g)
    if la.likelihood.normalize:
        cov = _project_joint(cov, g, z) if joint else _project(cov, g, z)
    if joint:
        B, D = z.shape
        return z.flatten(), cov.reshape(B * D, B * D)
    return z, cov


def _uses_structured_path(la: PredictiveView, x: torch.Tensor) -> bool:
    la = as_view(la)
    return linear_head(la) is not None and isinstance(x, torch.Tensor)


def jacobian_glm(
    la: PredictiveView, x: torch.Tensor, joint: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM predictive from the backend's ``(B, D, P)`` Jacobians (any posterior)."""
    la = as_view(la)
    Js, f_mu = la.backend.jacobians(x, enable_backprop=la.enable_backprop)
    if joint:
        return f_mu.flatten(), la.functional_covariance(Js)
    return f_mu, la.functional_variance(Js)


def _weighted_square_sum(Js: torch.Tensor, weights: torch.Tensor, block: int = 8192):
    """``sum_p Js[..., p]^2 weights[p]`` over cache-sized column blocks (3x faster than one
    ``Js.square() @ weights`` on a 128 x 300k Jacobian, measured; no full-size copy)."""
    out = torch.zeros(Js.shape[:-1], dtype=Js.dtype, device=Js.device)
    for start in range(0, Js.shape[-1], block):
        out = out + Js[..., start : start + block].square() @ weights[start : start + block]
    return out


def jacobian_glm_diagonal(la: PredictiveView, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension GLM variances ``(B, D)`` from the Jacobians, never forming ``D x D``.

    ``O(B D P)`` for a diagonal posterior (``sum_p J[d, p]^2 sigma_p``) and after one
    Kronecker-factored product for ``kron``; dense posteriors square ``J S``.
    """
    la = as_view(la)
    Js, f_mu = la.backend.jacobians(x, enable_backprop=la.enable_backprop)
    if la.structure == HessianStructure.DIAG:
        var = _weighted_square_sum(Js, la.posterior_variance)
    elif la.structure == HessianStructure.KRON:
        var = (Js * la.posterior_precision.bmm(Js, exponent=-1)).sum(-1)
    else:
        var = (Js @ la.posterior_scale).square().sum(-1)
    return f_mu, var


def _glm_one(
    la, x: torch.Tensor, joint: bool, diagonal_output: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    la = as_view(la)
    if _uses_structured_path(la, x):
        with torch.set_grad_enabled(la.enable_backprop):
            mean, cov = structured_glm(la, x, joint)
    elif uses_layer_path(la, x, joint):
        posterior = layer_posterior(la)
        predictor = layer_predictor(la)
        if diagonal_output:  # the variances alone, without the D x D products
            return predictor.predictive_covariance(x, posterior, diagonal=True)
        mean, cov = predictor.predictive_covariance(x, posterior)
    else:
        with torch.enable_grad():
            if diagonal_output and not joint:
                return jacobian_glm_diagonal(la, x)
            mean, cov = jacobian_glm(la, x, joint)
    if diagonal_output:
        cov = torch.diagonal(cov, dim1=-2, dim2=-1)
    return mean, cov


def glm_chunks(
    la: PredictiveView,
    x: torch.Tensor,
    diagonal_output: bool = False,
    batch_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (non-joint) GLM predictive ``(mean, cov)`` of ``x``, chunk by chunk.

    Each chunk's size is ``batch_size`` if given, else the most queries whose working memory
    (:func:`glm_bytes_per_query`) fits ``la.memory_budget``.

    Raises
    ------
    MemoryBudgetError
        If a single query does not fit the budget.
    """
    la = as_view(la)
    structured = _uses_structured_path(la, x)
    per_query = glm_bytes_per_query(la, structured)
    if not structured and uses_layer_path(la, x):
        per_query, structured = layer_path_bytes(la), True
    budget = la.memory_budget
    if batch_size is None:
        check_fits(
            per_query,
            budget,
            f"The GLM predictive of one query ({la.n_outputs} x {_jacobian_params(la):,} "
            "Jacobian and working copies)"
            if not structured
            else "The GLM predictive of one query",
            _jacobian_alternatives(la),
        )
    size = chunk_size(len(x), per_query, budget, batch_size)
    for chunk in split(x, size):
        mean, cov = _glm_one(la, chunk, joint=False, diagonal_output=diagonal_output)
        if not la.enable_backprop:
            mean, cov = mean.detach(), cov.detach()
        yield mean, cov


def glm_joint(la: PredictiveView, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint GLM predictive ``(B*D,)``, ``(B*D, B*D)``; checked against the budget."""
    la = as_view(la)
    structured = _uses_structured_path(la, x)
    itemsize = dtype_bytes(la.dtype)
    n = len(x) * int(la.n_outputs)
    needed = len(x) * glm_bytes_per_query(la, structured) + 3 * n * n * itemsize
    check_fits(
        needed,
        la.memory_budget,
        f"The joint GLM predictive of {len(x)} queries",
        ["fewer queries", "joint=False (per-query covariances, computed in chunks)"],
    )
    mean, cov = _glm_one(la, x, joint=True)
    if not la.enable_backprop:
        mean, cov = mean.detach(), cov.detach()
    return mean, cov


__all__ = [
    "JACOBIAN_COPIES",
    "KRON_JACOBIAN_COPIES",
    "glm_bytes_per_query",
    "glm_chunks",
    "glm_joint",
    "layer_predictor",
    "jacobian_glm",
    "jacobian_glm_diagonal",
    "linear_head",
    "structured_glm",
]
