"""Fold plans: one matrix of a pair graph split into the two forms of the folds.

A component of the matrix is *uniform* (``a I + b 1 1^T``, folded in closed form from
per-sample and per-component sums) or *general* (folded as a batched ``G^T M_c G`` with the
other components of its size). :func:`fold_plan` finds the forms once per matrix and caches
them on the graph (``graph.cache``), with every component bucketed by size for the location
Gram forms of the hook backend and for :func:`~laplace_metric.curvature.folds.fold_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from laplace_metric.pairs.graph import PairGraph

#: The matrices of a :class:`~laplace_metric.pairs.PairGraph` a fold can use.
GRAPH_MATRICES = ("matrix", "input_matrix", "output_matrix")

#: A row sum counts as zero (the component folds centred) below this many units of rounding
#: per sample of the component, relative to the matrix's largest entry.
ZERO_ROW_SUM_ULPS = 4


def _zero(row_sums: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """Which ``row_sums`` of a component of up to ``k`` samples are zero to rounding."""
    return row_sums.abs() <= ZERO_ROW_SUM_ULPS * k * torch.finfo(row_sums.dtype).eps * scale


@dataclass
class Bucket:
    """Connected components of one size class, padded to ``k`` samples.

    Attributes
    ----------
    index : torch.LongTensor
        ``(C, k)`` sample indices, padded with sample 0.
    block : torch.Tensor
        ``(C, k, k)`` the components' blocks of the matrix, diagonal included (zero on the
        padding).
    mask : torch.Tensor
        ``(C, k)``, 1 for real samples and 0 for padding.
    centred : bool
        Every block has zero row sums, so its quadratic form is unchanged by subtracting a
        per-component mean, which the folds do to avoid cancellation.
    """

    index: torch.Tensor
    block: torch.Tensor
    mask: torch.Tensor
    centred: bool
    _edges: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    _edge_slices: tuple[slice | None, slice | None] | None = field(default=None, repr=False)
    _whole: dict[int, bool] = field(default_factory=dict, repr=False)

    @property
    def padded(self) -> bool:
        """Whether some components have fewer than ``k`` samples."""
        return not bool(self.mask.all())

    def whole_batch(self, batch: int) -> bool:
        """Whether the bucket is one unpadded component of all ``batch`` samples in order."""
        if batch not in self._whole:
            order = torch.arange(batch, device=self.index.device)
            whole = self.index.shape == (1, batch) and not self.padded
            self._whole[batch] = whole and bool((self.index[0] == order).all())
        return self._whole[batch]

    def select(self, keep: torch.Tensor, scale: float) -> Bucket | None:
        """The components where ``keep`` (``None`` if none), centred if all rows sum to 0."""
        if not bool(keep.any()):
            return None
        block = self.block[keep]
        centred = bool(_zero(block.sum(-1), block.shape[1], scale).all())
        return Bucket(self.index[keep], block, self.mask[keep], centred)

    def edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The edges ``i < j`` with non-zero weight: their flat index into ``(C, k, k)``,
        their sample indices and ``2 M_ij`` (cached)."""
        if self._edges is None:
            k = self.index.shape[1]
            first, second = torch.triu_indices(k, k, 1, device=self.index.device)
            values = self.block[:, first, second]  # [C, E_k]
            comp, pos = torch.nonzero(values, as_tuple=True)
            a, b = first[pos], second[pos]
            flat = comp * k * k + a * k + b
            self._edges = (flat, self.index[comp, a], self.index[comp, b], 2 * values[comp, pos])
        return self._edges

    def edge_slices(self) -> tuple[slice | None, slice | None]:
        """The sample indices of :meth:`edges` as slices where they are arithmetic progressions
        (e.g. the pairs ``(0, 1), (2, 3), ...`` of a batch sampled two per class), else
        ``None``: a strided view costs no gather (cached)."""
        if self._edge_slices is None:
            _, first, second, _ = self.edges()
            self._edge_slices = (progression(first), progression(second))
        return self._edge_slices


