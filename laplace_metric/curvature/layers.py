"""Layer helpers shared by every curvature backend: the private model copy, the pair batch and
the unfolding of a layer's input into locations.

The backends import these from here and nothing from each other.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from laplace_metric.pairs.terms import PairTerms


def private_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` for hooks, without gradients or stale hook state.

    A module that once had an old-style backward hook (ASDL registers them) keeps a flag that
    forbids full backward hooks even after the hook is removed; the copy drops that flag.
    """
    twin = copy.deepcopy(module)
    for param in twin.parameters():
        param.grad = None
    for sub in twin.modules():
        if not sub._backward_hooks and getattr(sub, "_is_full_backward_hook", None) is False:
            sub._is_full_backward_hook = None
    return twin


@torch.no_grad()
def sync_copy(module: nn.Module, twin: nn.Module) -> None:
    """Copy the parameters, ``requires_grad`` flags, buffers and modes of ``module`` to ``twin``."""
    twin_params = dict(twin.named_parameters())
    for name, param in module.named_parameters():
        target = twin_params[name]
        target.copy_(param)
        target.requires_grad_(param.requires_grad)
    twin_buffers = dict(twin.named_buffers())
    for name, buffer in module.named_buffers():
        if name in twin_buffers:
            twin_buffers[name].copy_(buffer)
    twin_modules = dict(twin.named_modules())
    for name, sub in module.named_modules():
        if name in twin_modules:
            twin_modules[name].train(sub.training)


def pair_rows(
    inputs: torch.Tensor,
    terms: PairTerms,
    chunk: slice | None = None,
    interleave: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The pair batch of (a chunk of) the pairs: its rows, their square-root factors, sides.

    Parameters
    ----------
    inputs : torch.Tensor
        The batch ``(B, *in)``.
    terms : PairTerms
    chunk : slice, optional
        The pairs to take (default: all).
    interleave : bool, default=False
        Rows ``[x_a1, x_b1, x_a2, ...]`` (each pair's rows adjacent) instead of
        ``cat([x_a, x_b])``.

    Returns
    -------
    rows : torch.Tensor
        ``(S M, *in)``, or ``x_b`` alone (``(M, *in)``) if the terms are one-sided.
    factor : torch.Tensor
        The rows' factors ``(S M, D, R)`` in the same order.
    sides : int
        ``S``: 2, or 1 if one-sided.
    """
    chunk = slice(None) if chunk is None else chunk
    first, second = terms.pairs.first[chunk], terms.pairs.second[chunk]
    if terms.one_sided:
        return inputs[second], terms.second_factor[chunk], 1
    if interleave:
        rows = torch.stack([inputs[first], inputs[second]], dim=1).flatten(end_dim=1)
        factor = torch.stack([terms.first_factor[chunk], terms.second_factor[chunk]], dim=1)
        return rows, factor.flatten(end_dim=1), 2
    rows = torch.cat([inputs[first], inputs[second]])
    return rows, torch.cat([terms.first_factor[chunk], terms.second_factor[chunk]]), 2


def conv_unsupported_reason(layer: nn.Module) -> str | None:
    """Why a convolution cannot be unfolded into locations (:func:`unfold_input`), or ``None``."""
    if layer.groups != 1:
        return f"groups={layer.groups}"
    if layer.padding_mode != "zeros":
        return f"padding_mode='{layer.padding_mode}'"
    if isinstance(layer.padding, str) and layer.padding != "valid":
        return f"padding='{layer.padding}'"
    return None


def unfold_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear or Conv1d/Conv2d input as ``(batch, T, fan_in)``, matching ``weight.flatten(1)``.

    Raises
    ------
    ValueError
        For a convolution with groups, non-zero padding modes or string padding other than
        ``'valid'``.
    """
    if isinstance(layer, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    reason = conv_unsupported_reason(layer)
    if reason is not None:
        raise ValueError(
            f"Kronecker factors and location folds support {type(layer).__name__} with "
            f"groups=1 and zero padding only, not {reason}; use 'diag' or 'full' with "
            "ReferencePairGGN."
        )
    padding = (0,) * len(layer.kernel_size) if isinstance(layer.padding, str) else layer.padding
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride = (1, layer.kernel_size[0]), (1, layer.stride[0])
        padding, dilation = (0, padding[0]), (1, layer.dilation[0])
    else:
        kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
