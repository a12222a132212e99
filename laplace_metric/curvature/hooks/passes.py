"""One chunk of back-propagated columns, as the hook backend hands it to its folds.

:class:`~laplace_metric.curvature.hooks.HookPairGGN` runs the passes; the diagonal, Kronecker
and predictive code (:mod:`~laplace_metric.curvature.hooks.diag`,
:mod:`~laplace_metric.curvature.hooks.kron`, :mod:`~laplace_metric.curvature.hooks.predictive`)
only read :class:`ColumnPass` objects and never the backend itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from laplace_metric.curvature.hooks.sites import Site, bias_grads, weight_grads

#: One recorded weight or bias: the calls (site, output gradients ``[c, B, T, out]``).
Entries = list[tuple[Site, torch.Tensor]]


@dataclass
class ColumnPass:
    """The site gradients of one chunk of ``c`` back-propagated columns.

    Attributes
    ----------
    twin : torch.nn.Module
        The backend's private copy of the model (the same object for every pass of a call).
    sites : list of Site
    entries : dict
        Parameter name -> the calls that use it with their gradients ``[c, B, T, out]``.
    others : dict
        Parameter name -> per-sample gradients ``[c, B, *shape]`` (``torch.func``) of the
        parameters that no site covers.
    """

    twin: nn.Module
    sites: list[Site]
    entries: dict[str, Entries]
    others: dict[str, torch.Tensor]

    def named_params(self) -> list[tuple[str, torch.Tensor]]:
        """The inferred parameters (``requires_grad``) of the private copy, in model order."""
        return inferred_params(self.twin)

    def param_grads(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients ``[c, B, *shape]`` of one parameter (one block; small only)."""
        if name in self.others:
            return self.others[name]
        calls = self.entries[name]
        site = calls[0][0]
        c, b = calls[0][1].shape[:2]
        if name == site.bias:
            return bias_grads(calls).reshape(c, b, *param.shape)
        return weight_grads(calls).reshape(c, b, *param.shape)

    def all_grads(self) -> torch.Tensor:
        """Per-sample factors ``u`` of all inferred parameters, ``[c, B, P]``."""
        params = self.named_params()
        blocks = [
            self.param_grads(n, p).flatten(start_dim=2)
            if n in self.others or n in self.entries
            else None
            for n, p in params
        ]
        shape = next(b.shape[:2] for b in blocks if b is not None)
        return torch.cat(
            [
                b if b is not None else p.new_zeros(*shape, p.numel())
                for b, (_, p) in zip(blocks, params)
            ],
            dim=2,
        )


def inferred_params(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of the parameters of ``module`` that require gradients."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def row_slices(n_rows: int, per_row: int, max_elements: int) -> list[slice]:
    """Blocks of rows of ``per_row`` elements each holding at most ``max_elements``."""
    step = max(1, max_elements // max(per_row, 1))
    return [slice(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]
