"""The pair-graph folds: ``sum_ij M_ij g_i g_j`` terms of per-sample quantities, for every backend.

Every structure of the signed pairwise GGN is a sum over back-propagated columns ``r`` of
``sum_ij M_ij g_ri g_rj^T`` terms, with ``M`` one of the three matrices of a
:class:`~laplace_metric.pairs.PairGraph` (the graph ``A``, the Kronecker input graph ``C`` or
the output graph ``A+``). Only the connected components of ``M`` couple samples, and each
component folds in one of two forms, chosen once per matrix (:func:`fold_plan`, cached on the
graph):

* **uniform** (``a I + b 1 1^T``: every class of a ``positives`` graph, the input graph of
  equal pairs, the one-sample components): ``a sum_i g_i g_i^T + b s s^T`` with
  ``s = sum_i g_i``, one weighted product over all samples plus one over the component sums;
* **bucketed** (any other component): components grouped by size (padded to a power of two)
  and folded as batched products ``G^T M_c G``.

Both forms are centred where a component's rows sum to zero (a Laplacian): the fold is then
unchanged by subtracting the component's mean gradient, and the folds subtract it, so the
float32 rounding error is relative to the spread of the gradients, not to their size (the
uncentred sums cancel when the gradients of a class cluster). :func:`fold_linear` folds a
weight used once per sample from its output columns and inputs without per-sample gradients.
"""

from __future__ import annotations

import torch

from laplace_metric.curvature.fold_plan import Bucket, FoldPlan, component_buckets, fold_plan
from laplace_metric.pairs.graph import PairGraph

#: Elements of one intermediate tensor formed by the folds (bounds their peak memory).
FOLD_CHUNK_ELEMENTS = 2**24

#: Components of at most this many samples form ``K_ij`` of :func:`fold_linear` edge by edge
#: (elementwise), larger ones by batched Gram matrices (measured: pairs of a 64-pair batch
#: spent most of a fit in the transposed copy and tiny matrix products of the batched form).
SMALL_COMPONENT = 4


