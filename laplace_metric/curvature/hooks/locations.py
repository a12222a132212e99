"""Shared weights through location Gram matrices: exact diagonals without per-column gradients.

A weight shared over ``T`` locations (conv positions, tokens) has per-sample gradients
``G_ri = sum_t q_rit x_it^T`` for every back-propagated column ``r``. Forming them costs
``R B T out in`` and streams ``R B out in`` numbers through memory: ``R = D`` times the
parameter count per sample. Both sums the hook backend needs are quadratic in ``G`` and only
need inner products *between locations*:

* the graph-folded diagonal (curvature), with ``n = (i, t)`` running over the locations of the
  samples of one connected component of the pair graph and ``A`` its block::

      sum_r sum_ij A_ij G_ri[o, k] G_rj[o, k]
          = sum_nm A_(n)(m) Kq[o; n, m] x_n[k] x_m[k],   Kq[o; n, m] = sum_r q_rn[o] q_rm[o]

* the linearised predictive ``J Sigma J^T`` of one query with elementwise weights ``sigma``
  (diagonal variances, or the inverse eigenvalues of a Kronecker block in its eigenbasis)::

      C[d, e] = sum_o sum_tt' q_dt[o] M[o; t, t'] q_et'[o],   M[o; t, t'] = sum_k sigma[o, k] x_t[k] x_t'[k]

Their costs grow with ``T^2`` instead of ``R T``: in a ResNet on 32x32 inputs most parameters
sit at 4x4, 2x2 and 1x1 feature maps, where the Gram form is 8-128 times cheaper. The
``*_costs`` functions compare both forms, and the backend takes the cheaper one per weight.
Float32 note: a Laplacian block sums signed terms (``K G_i^2 - G_i G_j``), so the relative
rounding error grows with ``sum_i |G_i|^2 / sum_i |G_i - mean G|^2`` (the per-column form centres
explicitly); float64 is exact to rounding.
"""

from __future__ import annotations

import torch

from laplace_metric.curvature.folds import component_buckets
from laplace_metric.curvature.folds import fold_plan as structure
from laplace_metric.pairs.graph import PairGraph

#: Elementwise passes are memory-bound: one element is charged like this many multiply-adds.
ELEMENTWISE_COST = 8
#: Elements of one intermediate of the elementwise-heavy steps (per-sample gradients and their
#: squares, the input products of a Gram diagonal): chunks of about 4 MiB of float32 stay in
#: cache between the passes over them. On a 2-core CPU (1 thread, ViT in-projection and
#: ResNet-50 3x3 shapes) these steps took half the time they took in chunks of ``2**25``.
CACHE_ELEMENTS = 2**20


