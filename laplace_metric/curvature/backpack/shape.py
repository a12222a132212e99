"""Pairwise module extensions of layers that only route values: Flatten, Identity, Dropout
(evaluation mode), and BackPACK's converter modules for residual sums and scalings."""

from __future__ import annotations

from backpack.core.derivatives.dropout import DropoutDerivatives
from backpack.core.derivatives.flatten import FlattenDerivatives
from backpack.core.derivatives.scale_module import ScaleModuleDerivatives
from backpack.core.derivatives.sum_module import SumModuleDerivatives
from backpack.custom_module.branching import SumModule
from backpack.custom_module.scale_module import ScaleModule
from torch import nn

from laplace_metric.curvature.backpack.base import PairModuleExtension


class IdentityExtension(PairModuleExtension):
    """``nn.Identity``: the columns pass unchanged."""

    def backpropagate(self, ext, module, g_inp, g_out, bp):
        return bp


class EvalDropoutExtension(PairModuleExtension):
    """``nn.Dropout`` in evaluation mode (the identity)."""

    def __init__(self) -> None:
        super().__init__(DropoutDerivatives())

    def check_hyperparameters_module_extension(self, ext, module, g_inp, g_out):
        if module.training and module.p > 0:
            raise NotImplementedError(
                "BackPackPairGGN needs Dropout in evaluation mode; call model.eval()."
            )


def shape_extensions() -> dict[type[nn.Module], PairModuleExtension]:
    """Module class -> pairwise extension for the routing layers."""
    return {
        nn.Flatten: PairModuleExtension(FlattenDerivatives()),
        nn.Identity: IdentityExtension(),
        nn.Dropout: EvalDropoutExtension(),
        SumModule: PairModuleExtension(SumModuleDerivatives()),
        ScaleModule: PairModuleExtension(ScaleModuleDerivatives()),
    }
