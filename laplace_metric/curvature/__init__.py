"""Curvature backends for pairwise likelihoods."""

from __future__ import annotations

from laplace.utils.enums import HessianStructure
from torch import nn

from laplace_metric.curvature.base import BatchCurvature, PairCurvatureInterface
from laplace_metric.curvature.reference import ReferencePairGGN


def default_backend(
    model: nn.Module, structure: HessianStructure | str, last_layer: bool = False
) -> type[PairCurvatureInterface]:
    """The backend used when ``backend=None``.

    Currently the exact :class:`ReferencePairGGN` for every model.
    """
    return ReferencePairGGN


__all__ = ["BatchCurvature", "PairCurvatureInterface", "ReferencePairGGN", "default_backend"]
