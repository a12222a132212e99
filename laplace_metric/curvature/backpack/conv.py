"""Pairwise module extensions of ``nn.Conv1d`` and ``nn.Conv2d`` (``groups=1``, zero padding)."""

from __future__ import annotations

from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives

from laplace_metric.curvature.backpack.base import WeightBiasExtension
from laplace_metric.curvature.layers import conv_unsupported_reason, unfold_input


class PairConv(WeightBiasExtension):
    """Shared logic of the convolutions: locations are the output positions."""

    def check_hyperparameters_module_extension(self, ext, module, g_inp, g_out):
        reason = conv_unsupported_reason(module)
        if reason is not None:
            raise NotImplementedError(
                f"BackPackPairGGN does not support {type(module).__name__} with {reason}; "
                "use ReferencePairGGN."
            )

    def weight_views(self, ext, module, bp):
        sides = ext.n_sides
        cols = unfold_input(module, module.input0)
        x = cols.reshape(sides, -1, *cols.shape[1:])
        q = bp.reshape(bp.shape[0], sides, x.shape[1], module.out_channels, -1).transpose(-1, -2)
        return q, x


class PairConv1d(PairConv):
    """``nn.Conv1d``."""

    def __init__(self) -> None:
        super().__init__(Conv1DDerivatives(), params=["weight", "bias"])


class PairConv2d(PairConv):
    """``nn.Conv2d``."""

    def __init__(self) -> None:
        super().__init__(Conv2DDerivatives(), params=["weight", "bias"])
