"""Pairwise curvature with BackPACK: extensions, one module extension per layer family, and
the :class:`BackPackPairGGN` backend."""

from laplace_metric.curvature.backpack.backend import BackPackPairGGN, backpack_support_error
from laplace_metric.curvature.backpack.extensions import (
    SUPPORTED_MODULES,
    PairDiagGGN,
    PairExtension,
    PairFactor,
    PairKronGGN,
)
from laplace_metric.curvature.backpack.root import PairRoot
from laplace_metric.curvature.backpack.support import unsupported_layers

__all__ = [
    "SUPPORTED_MODULES",
    "BackPackPairGGN",
    "backpack_support_error",
    "PairDiagGGN",
    "PairExtension",
    "PairFactor",
    "PairKronGGN",
    "PairRoot",
    "unsupported_layers",
]
