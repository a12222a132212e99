"""Batched, gradient-free embedding helpers shared by the baselines."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from laplace_metric.encoders import eval_mode

__all__ = ["embed", "penultimate"]


def _module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def embed(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    normalize: bool = True,
    batch_size: int = 1024,
) -> Tensor:
    """Apply an encoder (or feature function) in batches without gradients.

    Parameters
    ----------
    fn : nn.Module or callable
        Maps ``(B, ...)`` to ``(B, D)``. An ``nn.Module`` is run in its *current* mode; its
        device is used for the batches.
    x : Tensor
        Inputs ``(N, ...)``.
    normalize : bool, default=True
        L2-normalise the outputs.
    batch_size : int, default=1024

    Returns
    -------
    out : Tensor
        ``(N, D)`` on the device of ``x``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
    if x.shape[0] == 0:
        raise ValueError("x is empty.")
    device = _module_device(fn) if isinstance(fn, nn.Module) else x.device
    outs = []
    for start in range(0, x.shape[0], batch_size):
        out = fn(x[start : start + batch_size].to(device))
        if not isinstance(out, Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"The encoder must return (batch, D) tensors, got {got}.")
        outs.append(F.normalize(out, dim=-1) if normalize else out)
    out = torch.cat(outs).to(x.device)
    if not bool(torch.isfinite(out).all()):
        raise ValueError("The encoder returned NaN or inf values.")
    return out


def _eval_embed(module: nn.Module, x: Tensor, normalize: bool, batch_size: int) -> Tensor:
    """:func:`embed` in eval mode, every submodule's mode and buffer restored afterwards."""
    with eval_mode(module):
        return embed(module, x, normalize, batch_size)


@torch.no_grad()
def run_batches(module: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """``module(x)`` in batches, without gradients, on the module's device (any output shape)."""
    device = _module_device(module)
    return torch.cat(
        [module(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    )


def penultimate(encoder: nn.Sequential) -> nn.Sequential:
    """The encoder minus its last layer (penultimate features of an ``nn.Sequential``).

    Parameters
    ----------
    encoder : nn.Sequential

    Returns
    -------
    features : nn.Sequential
        Shares its modules (and weights) with ``encoder``.
    """
    if not isinstance(encoder, nn.Sequential) or len(encoder) < 2:
        raise TypeError(
            "penultimate() needs an nn.Sequential with at least two layers; "
            "pass an explicit feature_fn for other architectures."
        )
    return encoder[:-1]
