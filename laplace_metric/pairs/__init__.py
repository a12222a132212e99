"""Pair data, on the floor below the likelihoods and the curvature.

A likelihood hands the curvature backends the mined pairs of one batch as :class:`PairTerms`
(per-pair factors) or :class:`GraphTerms` (per-sample factors and the signed
:class:`PairGraph`); :mod:`laplace_metric.curvature.folds` folds the graph into curvature. The
pairs themselves come from :mod:`laplace_metric.mining`, which imports nothing of the package.
"""

from __future__ import annotations

from laplace_metric.pairs.graph import PairGraph
from laplace_metric.pairs.terms import GraphTerms, PairTerms

__all__ = ["GraphTerms", "PairGraph", "PairTerms"]
