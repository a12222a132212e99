"""The pair graph: pairwise curvature folded in per sample, at the cost of the per-sample GGN.

For a likelihood whose pair Hessian is ``s_m [[H, -H], [-H, H]]`` with the same square root
``L`` for both samples of every pair (the contrastive likelihood: ``L = I``; its pull-back
through the normalisation is per sample), the signed pairwise GGN of a batch is

    sum_m s_m (u_a - u_b)(u_a - u_b)^T = sum_ij A_ij u_i u_j^T,   u_i = J_i^T S_i,

with ``S_i`` the per-sample square-root columns ``(D, R)`` and ``A = diag(W 1) - W`` the graph
Laplacian of the signed pair weights ``W`` (``B x B``). For one-sided pairs
(``hessian_method='fixed'``) ``A`` is diagonal. Because ``A`` acts on samples and not on
columns, every structure is a sum over columns ``r`` of ``sum_ij A_ij g_ir g_jr^T`` terms, and
only the connected components of the graph couple samples: a ``positives`` graph splits into
its classes. Nothing per pair is ever formed.

The functions here fold ``A`` into per-sample quantities; the backends only produce those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

#: Elements of one intermediate tensor formed by the folds (bounds their peak memory).
FOLD_CHUNK_ELEMENTS = 2**24


@dataclass
class PairGraph:
    """The signed ``B x B`` pair graph of one batch.

    Attributes
    ----------
    matrix : torch.Tensor
        Symmetric ``A`` with ``sum_m s_m V_m V_m^T = sum_ij A_ij u_i u_j^T``, shape ``(B, B)``.
    input_matrix : torch.Tensor
        Symmetric ``C`` with ``sum_m e_m e_m^T = X^T C X`` for the Kronecker input factor
        (``e = (x_a - x_b) / 2`` over the contributing pairs, or ``e = x_b`` if one-sided).
    output_matrix : torch.Tensor
        Symmetric ``A+`` with ``sum_m s_m Q_m Q_m^T = Q^T A+ Q`` for the Kronecker output
        factor, ``Q_m = q_a + q_b`` the pair's columns at the layer output (``S_a - S_b`` in
        the per-pair notation, where ``S_b`` carries the pair's minus sign): the signless
        Laplacian ``diag(W 1) + W``; equal to ``matrix`` if one-sided.
    n_pairs : int
        Number of contributing pairs (non-zero weight).
    """

    matrix: torch.Tensor
    input_matrix: torch.Tensor
    output_matrix: torch.Tensor
    n_pairs: int
    _blocks: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None = field(
        default=None, repr=False
    )
    _buckets: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def from_pairs(
        cls,
        first: torch.Tensor,
        second: torch.Tensor,
        weights: torch.Tensor,
        n_samples: int,
        one_sided: bool = False,
    ) -> PairGraph:
        """Build the graph of pairs ``(first[m], second[m])`` with signed weights ``s_m``.

        Parameters
        ----------
        first, second : torch.LongTensor
            Sample indices of each pair, shape ``(M,)``.
        weights : torch.Tensor
            Signed pair weights ``s_m``; zero-weight pairs are ignored.
        n_samples : int
            Number of samples ``B`` in the batch.
        one_sided : bool, default=False
            Only the second sample of each pair is differentiated (``hessian_method='fixed'``).

        Returns
        -------
        graph : PairGraph
        """
        keep = weights != 0
        first, second, weights = first[keep], second[keep], weights[keep]
        shape = (n_samples, n_samples)
        matrix = weights.new_zeros(shape)
        inputs = weights.new_zeros(shape)
        ones = torch.ones_like(weights)
        if one_sided:
            matrix.index_put_((second, second), weights, accumulate=True)
            inputs.index_put_((second, second), ones, accumulate=True)
            return cls(matrix, inputs, matrix, int(keep.sum()))
        outputs = weights.new_zeros(shape)
        for target, values, cross in (
            (matrix, weights, -1.0),
            (inputs, ones / 4, -1.0),
            (outputs, weights, 1.0),
        ):
            target.index_put_((first, second), cross * values, accumulate=True)
            target.index_put_((second, first), cross * values, accumulate=True)
            target.index_put_((first, first), values, accumulate=True)
            target.index_put_((second, second), values, accumulate=True)
        return cls(matrix, inputs, outputs, int(keep.sum()))

    @property
    def n_samples(self) -> int:
        """Number of samples ``B``."""
        return self.matrix.shape[0]

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The graph split into independent parts.

        Returns
        -------
        singletons : torch.LongTensor
            Samples coupled to no other sample (only a diagonal entry, possibly zero).
        singleton_weights : torch.Tensor
            ``A_ii`` of the singletons.
        components : list of torch.LongTensor
            Index sets of the connected components with two or more samples.
        """
        if self._blocks is None:
            off = self.matrix.detach().cpu().numpy().copy()
            np.fill_diagonal(off, 0.0)
            n_comp, labels = connected_components(csr_matrix(off != 0), directed=False)
            labels_t = torch.as_tensor(labels, device=self.matrix.device)
            sizes = torch.bincount(labels_t, minlength=n_comp)
            single = sizes[labels_t] == 1
            singletons = torch.nonzero(single).flatten()
            order = torch.argsort(labels_t, stable=True)
            counts = sizes.tolist()
            groups = torch.split(order, counts)
            components = [members for members, n in zip(groups, counts) if n > 1]
            self._blocks = (singletons, self.matrix.diagonal()[singletons], components)
        return self._blocks


