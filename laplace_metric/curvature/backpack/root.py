"""The starting point of the pairwise back-propagation: injects the pairs' square-root columns.

BackPACK starts second-order back-propagation at a loss module, whose extension returns the
square root of the loss Hessian. :class:`PairRoot` plays that role for pairwise likelihoods:
its forward is a dummy scalar (so that ``backward`` runs the hooks) and its extension returns
the columns the running extension carries (``ext.root``, shape ``[R, rows, D]``).
"""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from laplace_metric.curvature.backpack.base import PairModuleExtension


class PairRoot(_Loss):
    """Dummy scalar "loss" on the encoder output of a pair batch."""

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        """Sum of the output (only its graph matters)."""
        return output.sum()


class PairRootExtension(PairModuleExtension):
    """Returns the square-root columns of the pair batch as the back-propagated quantity."""

    def backpropagate(self, ext, module, g_inp, g_out, bp):
        root = ext.root
        expected = (module.input0.shape[0], module.input0.shape[1])
        if root is None or tuple(root.shape[1:]) != expected:
            raise RuntimeError(
                f"Pair columns of shape {None if root is None else tuple(root.shape)} do not "
                f"match the encoder output {tuple(module.input0.shape)}."
            )
        return root