def progression(index: torch.Tensor) -> slice | None:
    """``index`` as a slice if it is an increasing arithmetic progression, else ``None``."""
    if len(index) == 0:
        return None
    start = int(index[0])
    step = int(index[1] - index[0]) if len(index) > 1 else 1
    if step <= 0:
        return None
    stop = start + step * len(index)
    expected = torch.arange(start, stop, step, device=index.device, dtype=index.dtype)
    return slice(start, stop, step) if torch.equal(index, expected) else None


@dataclass
class FoldPlan:
    """One matrix of a pair graph, split into the two fold forms.

    Attributes
    ----------
    weights : torch.Tensor
        ``(B,)``: ``a`` of the sample's uniform component, ``M_ii`` of a singleton, 0 for the
        samples of bucketed components.
    labels : torch.LongTensor
        ``(B,)``: index of the sample's uniform component, or ``n_uniform`` (a dump slot).
    offsets : torch.Tensor
        ``(n_uniform + 1,)``: ``b`` of the uniform components folded uncentred, 0 for those
        folded centred and for the dump slot.
    inverse_sizes : torch.Tensor
        ``(n_uniform + 1,)``: ``1 / k`` of the uniform components whose rows sum to zero
        (folded centred, ``a sum_i (g_i - mean g)^2``), 0 for the others and the dump slot.
    buckets : list of Bucket
        Every component of two or more samples, bucketed by size (uniform ones included).
    general : list of Bucket
        The components that are not uniform, bucketed by size.
    own : torch.LongTensor or None
        The samples the closed form covers (uniform members, singletons with ``M_ii != 0``);
        ``None``: every sample.
    """

    weights: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    inverse_sizes: torch.Tensor
    buckets: list[Bucket]
    general: list[Bucket]
    own: torch.Tensor | None = None

    @property
    def centred(self) -> bool:
        """Whether any uniform component folds in the centred form."""
        return bool((self.inverse_sizes > 0).any())

    @property
    def weighted(self) -> bool:
        """Whether any sample has a non-zero weight ``a`` (else the per-sample term vanishes)."""
        return bool(self.weights.any())

    @property
    def n_uniform(self) -> int:
        """Number of uniform components of two or more samples."""
        return len(self.offsets) - 1


def _matrix(graph: PairGraph, matrix: str | torch.Tensor | None) -> tuple[str | None, torch.Tensor]:
    """``(cache key, tensor)`` of a graph matrix given by name, by itself, or ``None``."""
    if matrix is None:
        return "matrix", graph.matrix
    if isinstance(matrix, str):
        if matrix not in GRAPH_MATRICES:
            raise ValueError(f"matrix must be one of {GRAPH_MATRICES}, got {matrix!r}.")
        return matrix, getattr(graph, matrix)
    for name in GRAPH_MATRICES:
        if getattr(graph, name) is matrix:
            return name, matrix
    return None, matrix  # another matrix with the graph's block pattern: not cached


def _bucket_all(graph: PairGraph, matrix: torch.Tensor, scale: float) -> list[Bucket]:
    """Every component of two or more samples, grouped by size (next power of two), each
    group's index matrix gathered at once from the graph's :meth:`~PairGraph.layout`."""
    _, order, sizes = graph.layout()
    starts = torch.cumsum(sizes, 0) - sizes
    multi = torch.nonzero(sizes > 1).flatten()  # components in label order
    if not len(multi):
        return []
    # next power of two (exact: log2 of a power of two is exact in float64)
    padded = torch.exp2(torch.ceil(torch.log2(sizes[multi].double()))).long()
    buckets = []
    for size in torch.unique(padded).tolist():
        comps = multi[padded == size]
        slots = torch.arange(size, device=matrix.device)
        real = slots < sizes[comps, None]
        positions = torch.where(real, starts[comps, None] + slots, 0)
        index = torch.where(real, order[positions], 0)  # pads with sample 0
        mask = real.to(matrix.dtype)
        block = matrix[index[:, :, None], index[:, None, :]] * (mask[:, :, None] * mask[:, None, :])
        centred = bool(_zero(block.sum(-1), block.shape[1], scale).all())
        buckets.append(Bucket(index, block, mask, centred))
    return buckets


