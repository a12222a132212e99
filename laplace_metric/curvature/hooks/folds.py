"""Vectorised pair-graph folds (exact equivalents of :mod:`laplace_metric.curvature.graph`).

Mining produces structured graphs: all pairs inside a class with equal weights give a block
``a I + b 1 1^T`` per connected component (``positives``; the signless Laplacian and the
input graph likewise). For those, ``sum_ij M_ij g_i g_j^T = a sum_i g_i g_i^T + b s s^T`` with
``s = sum_i g_i``: one weighted product over all samples plus one over the component sums,
instead of a gather and two products per component. Other components use the general form.

Where a component's rows sum to zero (a Laplacian: ``a = -k b``), the two terms cancel in
float32 when the component's gradients cluster; there the fold uses the equal, centred form
``a sum_i (g_i - mean g)^2`` (as :mod:`~laplace_metric.curvature.graph` does), so the rounding
error is relative to the spread of the gradients, not to their size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from laplace_metric.curvature.graph import FOLD_CHUNK_ELEMENTS, PairGraph


@dataclass
class Structure:
    """A symmetric ``B x B`` matrix with the block pattern of a pair graph, split for folding.

    Attributes
    ----------
    weights : torch.Tensor
        ``(B,)``: ``a`` of the sample's uniform component, ``M_ii`` of a singleton, 0 otherwise.
    labels : torch.LongTensor
        ``(B,)``: index of the sample's uniform component, or ``n_uniform`` (a dump slot).
    offsets : torch.Tensor
        ``(n_uniform + 1,)``: ``b`` per uniform component (0 for the dump slot).
    inverse_sizes : torch.Tensor
        ``(n_uniform + 1,)``: ``1 / k`` per uniform component whose rows sum to zero (folded in
        the centred form), 0 for the others and the dump slot.
    general : list of (torch.LongTensor, torch.Tensor)
        Index and block of every other component.
    centred : bool
        Whether any uniform component is folded in the centred form.
    """

    weights: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    inverse_sizes: torch.Tensor
    general: list[tuple[torch.Tensor, torch.Tensor]]
    centred: bool


def structure(graph: PairGraph, which: str = "matrix") -> Structure:
    """The fold structure of ``graph.<which>`` (cached on the graph)."""
    cache = graph.__dict__.setdefault("_hook_structures", {})
    if which in cache:
        return cache[which]
    matrix = getattr(graph, which)
    singletons, _, components = graph.blocks()
    batch = matrix.shape[0]
    weights = matrix.new_zeros(batch)
    weights[singletons] = matrix.diagonal()[singletons]
    offsets, inverse_sizes, general, uniform = [], [], [], []
    scale = float(matrix.abs().amax().clamp_min(torch.finfo(matrix.dtype).tiny))
    for index in components:
        block = matrix[index][:, index]
        off, diag = block[0, 1], block[0, 0]
        pattern = torch.full_like(block, float(off))
        pattern.diagonal().fill_(float(diag))
        if torch.equal(block, pattern):
            uniform.append(index)
            weights[index] = diag - off
            zero_rows = abs(float(diag) + (len(index) - 1) * float(off)) <= 1e-12 * scale
            offsets.append(0.0 if zero_rows else float(off))
            inverse_sizes.append(1.0 / len(index) if zero_rows else 0.0)
        else:
            general.append((index, block))
    labels = torch.full((batch,), len(offsets), dtype=torch.long, device=matrix.device)
    for label, index in enumerate(uniform):
        labels[index] = label

    def as_tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values + [0.0], dtype=matrix.dtype, device=matrix.device)

    result = Structure(
        weights,
        labels,
        as_tensor(offsets),
        as_tensor(inverse_sizes),
        general,
        centred=any(v > 0 for v in inverse_sizes),
    )
    cache[which] = result
    return result


def _sums(flat: torch.Tensor, struct: Structure) -> torch.Tensor:
    """Per uniform component sums ``[R, n_uniform + 1, P]`` of ``flat [R, B, P]`` (a product
    with the ``(n_uniform + 1) x B`` membership matrix: a GEMM, unlike a scatter)."""
    member = torch.zeros(len(struct.offsets), flat.shape[1], dtype=flat.dtype, device=flat.device)
    member[struct.labels, torch.arange(flat.shape[1], device=flat.device)] = 1.0
    return member @ flat


def _centred(flat: torch.Tensor, sums: torch.Tensor, struct: Structure) -> torch.Tensor:
    """``flat [R, B, P]`` minus its component mean where the component folds centred."""
    means = sums * struct.inverse_sizes.to(flat.dtype)[None, :, None]
    return means.index_select(1, struct.labels).neg_().add_(flat)


def fold_diag(grads: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """``sum_r sum_ij A_ij g_ri * g_rj`` from ``[R, B, *shape]`` (see ``graph.fold_diag``)."""
    struct = structure(graph)
    flat = grads.flatten(start_dim=2)
    dtype = flat.dtype
    sums = _sums(flat, struct) if len(struct.offsets) > 1 else None
    squares = _centred(flat, sums, struct).square_() if struct.centred else flat.square()
    result = struct.weights.to(dtype) @ squares.sum(dim=0)
    del squares
    if sums is not None:
        result += struct.offsets.to(dtype) @ sums.square_().sum(dim=0)
    for index, block in struct.general:
        sub = flat[:, index]
        block = block.to(dtype)
        step = max(1, FOLD_CHUNK_ELEMENTS // max(sub.shape[0] * sub.shape[1], 1))
        for start in range(0, sub.shape[2], step):
            cols = slice(start, start + step)
            piece = sub[:, :, cols]
            result[cols] += (piece * torch.einsum("ij,rjp->rip", block, piece)).sum(dim=(0, 1))
    return result.reshape(grads.shape[2:])


def fold_gram(grads: torch.Tensor, graph: PairGraph, which: str = "matrix") -> torch.Tensor:
    """``sum_r G_r^T M G_r`` from ``[R, B, P]`` with ``M = graph.<which>`` (see
    ``graph.fold_gram``)."""
    struct = structure(graph, which)
    dtype = grads.dtype
    sums = _sums(grads, struct) if len(struct.offsets) > 1 else None
    flat = (_centred(grads, sums, struct) if struct.centred else grads).reshape(-1, grads.shape[2])
    weights = struct.weights.to(dtype).repeat(grads.shape[0])[:, None]
    result = (flat * weights).T @ flat
    if sums is not None:
        scaled = sums * struct.offsets.to(dtype)[None, :, None]
        result += scaled.reshape(-1, grads.shape[2]).T @ sums.reshape(-1, grads.shape[2])
    for index, block in struct.general:
        sub = grads[:, index]
        result += torch.einsum(
            "rip,riq->pq", sub, torch.einsum("ij,rjq->riq", block.to(dtype), sub)
        )
    return result


def fold_output_factor(q: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """Kronecker output factor ``sum_{r,t} Q_rt^T A+ Q_rt`` from ``q [R, B, T, out]``."""
    return fold_gram(q.transpose(1, 2).flatten(end_dim=1), graph, "output_matrix")


def fold_input_factor(x: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """Unnormalised Kronecker input factor ``sum_t X_t^T C X_t / T`` from ``x [B, T, in]``."""
    return fold_gram(x.transpose(0, 1), graph, "input_matrix") / x.shape[1]
