"""Which models the pairwise BackPACK extensions support."""

from __future__ import annotations

from backpack.custom_module.branching import SumModule, _Branch
from backpack.custom_module.scale_module import ScaleModule
from torch import nn

from laplace_metric.curvature.backpack.extensions import SUPPORTED_MODULES
from laplace_metric.curvature.layers import conv_unsupported_reason

#: Containers BackPACK treats as no-ops (their children are extended).
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why one leaf module is not supported, or ``None`` if it is."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        reason = conv_unsupported_reason(module)
        return None if reason is None else f"{type(module).__name__}({reason})"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not module.track_running_stats:
        return f"{type(module).__name__}(track_running_stats=False)"
    if type(module) in SUPPORTED_MODULES or isinstance(module, (SumModule, ScaleModule, _Branch)):
        return None
    return type(module).__name__


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names (``'path: Layer'``) of the leaf modules the pairwise extensions cannot handle.

    Only leaf modules are inspected; custom containers are traced by BackPACK's converter,
    which reports functional operations it cannot handle when the backend is built.
    """
    found = []
    for name, sub in model.named_modules():
        if any(True for _ in sub.children()):
            continue
        reason = unsupported_reason(sub)
        if reason is not None:
            found.append(f"'{name or type(model).__name__}' ({reason})")
    return found


def needs_converter(model: nn.Module) -> bool:
    """Whether the model has containers other than plain ``Sequential`` ones (a custom
    ``forward``, e.g. a residual block), which need BackPACK's graph converter."""
    for sub in model.modules():
        has_children = any(True for _ in sub.children())
        if has_children and not isinstance(sub, CONTAINERS):
            return True
    return False
