"""The linearised predictive covariance of the embedding without a ``B x D x P`` Jacobian.

``J Sigma J^T`` is a sum over the posterior's blocks, one per parameter. With the rows of
the per-sample Jacobian back-propagated as columns to every site (gradient ``q`` at the layer
output, input ``x``), a Linear weight on ``(B, in)`` with diagonal variances ``sigma`` gives
``C_i[d, e] = sum_o q_i^d[o] q_i^e[o] (sigma x_i^2)[o]``; with a Kronecker block
``(Q_1 (x) Q_2) diag(1 / (l_1 l_2^T + delta)) (Q_1 (x) Q_2)^T`` (laplace-torch's
``KronDecomposed``) the same holds for the rotated ``q Q_1``, ``x Q_2`` with weights
``1 / (l_1 l_2^T + delta)``. Shared weights form rotated per-sample gradients a block of output
rows at a time; other parameters use their per-sample gradients. The back-propagated columns
are the rows of the embedding's Jacobian (the normalisation's ``(I - z z^T) / ||g||`` per
sample), so no projection follows.

When only the variances (the diagonal) are wanted, every block contributes only
``sum_p w_p G[d, b, p]^2`` and no ``D x D`` product is formed: on weights shared over ``T``
locations this drops the ``D^2 T`` term per output row of the location-Gram form.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from laplace.utils import KronDecomposed

from laplace_metric.curvature.hooks.diag import GRAM_FORMS, GramPolicy
from laplace_metric.curvature.hooks.locations import covariance_costs, gram_covariance
from laplace_metric.curvature.hooks.passes import ColumnPass, row_slices
from laplace_metric.curvature.hooks.sites import SiteKind, weight_grads


def _weighted_gram(
    grads: torch.Tensor, weights: torch.Tensor, diagonal: bool = False
) -> torch.Tensor:
    """``sum_p w_p G[d, b, p] G[e, b, p]``, shape ``(b, D, D)`` (``diagonal``: ``(b, D)``)."""
    flat = grads.flatten(start_dim=2)
    if diagonal:
        return (flat.square() @ weights.flatten()).T
    return torch.einsum("dbp,ebp->bde", flat * weights.flatten(), flat)


def _block_inverse(posterior: KronDecomposed, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Eigenvectors and the inverse eigenvalues of block ``k`` of a ``KronDecomposed``."""
    ls, qs, delta = posterior.eigenvalues[k], posterior.eigenvectors[k], posterior.deltas[k]
    if len(ls) == 1:
        return [qs[0]], 1.0 / (ls[0] + delta)
    l1, l2 = ls
    if posterior.damping:
        root = torch.sqrt(delta)
        return list(qs), 1.0 / torch.outer(l1 + root, l2 + root)
    return list(qs), 1.0 / (torch.outer(l1, l2) + delta)


