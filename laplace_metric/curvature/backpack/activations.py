"""Pairwise module extensions of element-wise activations.

BackPACK's derivatives are used where BackPACK has them; GELU gets its own element-wise
derivative (exact ``erf`` form and the ``tanh`` approximation).
"""

from __future__ import annotations

import math

import torch
from backpack.core.derivatives.elementwise import ElementwiseDerivatives
from backpack.core.derivatives.elu import ELUDerivatives
from backpack.core.derivatives.leakyrelu import LeakyReLUDerivatives
from backpack.core.derivatives.relu import ReLUDerivatives
from backpack.core.derivatives.sigmoid import SigmoidDerivatives
from backpack.core.derivatives.tanh import TanhDerivatives
from torch import nn

from laplace_metric.curvature.backpack.base import PairModuleExtension


class GELUDerivatives(ElementwiseDerivatives):
    """First derivative of ``nn.GELU`` (``approximate='none'`` or ``'tanh'``)."""

    def hessian_is_zero(self, module: nn.GELU) -> bool:
        """GELU is curved."""
        return False

    def df(self, module: nn.GELU, g_inp, g_out, subsampling=None) -> torch.Tensor:
        """``d GELU(x) / dx`` at the module input."""
        x = module.input0 if subsampling is None else module.input0[subsampling]
        if module.approximate == "tanh":
            c = math.sqrt(2.0 / math.pi)
            inner = c * (x + 0.044715 * x**3)
            t = torch.tanh(inner)
            return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
        return cdf + x * pdf


def activation_extensions() -> dict[type[nn.Module], PairModuleExtension]:
    """Module class -> pairwise extension for the supported activations."""
    return {
        nn.ReLU: PairModuleExtension(ReLUDerivatives()),
        nn.LeakyReLU: PairModuleExtension(LeakyReLUDerivatives()),
        nn.Tanh: PairModuleExtension(TanhDerivatives()),
        nn.Sigmoid: PairModuleExtension(SigmoidDerivatives()),
        nn.ELU: PairModuleExtension(ELUDerivatives()),
        nn.GELU: PairModuleExtension(GELUDerivatives()),
    }
