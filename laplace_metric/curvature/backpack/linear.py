"""Pairwise module extension of ``nn.Linear``."""

from __future__ import annotations

from backpack.core.derivatives.linear import LinearDerivatives

from laplace_metric.curvature.backpack.base import WeightBiasExtension


class PairLinear(WeightBiasExtension):
    """``nn.Linear`` on inputs ``(rows, *, in)``; the middle dimensions are the locations."""

    def __init__(self) -> None:
        super().__init__(LinearDerivatives(), params=["weight", "bias"])

    def weight_views(self, ext, module, bp):
        inputs = module.input0
        n_pairs = inputs.shape[0] // ext.n_sides
        x = inputs.reshape(ext.n_sides, n_pairs, -1, module.in_features)
        q = bp.reshape(bp.shape[0], ext.n_sides, n_pairs, x.shape[2], module.out_features)
        return q, x