def _row_chunks(n: int, per_row: int) -> list[slice]:
    step = max(1, FOLD_CHUNK_ELEMENTS // max(per_row, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def fold_diag(grads: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """``sum_r sum_ij A_ij g_ri * g_rj`` from per-sample gradients ``[R, B, *shape]``."""
    flat = grads.flatten(start_dim=2)
    singletons, weights, _ = graph.blocks()
    result = torch.einsum("i,rip->p", weights.to(flat.dtype), flat[:, singletons].square())
    n_cols, _, n_params = flat.shape
    for bucket in component_buckets(graph, diagonal=True):
        n_comp, k = bucket.index.shape
        block = bucket.block.to(flat.dtype)
        for params in _row_chunks(n_params, n_cols * n_comp * k):
            rows = _bucket_rows(flat[..., params], bucket)
            result[params] += (rows * (block @ rows)).sum(dim=(0, 1, 2))
    return result.reshape(grads.shape[2:])


@dataclass
class Bucket:
    """Connected components of one size class, padded to ``k`` samples.

    Attributes
    ----------
    index : torch.LongTensor
        ``(C, k)`` sample indices, padded with sample 0.
    block : torch.Tensor
        ``(C, k, k)`` the components' blocks of the matrix (zero on the padding; the diagonal
        is kept or zeroed, as requested).
    mask : torch.Tensor
        ``(C, k)``, 1 for real samples and 0 for padding.
    centred : bool
        Every block (with its diagonal) has zero row sums, so its quadratic form is unchanged
        by subtracting a per-component mean, which the folds do to avoid cancellation.
    """

    index: torch.Tensor
    block: torch.Tensor
    mask: torch.Tensor
    centred: bool
    _edges: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    @property
    def padded(self) -> bool:
        """Whether some components have fewer than ``k`` samples."""
        return not bool(self.mask.all())

    def edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The edges ``i < j`` with non-zero weight: their flat index into ``(C, k, k)``,
        their sample indices and ``2 A_ij`` (cached)."""
        if self._edges is None:
            n_comp, k = self.index.shape
            first, second = torch.triu_indices(k, k, 1, device=self.index.device)
            values = self.block[:, first, second]  # [C, E_k]
            comp, pos = torch.nonzero(values, as_tuple=True)
            a, b = first[pos], second[pos]
            flat = comp * k * k + a * k + b
            self._edges = (flat, self.index[comp, a], self.index[comp, b], 2 * values[comp, pos])
        return self._edges


def component_buckets(
    graph: PairGraph, matrix: torch.Tensor | None = None, diagonal: bool = False
) -> list[Bucket]:
    """The graph's components grouped by size, padded to a common size per group.

    Parameters
    ----------
    graph : PairGraph
    matrix : torch.Tensor, optional
        A matrix with the graph's pattern (default ``graph.matrix``).
    diagonal : bool, default=False
        Keep the diagonal in the blocks.

    Returns
    -------
    buckets : list of Bucket
    """
    matrix = graph.matrix if matrix is None else matrix
    key = (id(matrix), diagonal)
    if key in graph._buckets:
        return graph._buckets[key]
    _, _, components = graph.blocks()
    groups: dict[int, list[torch.Tensor]] = {}
    lengths_of: dict[int, list[int]] = {}
    for index in components:
        n = index.shape[0]
        size = 1 << (n - 1).bit_length()  # next power of two: little padding
        groups.setdefault(size, []).append(index)
        lengths_of.setdefault(size, []).append(n)
    buckets = []
    for size, members in sorted(groups.items()):
        if min(lengths_of[size]) == size:  # no padding (e.g. all pairs): a plain stack
            index = torch.stack(members)
            mask = torch.ones(index.shape, dtype=matrix.dtype, device=matrix.device)
        else:
            lengths = torch.tensor(lengths_of[size], device=matrix.device)
            index = torch.nn.utils.rnn.pad_sequence(members, batch_first=True)  # pads with 0
            index = torch.nn.functional.pad(index, (0, size - index.shape[1]))
            mask = (torch.arange(size, device=matrix.device) < lengths[:, None]).to(matrix.dtype)
        block = matrix[index[:, :, None], index[:, None, :]] * (mask[:, :, None] * mask[:, None, :])
        scale = block.abs().amax().clamp_min(torch.finfo(block.dtype).tiny)
        centred = bool((block.sum(-1).abs() <= 1e-12 * scale).all())
        if not diagonal:
            block.diagonal(dim1=1, dim2=2).zero_()
        buckets.append(Bucket(index, block, mask, centred))
    graph._buckets[key] = buckets
    return buckets


def _bucket_rows(grads: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """Per-sample rows ``[R, C, k, P]`` of a bucket, centred per component if allowed."""
    n_comp, k = bucket.index.shape
    rows = grads.index_select(1, bucket.index.flatten()).view(grads.shape[0], n_comp, k, -1)
    if bucket.padded:
        mask = bucket.mask.to(grads.dtype)[:, :, None]
        if bucket.centred:
            rows = rows - (rows * mask).sum(2, keepdim=True) / mask.sum(1, keepdim=True)
        return rows * mask
    if bucket.centred:
        rows = rows - rows.mean(2, keepdim=True)
    return rows


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
    buckets = component_buckets(graph)
    if not buckets:
        return weight, bias
    q_t = None
    for bucket in buckets:
        flat_edges, first, second, weights = bucket.edges()
        if len(weights) == 0:
            continue
        if bucket.index.shape[1] <= SMALL_COMPONENT:
            kernel = _edge_kernel(q, first, second, weights)
        else:
            if q_t is None:  # [out, B, R]: bmm is slow on strided operands
                q_t = q.permute(2, 1, 0).contiguous()
            kernel = _bucket_kernel(q_t, bucket, flat_edges, weights)
        bias += kernel.sum(1)
        for part in _row_chunks(len(weights), x.shape[1]):
            products = x.index_select(0, first[part]) * x.index_select(0, second[part])
            weight += kernel[:, part] @ products  # one (out x E) @ (E x in) product
    return weight, bias


#: Components of at most this many samples form ``K_ij`` edge by edge (elementwise), larger
#: ones by batched Gram matrices (measured: pairs of a 64-pair batch spent most of a fit in
#: the transposed copy and tiny matrix products of the batched form).
SMALL_COMPONENT = 4


def _edge_kernel(
    q: torch.Tensor, first: torch.Tensor, second: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``2 A_ij K_ij[o]`` per edge, ``(out, E)``, from ``q [R, B, out]`` edge by edge."""
    kernel = q.new_empty(len(weights), q.shape[2])
    for part in _row_chunks(len(weights), q.shape[0] * q.shape[2]):
        pairs = q.index_select(1, first[part]) * q.index_select(1, second[part])
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
    matrix: torch.Tensor | None = None,
    n_params: int | None = None,
) -> torch.Tensor:
    """``sum_r G_r^T A G_r`` from per-sample gradients ``[R, B, P]``, shape ``(P, P)``.

    Parameters
    ----------
    grads : torch.Tensor
        ``[R, B, F]``; with ``n_params`` given, ``F = T * P`` holds ``T`` locations of ``P``
        values each, and the locations are summed over like the columns.
    graph : PairGraph
    matrix : torch.Tensor, optional
        Replaces ``A`` by another matrix with the same block pattern (the Kronecker input and
        output graphs).
    n_params : int, optional
        ``P`` (default: all of ``F``).
    """
    matrix = graph.matrix if matrix is None else matrix
    n_params = grads.shape[2] if n_params is None else n_params
    singletons, _, _ = graph.blocks()
    single = grads[:, singletons]
    weighted = single * matrix.diagonal()[singletons].to(grads.dtype)[:, None]
    result = weighted.reshape(-1, n_params).T @ single.reshape(-1, n_params)
    for bucket in component_buckets(graph, matrix, diagonal=True):
        rows = _bucket_rows(grads, bucket)
        mixed = bucket.block.to(grads.dtype) @ rows
        result += rows.reshape(-1, n_params).T @ mixed.reshape(-1, n_params)
    return result


def fold_output_factor(q: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """Kronecker output factor ``sum_{r,t} Q_rt^T A+ Q_rt`` from ``q [R, B, T, out]``."""
    n_cols, batch, _, n_out = q.shape
    flat = q.reshape(n_cols, batch, -1)
    return fold_gram(flat, graph, graph.output_matrix, n_params=n_out)


def fold_input_factor(x: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """Unnormalised Kronecker input factor ``sum_t X_t^T C X_t / T`` from ``x [B, T, in]``."""
    batch, n_locations, n_in = x.shape
    flat = x.reshape(1, batch, -1)
    return fold_gram(flat, graph, graph.input_matrix, n_params=n_in) / n_locations