def _groups(graph: PairGraph) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(index (C, k), block (C, k, k))`` per bucket of components, singletons as ``k = 1``."""
    singletons, weights, _ = graph.blocks()
    groups = []
    if len(singletons):
        groups.append((singletons[:, None], weights[:, None, None]))
    for bucket in component_buckets(graph, diagonal=True):
        groups.append((bucket.index, bucket.block))
    return groups


def graph_costs(
    graph: PairGraph, n_columns: int, n_locations: int, n_out: int, n_in: int
) -> tuple[float, float, int]:
    """Multiply-adds of the per-column and the Gram form of one shared weight's diagonal.

    Returns
    -------
    per_column : float
    gram : float
    gram_elements : int
        Numbers the Gram form keeps between column chunks.
    """
    batch = graph.n_samples
    per_column = n_columns * batch * n_out * n_in * (n_locations + 3 * ELEMENTWISE_COST)
    squares = triangles = 0
    for index, _ in _groups(graph):
        n = index.shape[1] * n_locations
        squares += index.shape[0] * n * n
        triangles += index.shape[0] * n * (n + 1) // 2
    gram = n_out * (squares * n_columns + triangles * (n_in + ELEMENTWISE_COST))
    return float(per_column), float(gram), n_out * squares


def split_costs(
    graph: PairGraph, n_columns: int, n_locations: int, n_out: int, n_in: int
) -> tuple[float, int] | None:
    """Multiply-adds and kept numbers of :class:`SplitGram` (``None``: the graph has a
    component whose block is not ``a I + b 1 1^T``)."""
    struct = structure(graph)
    if struct.general:
        return None
    batch, t = graph.n_samples, n_locations
    n_sums = len(struct.offsets) - 1
    own = n_out * batch * t * (t * n_columns + (t + 1) // 2 * (n_in + ELEMENTWISE_COST))
    sums = n_columns * n_out * n_in * (batch * t + n_sums * ELEMENTWISE_COST)
    return float(own + sums), n_out * batch * t * t


class GraphGram:
    """Accumulates ``sum_r sum_ij A_ij G_ri * G_rj`` of one shared weight over column chunks.

    Each chunk adds its location Gram matrices ``Kq`` (one rank-``c`` update of
    ``(components x out) x n x n`` numbers); the graph's blocks and the inputs enter once, in
    :meth:`diag`.

    Parameters
    ----------
    graph : PairGraph
    n_locations : int
        ``T``: locations per sample (all calls of the weight together).
    max_elements : int
        Bound on the elements of one intermediate tensor.
    groups : list of (torch.LongTensor, torch.Tensor), optional
        ``(index (C, k), block (C, k, k))`` per group of components (default: the graph's).
    """

    def __init__(
        self,
        graph: PairGraph,
        n_locations: int,
        max_elements: int,
        groups: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.max_elements = max_elements
        self.n_locations = n_locations
        self.groups = _groups(graph) if groups is None else groups
        self.totals: list[torch.Tensor | None] = [None] * len(self.groups)

    def add(self, q: torch.Tensor) -> None:
        """Add the output gradients ``q [c, B, T, out]`` of one chunk of columns."""
        n_cols, _, n_locations, n_out = q.shape
        for g, (index, _) in enumerate(self.groups):
            n_comp, k = index.shape
            n = k * n_locations
            gathered = q.index_select(1, index.flatten()).view(n_cols, n_comp, n, n_out)
            gathered = gathered.permute(1, 3, 2, 0).reshape(n_comp * n_out, n, n_cols)
            if self.totals[g] is None:
                self.totals[g] = q.new_zeros(n_comp * n_out, n, n)
            self.totals[g].baddbmm_(gathered, gathered.transpose(1, 2))

    def diag(self, x: torch.Tensor) -> torch.Tensor:
        """The folded diagonal ``(out, in)`` from the weight's inputs ``x [B, T, in]``."""
        n_in = x.shape[-1]
        result = None
        for (index, block), total in zip(self.groups, self.totals):
            n_comp, k = index.shape
            n = k * self.n_locations
            n_out = total.shape[0] // n_comp
            rows, cols = torch.triu_indices(n, n, device=x.device)
            # the block expanded over locations, on the upper triangle (off-diagonal twice)
            weights = block.to(x.dtype)[:, rows // self.n_locations, cols // self.n_locations]
            weights = weights * torch.where(rows == cols, 1.0, 2.0).to(x.dtype)
            kernel = total.view(n_comp, n_out, n * n)[:, :, rows * n + cols] * weights[:, None]
            inputs = x.index_select(0, index.flatten()).reshape(n_comp, n, n_in)
            if result is None:
                result = x.new_zeros(n_out, n_in)
            step = max(1, min(self.max_elements, CACHE_ELEMENTS) // max(n_comp * n_in, 1))
            for start in range(0, len(rows), step):
                tri = slice(start, start + step)
                products = inputs[:, rows[tri]] * inputs[:, cols[tri]]  # [C, e, in]
                part = kernel[:, :, tri].permute(1, 0, 2).reshape(n_out, -1)  # [out, C e]
                result += part @ products.flatten(end_dim=1)
        return result


class SplitGram:
    """``sum_r sum_ij A_ij G_ri * G_rj`` for graphs whose components are all ``a I + b 1 1^T``.

    Such a component (every class of a ``positives`` graph) folds as
    ``a sum_i sum_r G_ri^2 + b sum_r (sum_i G_ri)^2``. The first term is a
    :class:`GraphGram` of every sample on its own (per-sample location Grams,
    ``B x out x T x T`` numbers kept across column chunks): its cost does not grow with the
    component size ``k``, unlike the ``(k T)^2`` Gram of the whole component. The second term
    is formed per column chunk from the component sums ``S_r = sum_(i, t) q_rit x_it^T``: one
    matrix product over the ``k T`` locations of the component, nothing kept. Like the Gram
    form, the two terms are not centred (see the float32 note above).

    Parameters
    ----------
    graph : PairGraph
    n_locations : int
    max_elements : int
    x : torch.Tensor
        The weight's inputs ``[B, T, in]``.
    """

    def __init__(
        self, graph: PairGraph, n_locations: int, max_elements: int, x: torch.Tensor
    ) -> None:
        struct = structure(graph)
        samples = torch.nonzero(struct.weights).flatten()
        own = [(samples[:, None], struct.weights[samples][:, None, None])] if len(samples) else []
        self.own = GraphGram(graph, n_locations, max_elements, groups=own)
        self.max_elements = max_elements
        self.sums: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        for label in range(len(struct.offsets) - 1):
            index = torch.nonzero(struct.labels == label).flatten()
            offset = float(graph.matrix[index[0], index[1]])
            if offset != 0.0:
                self.sums.append((index, x.index_select(0, index).flatten(end_dim=1), offset))
        self.n_in = x.shape[-1]
        self.result = x.new_zeros(0)

    @property
    def totals(self) -> list[torch.Tensor | None]:
        """The accumulators kept across column chunks."""
        return self.own.totals

    def add(self, q: torch.Tensor) -> None:
        """Add the output gradients ``q [c, B, T, out]`` of one chunk of columns."""
        if self.own.groups:
            self.own.add(q)
        n_cols, n_out = q.shape[0], q.shape[-1]
        if not self.result.numel():
            self.result = q.new_zeros(n_out, self.n_in)
        for index, x, offset in self.sums:
            lhs = q.index_select(1, index).permute(0, 3, 1, 2).reshape(n_cols, n_out, -1)
            step = max(1, self.max_elements // max(n_cols * x.shape[1], 1))
            for start in range(0, n_out, step):
                outs = slice(start, start + step)
                sums = lhs[:, outs].reshape(-1, x.shape[0]) @ x  # [c o, in]
                part = sums.square_().view(n_cols, -1, x.shape[1]).sum(dim=0)
                self.result[outs] += part.mul_(offset)

    def diag(self, x: torch.Tensor) -> torch.Tensor:
        """The folded diagonal ``(out, in)`` from the weight's inputs ``x [B, T, in]``."""
        if not self.own.groups:
            return self.result
        return self.own.diag(x).add_(self.result)


def covariance_costs(
    n_columns: int, n_locations: int, n_out: int, n_in: int, diagonal: bool = False
) -> tuple[int, int]:
    """Multiply-adds per query of the per-column and the Gram form of ``J Sigma J^T`` (of
    its diagonal only, if ``diagonal``)."""
    d, t = n_columns, n_locations
    products = 1 if diagonal else d  # the columns each column is multiplied with
    per_column = d * n_out * n_in * (t + products + ELEMENTWISE_COST)
    gram = n_out * t * t * (n_in + d) + d * products * n_out * t
    return per_column, gram


def gram_covariance(
    q: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, max_elements: int, diagonal: bool = False
) -> torch.Tensor:
    """``C_b[d, e] = sum_{o,k} sigma[o, k] G_bd[o, k] G_be[o, k]`` for ``G_bd = sum_t q x^T``.

    Parameters
    ----------
    q : torch.Tensor
        Output gradients of all ``D`` columns, ``[D, b, T, out]``.
    x : torch.Tensor
        Inputs ``[b, T, in]``.
    sigma : torch.Tensor
        Elementwise weights ``(out, in)``.
    max_elements : int
        Bound on the elements of one intermediate tensor (output rows are chunked).
    diagonal : bool, default=False
        Only ``C_b[d, d]``: the last product costs ``D T`` per output row instead of
        ``D^2 T``.

    Returns
    -------
    covariance : torch.Tensor
        ``(b, D, D)``, or ``(b, D)`` if ``diagonal``.
    """
    n_cols, batch, n_locations, n_out = q.shape
    t2 = n_locations * n_locations
    products = (x[:, :, None, :] * x[:, None, :, :]).reshape(batch, t2, -1)  # [b, T T, in]
    columns = q.permute(1, 3, 0, 2)  # [b, out, D, T]
    result = q.new_zeros(batch, n_cols) if diagonal else q.new_zeros(batch, n_cols, n_cols)
    step = max(1, max_elements // max(batch * (t2 + n_cols * n_locations), 1))
    for start in range(0, n_out, step):
        outs = slice(start, start + step)
        kernel = (products @ sigma[outs].T).transpose(1, 2)  # [b, o, T T]
        kernel = kernel.reshape(batch, -1, n_locations, n_locations)
        side = columns[:, outs]  # [b, o, D, T]
        mixed = side @ kernel  # [b, o, D, T]
        if diagonal:
            result += torch.einsum("bodt,bodt->bd", mixed, side)
        else:
            result += torch.einsum("bodt,boet->bde", mixed, side)
    return result
