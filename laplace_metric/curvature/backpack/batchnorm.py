"""Pairwise module extension of ``nn.BatchNorm1d/2d`` in evaluation mode (running statistics).

In evaluation mode batch normalisation is the per-channel affine map
``y = gamma * (x - mu) / sqrt(var + eps) + beta``, so each sample is independent and the pair
batch is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from laplace_metric.curvature.backpack.base import ParamModuleExtension


def _channel_shape(module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    return (1, module.num_features) + (1,) * (x.ndim - 2)


class PairBatchNorm(ParamModuleExtension):
    """``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` with running statistics."""

    def __init__(self) -> None:
        super().__init__(None, params=["weight", "bias"])

    def check_hyperparameters_module_extension(self, ext, module, g_inp, g_out):
        if module.training or module.running_var is None:
            raise NotImplementedError(
                f"BackPackPairGGN supports {type(module).__name__} in evaluation mode with "
                "running statistics only (call model.eval()); use ReferencePairGGN."
            )

    def _scale(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (module.running_var + module.eps).rsqrt().reshape(_channel_shape(module, x))

    def backpropagate(self, ext, module, g_inp, g_out, bp):
        x = module.input0
        scale = self._scale(module, x)
        if module.weight is not None:
            scale = scale * module.weight.reshape(_channel_shape(module, x))
        return bp * scale

    def pair_gradients(self, ext, module, name, bp):
        x = module.input0
        if name == "weight":
            mean = module.running_mean.reshape(_channel_shape(module, x))
            bp = bp * ((x - mean) * self._scale(module, x))
        per_row = bp.sum(dim=tuple(range(3, bp.ndim))) if bp.ndim > 3 else bp
        return per_row.reshape(bp.shape[0], ext.n_sides, -1, module.num_features).sum(1)
