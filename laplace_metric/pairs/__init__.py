"""Pair data, below the curvature: the signed pair graph of a batch.

:class:`PairGraph` is what a likelihood hands the curvature backends about the mined pairs of
one batch; :mod:`laplace_metric.curvature.folds` folds it into curvature.
"""

from __future__ import annotations

from laplace_metric.pairs.graph import PairGraph

__all__ = ["PairGraph"]