def predictive_covariance(
    backend: Any,
    x: torch.Tensor,
    posterior: torch.Tensor | KronDecomposed,
    diagonal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance ``J Sigma J^T`` of the linearised predictive of the embedding.

    The same as ``backend.predictive_covariance(x, posterior, diagonal)``.

    Parameters
    ----------
    backend : HookPairGGN
        The backend of the fitted estimator (its model, likelihood and ``last_layer``).
    x : torch.Tensor
        Query inputs ``(B, ...)``.
    posterior : torch.Tensor or laplace.utils.KronDecomposed
        Diagonal posterior variances ``(P,)`` (``DiagLaplace.posterior_variance``), or the
        Kronecker posterior *precision* (``KronLaplace.posterior_precision``), in the order of
        the backend's parameters.
    diagonal : bool, default=False
        Only the variances, without the ``D x D`` products (measured 0.88x the full
        covariance's time on the ViT-Tiny size, ``benchmarks/glm_variances.py``).

    Returns
    -------
    z : torch.Tensor
        Embeddings ``(B, D)`` (normalised if the likelihood normalises).
    covariance : torch.Tensor
        ``(B, D, D)``, or the variances ``(B, D)`` if ``diagonal``.
    """
    return backend.predictive_covariance(x, posterior, diagonal)


def embedding_rows(likelihood: Any, g: torch.Tensor) -> torch.Tensor:
    """The columns ``[D, B, D]`` whose back-propagation gives the rows of the embedding's
    Jacobian: ``(I - z z^T) / ||g||`` per sample if the likelihood normalises, else ``I``."""
    batch, dim = g.shape
    eye = torch.eye(dim, dtype=g.dtype, device=g.device)
    if not likelihood.normalize:
        return eye[:, None, :].expand(dim, batch, dim)
    z = likelihood.embed(g)
    proj = (eye - z[:, :, None] * z[:, None, :]) / g.norm(dim=-1)[:, None, None]
    return proj.transpose(0, 1)  # symmetric per sample: [d, b, :] = row d of sample b


def covariance_chunk(
    column_pass: ColumnPass,
    posterior: torch.Tensor | KronDecomposed,
    policy: GramPolicy,
    diagonal: bool = False,
) -> torch.Tensor:
    """``J Sigma J^T``, ``(b, D, D)``, for one chunk of samples whose pass back-propagated all
    ``D`` rows of the Jacobian; ``diagonal``: ``(b, D)``, never forming a ``D x D`` product."""
    kron = isinstance(posterior, KronDecomposed)
    cov = None
    offset = 0
    for k, (name, param) in enumerate(column_pass.named_params()):
        size = param.numel()
        if kron:
            vecs, weights = _block_inverse(posterior, k)
        else:
            vecs, weights = [], posterior[offset : offset + size].view(param.shape)
        offset += size
        part = _block(column_pass, name, param, vecs, weights, policy, diagonal)
        if part is not None:
            cov = part if cov is None else cov + part
    return cov


def _block(
    column_pass: ColumnPass,
    name: str,
    param: torch.Tensor,
    vecs: list[torch.Tensor],
    weights: torch.Tensor,
    policy: GramPolicy,
    diagonal: bool = False,
) -> torch.Tensor | None:
    calls = column_pass.entries.get(name)
    site = calls[0][0] if calls else None
    is_weight = site is not None and site.kind != SiteKind.AFFINE and name == site.weight
    if not is_weight:
        if name not in column_pass.others and calls is None:
            return None
        grads = column_pass.param_grads(name, param)
        if len(vecs) == 1:
            grads = grads.flatten(start_dim=2) @ vecs[0]
        elif len(vecs) == 2:
            grads = grads.reshape(*grads.shape[:2], vecs[0].shape[0], vecs[1].shape[0])
            grads = torch.einsum("cboi,ou,ij->cbuj", grads, vecs[0], vecs[1])
        return _weighted_gram(grads, weights, diagonal)
    return _weight_block(calls, vecs, weights.reshape(weights.shape[0], -1), policy, diagonal)


def _weight_block(
    calls: list,
    vecs: list[torch.Tensor],
    weights: torch.Tensor,
    policy: GramPolicy,
    diagonal: bool = False,
) -> torch.Tensor:
    """A Linear/Conv weight's ``(b, D, D)`` (``diagonal``: ``(b, D)``), in the eigenbases of
    a Kronecker block if ``vecs``."""
    if vecs:  # rotate into the eigenbases of the two factors
        q1, q2 = vecs
        calls = [
            (replace(s, kind=SiteKind.LINEAR, inputs=s.x @ q2, _unfolded=None), q @ q1)
            for s, q in calls
        ]
    site, q = calls[0]
    if len(calls) == 1 and site.kind == SiteKind.LINEAR and site.n_locations == 1:
        scale = site.x[:, 0].square() @ weights.T  # (b, out)
        if diagonal:
            return torch.einsum("dbo,dbo->bd", q[:, :, 0] * scale, q[:, :, 0])
        return torch.einsum("dbo,ebo->bde", q[:, :, 0] * scale, q[:, :, 0])
    n_cols, n_samples, _, n_out = q.shape
    q = torch.cat([q for _, q in calls], dim=2)
    per_column, gram = covariance_costs(n_cols, q.shape[2], n_out, weights.shape[1], diagonal)
    use_gram = policy.location_gram
    if use_gram in (True, *GRAM_FORMS) or (use_gram is None and gram < per_column):
        x = torch.cat([s.x for s, _ in calls], dim=1)
        return gram_covariance(q, x, weights, policy.max_elements, diagonal)
    total = None
    per_row = n_cols * n_samples * weights.shape[1]
    for rows in row_slices(n_out, per_row, policy.max_elements):
        part = _weighted_gram(weight_grads(calls, rows), weights[rows], diagonal)
        total = part if total is None else total + part
    return total