def _row_chunks(n: int, per_row: int) -> list[slice]:
    step = max(1, FOLD_CHUNK_ELEMENTS // max(per_row, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _bucket_rows(grads: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """Per-sample rows ``[R, C, k, F]`` of a bucket, centred per component if allowed."""
    n_comp, k = bucket.index.shape
    if bucket.whole_batch(grads.shape[1]):  # one component of every sample, in order
        rows = grads.unsqueeze(1)
    else:
        rows = grads.index_select(1, bucket.index.flatten()).view(grads.shape[0], n_comp, k, -1)
    if bucket.padded:
        mask = bucket.mask.to(grads.dtype)[:, :, None]
        if bucket.centred:
            rows = rows - (rows * mask).sum(2, keepdim=True) / mask.sum(1, keepdim=True)
        return rows * mask
    if bucket.centred:
        rows = rows - rows.mean(2, keepdim=True)
    return rows


def _closed_form(
    flat: torch.Tensor, plan: FoldPlan
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The closed form's share of ``flat [R, B, F]``: its rows ``[R, n, F]`` (centred where
    their uniform component folds centred; ``flat`` itself if nothing is selected or centred),
    their weights ``a`` (``None`` if all are zero) and the per-component sums
    ``[R, n_uniform + 1, F]`` (``None`` without uniform components; one ``index_add_``,
    measured faster than the product with the membership matrix at every component count)."""
    own = plan.own
    if own is not None and not len(own):
        return None, None, None
    rows = flat if own is None else flat.index_select(1, own)
    labels = plan.labels if own is None else plan.labels[own]
    weights = (plan.weights if own is None else plan.weights[own]).to(flat.dtype)
    weights = weights if plan.weighted else None
    if not plan.n_uniform:
        return rows, weights, None
    sums = rows.new_zeros(rows.shape[0], len(plan.offsets), rows.shape[2])
    sums.index_add_(1, labels, rows)
    if plan.centred and weights is not None:
        means = sums * plan.inverse_sizes.to(flat.dtype)[None, :, None]
        rows = means.index_select(1, labels).neg_().add_(rows)
    return rows, weights, sums


def fold_diag(
    grads: torch.Tensor, graph: PairGraph, matrix: str | torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_r sum_ij M_ij g_ri * g_rj`` from per-sample gradients ``[R, B, *shape]``.

    Parameters
    ----------
    grads : torch.Tensor
        ``[R, B, *shape]``.
    graph : PairGraph
    matrix : str or torch.Tensor, optional
        ``M``: a matrix of the graph by name or itself (default ``graph.matrix``).

    Returns
    -------
    diagonal : torch.Tensor
        ``shape``.
    """
    plan = fold_plan(graph, matrix)
    flat = grads.flatten(start_dim=2)
    dtype = flat.dtype
    rows, weights, sums = _closed_form(flat, plan)
    if weights is None:
        result = flat.new_zeros(flat.shape[2])
    else:
        squares = rows.square() if rows is flat else rows.square_()
        result = weights @ squares.sum(dim=0)
        del squares, rows
    if sums is not None:
        result += plan.offsets.to(dtype) @ sums.square_().sum(dim=0)
    n_cols, _, n_params = flat.shape
    for bucket in plan.general:
        n_comp, k = bucket.index.shape
        block = bucket.block.to(dtype)
        for params in _row_chunks(n_params, n_cols * n_comp * k):
            rows = _bucket_rows(flat[..., params], bucket)
            result[params] += (rows * (block @ rows)).sum(dim=(0, 1, 2))
    return result.reshape(grads.shape[2:])


def fold_linear(
    q: torch.Tensor, x: torch.Tensor, graph: PairGraph
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonals of a weight used once per sample (``g_ri = q_ri x_i^T``) and of its bias.

    ``sum_ij A_ij K_ij[o] x_i[n] x_j[n]`` with ``K_ij[o] = sum_r q_ri[o] q_rj[o]``, from
    ``q [R, B, out]`` and ``x [B, in]``, without forming per-sample gradients. The diagonal of
    ``A`` costs what stock BackPACK's ``DiagGGNExact`` does; the ``E`` edges ``i < j`` add
    ``k^2 out R`` per component of ``k`` samples (batched ``K``) and one ``(out x E) @ (E x in)``
    matrix product.

    Returns
    -------
    weight : torch.Tensor
        ``(out, in)``.
    bias : torch.Tensor
        ``(out,)``, the same sum with ``x = 1``.
    """
    diag_weights = graph.matrix.diagonal().to(q.dtype)
    diagonal = diag_weights[:, None] * q.square().sum(0)  # [B, out]
    weight = diagonal.T @ x.square()
    bias = diagonal.sum(0)
    buckets = fold_plan(graph).buckets  # edges i < j: the diagonal plays no part
    if not buckets:
        return weight, bias
    q_t = None
    for bucket in buckets:
        flat_edges, first, second, weights = bucket.edges()
        if len(weights) == 0:
            continue
        slices = bucket.edge_slices()
        if bucket.index.shape[1] <= SMALL_COMPONENT:
            kernel = _edge_kernel(q, (first, second), slices, weights)
        else:
            if q_t is None:  # [out, B, R]: bmm is slow on strided operands
                q_t = q.permute(2, 1, 0).contiguous()
            kernel = _bucket_kernel(q_t, bucket, flat_edges, weights)
        bias += kernel.sum(1)
        for part in _row_chunks(len(weights), x.shape[1]):
            products = _rows(x, 0, first, slices[0], part) * _rows(x, 0, second, slices[1], part)
            weight += kernel[:, part] @ products  # one (out x E) @ (E x in) product
    return weight, bias


def _rows(
    t: torch.Tensor, dim: int, index: torch.Tensor, progression: slice | None, part: slice
) -> torch.Tensor:
    """``t.index_select(dim, index[part])``, as a strided view where ``index`` is the
    ``progression``."""
    if progression is None:
        return t.index_select(dim, index[part])
    step = progression.step
    start, stop = progression.start + step * part.start, progression.start + step * part.stop
    return t[(slice(None),) * dim + (slice(start, stop, step),)]


def _edge_kernel(
    q: torch.Tensor,
    edges: tuple[torch.Tensor, torch.Tensor],
    slices: tuple[slice | None, slice | None],
    weights: torch.Tensor,
) -> torch.Tensor:
    """``2 A_ij K_ij[o]`` per edge, ``(out, E)``, from ``q [R, B, out]`` edge by edge
    (``slices``: the edges' samples as strided views where they are progressions)."""
    first, second = edges
    kernel = q.new_empty(len(weights), q.shape[2])
    for part in _row_chunks(len(weights), q.shape[0] * q.shape[2]):
        pairs = _rows(q, 1, first, slices[0], part) * _rows(q, 1, second, slices[1], part)
        kernel[part] = pairs.sum(0) * weights[part].to(q.dtype)[:, None]
    return kernel.T


def _bucket_kernel(
    q_t: torch.Tensor, bucket: Bucket, flat_edges: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``2 A_ij K_ij[o]`` per edge, ``(out, E)``, from ``q_t [out, B, R]`` by batched Grams."""
    n_out = q_t.shape[0]
    n_comp, k = bucket.index.shape
    rows_all = q_t.index_select(1, bucket.index.flatten()).view(n_out, n_comp, k, -1)
    kernel = q_t.new_empty(n_out, len(weights))
    for outs in _row_chunks(n_out, n_comp * k * k):
        rows = rows_all[outs]
        gram = (rows @ rows.transpose(-1, -2)).flatten(start_dim=1)  # [o, C k k]
        kernel[outs] = gram.index_select(1, flat_edges) * weights.to(q_t.dtype)
    return kernel


def fold_gram(
    grads: torch.Tensor,
    graph: PairGraph,
    matrix: str | torch.Tensor | None = None,
    n_params: int | None = None,
) -> torch.Tensor:
    """``sum_r G_r^T M G_r`` from per-sample gradients ``[R, B, F]``, shape ``(P, P)``.

    Parameters
    ----------
    grads : torch.Tensor
        ``[R, B, F]``; with ``n_params`` given, ``F = T * P`` holds ``T`` locations of ``P``
        values each, and the locations are summed over like the columns.
    graph : PairGraph
    matrix : str or torch.Tensor, optional
        ``M``: a matrix of the graph by name (``'matrix'``, ``'input_matrix'``,
        ``'output_matrix'``) or itself (default ``graph.matrix``), or another matrix with the
        graph's block pattern.
    n_params : int, optional
        ``P`` (default: all of ``F``).
    """
    plan = fold_plan(graph, matrix)
    n_cols, _, n_features = grads.shape
    n_params = n_features if n_params is None else n_params
    dtype = grads.dtype
    rows, weights, sums = _closed_form(grads, plan)
    if weights is None:
        result = grads.new_zeros(n_params, n_params)
    else:
        weights = weights[None, :, None].expand(n_cols, rows.shape[1], n_features // n_params)
        flat = rows.reshape(-1, n_params)
        result = (flat * weights.reshape(-1, 1)).T @ flat
        del rows, flat
    if sums is not None:
        scaled = sums * plan.offsets.to(dtype)[None, :, None]
        result += scaled.reshape(-1, n_params).T @ sums.reshape(-1, n_params)
    for bucket in plan.general:
        rows = _bucket_rows(grads, bucket)
        mixed = bucket.block.to(dtype) @ rows
        result += rows.reshape(-1, n_params).T @ mixed.reshape(-1, n_params)
    return result


def fold_output_factor(q: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """Kronecker output factor ``sum_{r,t} Q_rt^T A+ Q_rt`` from ``q [R, B, T, out]``."""
    n_cols, batch, _, n_out = q.shape
    return fold_gram(q.reshape(n_cols, batch, -1), graph, "output_matrix", n_params=n_out)


def fold_input_factor(x: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """Unnormalised Kronecker input factor ``sum_t X_t^T C X_t / T`` from ``x [B, T, in]``."""
    batch, n_locations, n_in = x.shape
    flat = x.reshape(1, batch, -1)
    return fold_gram(flat, graph, "input_matrix", n_params=n_in) / n_locations


__all__ = [
    "FOLD_CHUNK_ELEMENTS",
    "SMALL_COMPONENT",
    "Bucket",
    "FoldPlan",
    "component_buckets",
    "fold_diag",
    "fold_gram",
    "fold_input_factor",
    "fold_linear",
    "fold_output_factor",
    "fold_plan",
]