def _uniform(bucket: Bucket) -> torch.Tensor:
    """``(C,)``: which components of a bucket are ``a I + b 1 1^T`` (exactly)."""
    block, mask = bucket.block, bucket.mask
    eye = torch.eye(block.shape[1], dtype=torch.bool, device=block.device)
    pattern = torch.where(eye, block[:, :1, :1], block[:, :1, 1:2])
    return (block == pattern * (mask[:, :, None] * mask[:, None, :])).flatten(1).all(1)


def fold_plan(graph: PairGraph, matrix: str | torch.Tensor | None = None) -> FoldPlan:
    """The fold plan of one matrix of ``graph`` (default ``graph.matrix``; cached on it)."""
    key, matrix = _matrix(graph, matrix)
    if ("plan", key) in graph.cache:
        return graph.cache["plan", key]
    singletons = graph.singletons()
    scale = float(matrix.abs().amax().clamp_min(torch.finfo(matrix.dtype).tiny))
    buckets = _bucket_all(graph, matrix, scale)
    weights = matrix.new_zeros(matrix.shape[0])
    weights[singletons] = matrix.diagonal()[singletons]
    labels = torch.full_like(weights, -1, dtype=torch.long)
    offsets, inverse_sizes, general = [matrix.new_zeros(0)], [matrix.new_zeros(0)], []
    for bucket in buckets:
        uniform = _uniform(bucket)
        rest = bucket.select(~uniform, scale)
        if rest is not None:
            general.append(rest)
        if not bool(uniform.any()):
            continue
        mask = bucket.mask[uniform].bool()
        members = bucket.index[uniform][mask]
        diag, off = bucket.block[uniform, 0, 0], bucket.block[uniform, 0, 1]
        sizes = mask.sum(1).to(matrix.dtype)
        zero_rows = _zero(diag + (sizes - 1) * off, bucket.block.shape[1], scale)
        weights[members] = (diag - off)[:, None].expand(mask.shape)[mask]
        first = sum(len(o) for o in offsets)
        ids = torch.arange(first, first + len(sizes), device=matrix.device)
        labels[members] = ids[:, None].expand(mask.shape)[mask]
        offsets.append(torch.where(zero_rows, 0.0, off))
        inverse_sizes.append(torch.where(zero_rows, 1.0 / sizes, 0.0))
    offsets.append(matrix.new_zeros(1))  # the dump slot
    inverse_sizes.append(matrix.new_zeros(1))
    offsets_t = torch.cat(offsets)
    labels[labels < 0] = len(offsets_t) - 1
    own = torch.nonzero((labels < len(offsets_t) - 1) | (weights != 0)).flatten()
    own = None if len(own) == len(weights) else own
    plan = FoldPlan(weights, labels, offsets_t, torch.cat(inverse_sizes), buckets, general, own)
    if key is not None:
        graph.cache["plan", key] = plan
    return plan


def component_buckets(
    graph: PairGraph, matrix: str | torch.Tensor | None = None, diagonal: bool = False
) -> list[Bucket]:
    """The graph's components grouped by size, padded to a common size per group.

    Parameters
    ----------
    graph : PairGraph
    matrix : str or torch.Tensor, optional
        A matrix of the graph, by name or itself (default ``graph.matrix``), or another matrix
        with the graph's block pattern.
    diagonal : bool, default=False
        Keep the diagonal in the blocks.

    Returns
    -------
    buckets : list of Bucket
    """
    buckets = fold_plan(graph, matrix).buckets
    if diagonal:
        return buckets
    stripped = []
    for bucket in buckets:
        block = bucket.block.clone()
        block.diagonal(dim1=1, dim2=2).zero_()
        stripped.append(Bucket(bucket.index, block, bucket.mask, bucket.centred))
    return stripped
