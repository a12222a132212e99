"""The signed pair graph of a batch: pairwise curvature as a ``B x B`` matrix over samples.

For a likelihood whose pair Hessian is ``s_m [[H, -H], [-H, H]]`` with the same square root
``L`` for both samples of every pair (the contrastive likelihood: ``L = I``; its pull-back
through the normalisation is per sample), the signed pairwise GGN of a batch is

    sum_m s_m (u_a - u_b)(u_a - u_b)^T = sum_ij A_ij u_i u_j^T,   u_i = J_i^T S_i,

with ``S_i`` the per-sample square-root columns ``(D, R)`` and ``A = diag(W 1) - W`` the graph
Laplacian of the signed pair weights ``W`` (``B x B``). For one-sided pairs
(``hessian_method='fixed'``) ``A`` is diagonal. Only the connected components of the graph
couple samples: a ``positives`` graph splits into its classes. Nothing per pair is ever formed.

This module holds the data; :mod:`laplace_metric.curvature.folds` folds it into curvature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def component_labels(adjacency: torch.Tensor) -> torch.LongTensor:
    """Connected components of the undirected graph ``adjacency`` ``(B, B)`` (bool, symmetric;
    the diagonal is ignored): each node's component, numbered by its smallest member.

    Minimum-label propagation with pointer jumping, in torch on the graph's device: every node
    takes the smallest label among itself and its neighbours, then its label's label. Labels only
    decrease and always name a node of the same component, so the fixed point is each
    component's smallest node; batch graphs (classes, pairs) reach it in two or three rounds.
    """
    n = adjacency.shape[0]
    rows, cols = torch.nonzero(adjacency, as_tuple=True)
    labels = torch.arange(n, device=adjacency.device)
    for _ in range(n):
        reached = labels.scatter_reduce(0, rows, labels[cols], reduce="amin")
        reached = reached[reached]
        if torch.equal(reached, labels):
            break
        labels = reached
    return torch.unique(labels, return_inverse=True)[1]


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
    #: The one cache of everything derived from the matrices (components, fold plans).
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

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

    @classmethod
    def of_pair_batch(cls, signs: torch.Tensor, one_sided: bool = False) -> PairGraph:
        """The graph of a *pair batch* ``cat([x_a, x_b])`` of ``M`` pairs with signs ``s_m``.

        Each pair is a two-sample component ``(m, m + M)`` whose folds reproduce the per-pair
        sums: the GGN of ``V_m = u_a + u_b`` and the Kronecker factors of ``Q_m = q_a - q_b``
        and ``e_m = (x_a - x_b) / 2`` (the second factor carries the pair's minus sign). If
        ``one_sided``, the batch is ``x_b`` alone and the graph is ``diag(s)``.
        """
        m = len(signs)
        if one_sided:
            matrix = torch.diag(signs)
            return cls(matrix, torch.diag(torch.ones_like(signs)), matrix, m)
        idx = torch.arange(m, device=signs.device)
        a, b = idx, idx + m
        matrix = signs.new_zeros(2 * m, 2 * m)
        outputs = signs.new_zeros(2 * m, 2 * m)
        diff = signs.new_zeros(2 * m, 2 * m)
        for i, j, cross in ((a, a, 1.0), (b, b, 1.0), (a, b, -1.0), (b, a, -1.0)):
            matrix[i, j] = signs
            outputs[i, j] = cross * signs
            diff[i, j] = cross / 4
        return cls(matrix, diff, outputs, m)

    @property
    def n_samples(self) -> int:
        """Number of samples ``B``."""
        return self.matrix.shape[0]

    def layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The connected components as arrays (cached).

        Returns
        -------
        labels : torch.LongTensor
            ``(B,)``: each sample's component.
        order : torch.LongTensor
            ``(B,)``: the samples sorted by component (stable: in batch order within one).
        sizes : torch.LongTensor
            ``(n_components,)``: samples per component.
        """
        if "layout" not in self.cache:
            labels = component_labels(self.matrix.detach() != 0)
            sizes = torch.bincount(labels)
            order = torch.argsort(labels, stable=True)
            self.cache["layout"] = (labels, order, sizes)
        return self.cache["layout"]

    def singletons(self) -> torch.Tensor:
        """Samples coupled to no other sample (only a diagonal entry, possibly zero)."""
        labels, _, sizes = self.layout()
        return torch.nonzero(sizes[labels] == 1).flatten()

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The graph split into independent parts (cached).

        Returns
        -------
        singletons : torch.LongTensor
            Samples coupled to no other sample (only a diagonal entry, possibly zero).
        singleton_weights : torch.Tensor
            ``A_ii`` of the singletons.
        components : list of torch.LongTensor
            Index sets of the connected components with two or more samples.
        """
        if "blocks" not in self.cache:
            _, order, sizes = self.layout()
            singletons = self.singletons()
            counts = sizes.tolist()
            groups = torch.split(order, counts)
            components = [members for members, n in zip(groups, counts) if n > 1]
            self.cache["blocks"] = (singletons, self.matrix.diagonal()[singletons], components)
        return self.cache["blocks"]

    def induced(self, index: torch.Tensor) -> PairGraph:
        """The graph on the samples ``index``, a union of whole components (cross terms to
        the other samples are dropped, so the folds of the parts sum to the whole's)."""
        rows = (index[:, None], index[None, :])
        return PairGraph(
            self.matrix[rows], self.input_matrix[rows], self.output_matrix[rows], self.n_pairs
        )

    def component_order(self) -> torch.Tensor | None:
        """A sample order that makes every component contiguous (components, then the
        singletons), or ``None`` if the samples are already in it."""
        singletons, _, components = self.blocks()
        order = torch.cat([*components, singletons])
        if torch.equal(order, torch.arange(len(order), device=order.device)):
            return None
        return order

    def component_chunks(self, target: int) -> list[tuple[torch.Tensor | None, PairGraph]]:
        """Whole components packed into chunks of about ``target`` samples (cached).

        Returns ``[(index, induced graph)]``; ``[(None, self)]`` when one chunk holds every
        sample. A component larger than ``target`` is a chunk of its own.
        """
        key = ("component_chunks", target)
        if key not in self.cache:
            singletons, _, components = self.blocks()
            parts = [*components, *singletons[:, None]]
            chunks, current, size = [], [], 0
            for part in parts:
                if current and size + len(part) > target:
                    chunks.append(torch.cat(current))
                    current, size = [], 0
                current.append(part)
                size += len(part)
            if current:
                chunks.append(torch.cat(current))
            if len(chunks) <= 1:
                self.cache[key] = [(None, self)]
            else:
                index = [c.sort().values for c in chunks]
                self.cache[key] = [(i, self.induced(i)) for i in index]
        return self.cache[key]
