"""Pairwise module extensions of pooling layers.

Max pooling uses BackPACK's derivatives. Average pooling is linear, so its transposed
Jacobian is the vector-Jacobian product of the pool itself, applied to all columns at once
(BackPACK's average-pool derivatives build a float32 transposed convolution, which fails for
float64 models).
"""

from __future__ import annotations

from backpack.core.derivatives.maxpool1d import MaxPool1DDerivatives
from backpack.core.derivatives.maxpool2d import MaxPool2DDerivatives
from torch import nn
from torch.func import vjp

from laplace_metric.curvature.backpack.base import PairModuleExtension


class LinearPoolExtension(PairModuleExtension):
    """Average pools (plain and adaptive): ``J^T`` columns by one vjp of the pool."""

    def backpropagate(self, ext, module, g_inp, g_out, bp):
        n_cols, rows = bp.shape[:2]
        inputs = module.input0
        zeros = inputs.new_zeros(n_cols * rows, *inputs.shape[1:])
        _, pullback = vjp(module.forward, zeros)
        (result,) = pullback(bp.reshape(n_cols * rows, *bp.shape[2:]))
        return result.reshape(n_cols, rows, *inputs.shape[1:])


def pooling_extensions() -> dict[type[nn.Module], PairModuleExtension]:
    """Module class -> pairwise extension for the supported pooling layers."""
    linear = LinearPoolExtension()
    return {
        nn.MaxPool1d: PairModuleExtension(MaxPool1DDerivatives()),
        nn.MaxPool2d: PairModuleExtension(MaxPool2DDerivatives()),
        nn.AvgPool1d: linear,
        nn.AvgPool2d: linear,
        nn.AdaptiveAvgPool1d: linear,
        nn.AdaptiveAvgPool2d: linear,
    }
