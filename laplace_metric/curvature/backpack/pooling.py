"""Pairwise module extensions of pooling layers (BackPACK's derivatives)."""

from __future__ import annotations

from backpack.core.derivatives.adaptive_avg_pool_nd import (
    AdaptiveAvgPool1dDerivatives,
    AdaptiveAvgPool2dDerivatives,
)
from backpack.core.derivatives.avgpool1d import AvgPool1DDerivatives
from backpack.core.derivatives.avgpool2d import AvgPool2DDerivatives
from backpack.core.derivatives.maxpool1d import MaxPool1DDerivatives
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from torch import nn

from laplace_metric.curvature.backpack.base import PairModuleExtension


def pooling_extensions() -> dict[type[nn.Module], PairModuleExtension]:
    """Module class -> pairwise extension for the supported pooling layers."""
    return {
        nn.MaxPool1d: PairModuleExtension(MaxPool1DDerivatives()),
        nn.MaxPool2d: PairModuleExtension(MaxPool2DDerivatives()),
        nn.AvgPool1d: PairModuleExtension(AvgPool1DDerivatives()),
        nn.AvgPool2d: PairModuleExtension(AvgPool2DDerivatives()),
        nn.AdaptiveAvgPool1d: PairModuleExtension(AdaptiveAvgPool1dDerivatives()),
        nn.AdaptiveAvgPool2d: PairModuleExtension(AdaptiveAvgPool2dDerivatives()),
    }
