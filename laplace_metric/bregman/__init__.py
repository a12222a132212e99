"""Learned Bregman divergences: convex potentials, the divergence, pml adapters and losses.

The training losses are exported lazily (they depend on
:mod:`laplace_metric.likelihoods.bregman`, which itself imports this package).
"""

from typing import Any

from laplace_metric.bregman.divergence import BregmanDivergence, divergence_from_config
from laplace_metric.bregman.pml import BregmanDistance, BregmanKNN, bregman_knn
from laplace_metric.bregman.potentials import (
    ConvexPotential,
    ICNNPotential,
    MahalanobisPotential,
    NegativeEntropyPotential,
    SquaredEuclideanPotential,
)

_LAZY = ("BregmanContrastiveLoss", "BregmanTripletLoss", "fit_bregman")

__all__ = [
    "BregmanDivergence",
    "BregmanDistance",
    "BregmanKNN",
    "ConvexPotential",
    "ICNNPotential",
    "MahalanobisPotential",
    "NegativeEntropyPotential",
    "SquaredEuclideanPotential",
    "bregman_knn",
    "divergence_from_config",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from laplace_metric.bregman import losses

        return getattr(losses, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
