"""Shared pieces of the pairwise module extensions.

Every pairwise extension back-propagates the same quantity: a stack of square-root columns
of shape ``[R, rows, *features]`` for a *pair batch* whose ``rows = n_sides * M`` samples are
the pairs' first samples followed by their second samples (``n_sides = 2``), or the second
samples alone (``n_sides = 1``, one-sided pairs and per-sample Jacobians). A module extension
therefore has two jobs: apply its transposed input-output Jacobian to the columns, and, for
layers with parameters, expose the layer's output columns and inputs in a common
``(T locations, features)`` layout from which the extensions build their quantities.
"""

from __future__ import annotations

from typing import Any

import torch
from backpack.core.derivatives.basederivatives import BaseDerivatives
from backpack.extensions.module_extension import ModuleExtension
from torch import nn


class PairModuleExtension(ModuleExtension):
    """A module extension that back-propagates the pair columns with BackPACK derivatives.

    Parameters
    ----------
    derivatives : BaseDerivatives, optional
        Provides ``jac_t_mat_prod``; ``None`` for modules that override :meth:`backpropagate`.
    params : list of str, optional
        Names of the module's parameters this extension computes quantities for.
    """

    def __init__(
        self, derivatives: BaseDerivatives | None = None, params: list[str] | None = None
    ) -> None:
        self.derivatives = derivatives
        super().__init__(params=params)

    def backpropagate(
        self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, bp: torch.Tensor
    ) -> torch.Tensor:
        """Apply the transposed Jacobian of the module to the columns ``bp``."""
        return self.derivatives.jac_t_mat_prod(module, g_inp, g_out, bp)


class ParamModuleExtension(PairModuleExtension):
    """A module extension for a layer with parameters.

    Subclasses implement :meth:`pair_gradients` (per-pair, per-column gradients of any of the
    module's parameters) and, for weights with a Kronecker structure, :meth:`weight_views`.
    The quantity itself (diagonal, Kronecker factors, factor ``V``) is chosen by the running
    extension through its ``parameter_quantity`` method.
    """

    def weight(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, bp: torch.Tensor):
        """The extension's quantity for ``module.weight``."""
        return ext.parameter_quantity(self, module, "weight", bp)

    def bias(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, bp: torch.Tensor):
        """The extension's quantity for ``module.bias``."""
        return ext.parameter_quantity(self, module, "bias", bp)

    def weight_views(
        self, ext: Any, module: nn.Module, bp: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output columns ``[R, S, M, T, out]`` and inputs ``[S, M, T, fan_in]`` of the weight.

        ``S`` is the number of pair sides and ``T`` the number of locations the weight is
        shared over (1 for a Linear layer on ``(batch, features)`` inputs).
        """
        raise NotImplementedError(
            f"{type(module).__name__}.weight has no Kronecker-factored structure."
        )

    def pair_gradients(
        self, ext: Any, module: nn.Module, name: str, bp: torch.Tensor
    ) -> torch.Tensor:
        """Per-pair gradients ``[R, M, *param.shape]`` of ``sum_side S_side^T J_side``."""
        raise NotImplementedError


class WeightBiasExtension(ParamModuleExtension):
    """Linear and convolution layers: weight gradients from ``weight_views`` via an einsum."""

    def pair_gradients(self, ext, module, name, bp):
        q, x = self.weight_views(ext, module, bp)
        if name == "bias":
            return q.sum(dim=(1, 3))
        grads = torch.einsum("rsmto,smti->rmoi", q, x)
        return grads.reshape(*grads.shape[:2], *module.weight.shape)
