"""What a likelihood hands the curvature backends about the mined pairs of one batch.

:class:`PairTerms` carries per-pair square-root factors (any pairwise likelihood);
:class:`GraphTerms` carries per-sample factors and the signed :class:`PairGraph` (likelihoods
whose pair Hessians factor per sample). Both are re-exported by
:mod:`laplace_metric.likelihoods`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from laplace_metric.mining import Pairs
from laplace_metric.pairs.graph import PairGraph


@dataclass
class PairTerms:
    """Everything a curvature backend needs about the mined pairs of one batch.

    Attributes
    ----------
    pairs : Pairs
        The mined pairs.
    loss : torch.Tensor
        Batch-summed negative log-likelihood (scalar, detached).
    first_factor : torch.Tensor
        ``S_a`` per pair, shape ``(M, D, R)``, in raw-output space.
    second_factor : torch.Tensor
        ``S_b`` per pair, shape ``(M, D, R)``, in raw-output space.
    signs : torch.Tensor
        ``+1`` (positive pair), ``-1`` (active negative), ``0`` (no contribution), shape ``(M,)``.
    one_sided : bool
        ``True`` when ``first_factor`` is identically zero (``hessian_method='fixed'``); the
        Kronecker backends then factorise the second sample alone.
    """

    pairs: Pairs
    loss: torch.Tensor
    first_factor: torch.Tensor
    second_factor: torch.Tensor
    signs: torch.Tensor
    one_sided: bool = False

    @property
    def n_contributing(self) -> int:
        """Number of pairs with a non-zero sign."""
        return int((self.signs != 0).sum())

    def contributing(self) -> PairTerms:
        """The same terms restricted to the pairs with a non-zero sign (deprecated, unused:
        :meth:`PairLikelihood.pair_term_chunks` already drops zero-weight pairs)."""
        warnings.warn(
            "PairTerms.contributing is deprecated and will be removed; pair_term_chunks "
            "already yields only the contributing pairs.",
            DeprecationWarning,
            stacklevel=2,
        )
        keep = self.signs != 0
        pairs = Pairs(self.pairs.first[keep], self.pairs.second[keep], self.pairs.positive[keep])
        return PairTerms(
            pairs,
            self.loss,
            self.first_factor[keep],
            self.second_factor[keep],
            self.signs[keep],
            self.one_sided,
        )


@dataclass
class GraphTerms:
    """Per-sample curvature terms of a batch whose pair Hessians factor per sample.

    The batch's signed pairwise GGN is ``sum_ij A_ij u_i u_j^T`` with ``u_i = J_i^T S_i``,
    ``S_i = factor[i]`` and ``A = graph.matrix`` (see :mod:`laplace_metric.pairs.graph`).

    Attributes
    ----------
    loss : torch.Tensor
        Batch-summed negative log-likelihood (scalar, detached).
    factor : torch.Tensor
        ``S_i`` per sample, ``(B, D, R)``, in raw-output space.
    graph : PairGraph
        The signed pair graph.
    """

    loss: torch.Tensor
    factor: torch.Tensor
    graph: PairGraph

    @property
    def n_pairs(self) -> int:
        """Number of contributing pairs."""
        return self.graph.n_pairs
