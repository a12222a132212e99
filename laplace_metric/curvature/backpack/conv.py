"""Pairwise module extensions of ``nn.Conv1d`` and ``nn.Conv2d`` (``groups=1``, zero padding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from torch import nn

from laplace_metric.curvature.backpack.base import WeightBiasExtension


def conv_unsupported_reason(layer: nn.Module) -> str | None:
    """Why the pairwise extensions cannot handle a convolution, or ``None``."""
    if layer.groups != 1:
        return f"groups={layer.groups}"
    if layer.padding_mode != "zeros":
        return f"padding_mode='{layer.padding_mode}'"
    if isinstance(layer.padding, str) and layer.padding != "valid":
        return f"padding='{layer.padding}'"
    return None


def unfold_locations(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Convolution input patches ``(rows, T, fan_in)`` matching ``weight.flatten(1)``."""
    padding = (0,) * len(layer.kernel_size) if isinstance(layer.padding, str) else layer.padding
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride = (1, layer.kernel_size[0]), (1, layer.stride[0])
        padding, dilation = (0, padding[0]), (1, layer.dilation[0])
    else:
        kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)


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
        cols = unfold_locations(module, module.input0)
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
