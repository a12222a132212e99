"""Which models :class:`~laplace_metric.curvature.hooks.HookPairGGN` supports."""

from __future__ import annotations

from torch import nn

from laplace_metric.curvature.hooks.sites import batchnorm_reason, conv_site_reason


def hooks_support_error(model: nn.Module, structure: str = "diag") -> str | None:
    """Why :class:`HookPairGGN` cannot handle ``model`` for ``structure`` (``None`` if it can)."""
    params = dict(model.named_parameters())
    site_params: set[str] = set()
    for prefix, sub in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            if not sub.track_running_stats:
                return f"'{prefix}': {batchnorm_reason(sub)}"
        if isinstance(sub, nn.MultiheadAttention):
            site_params |= {f"{dot}in_proj_weight", f"{dot}in_proj_bias"}
        hookable = isinstance(sub, (nn.Linear, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d))
        if isinstance(sub, (nn.Conv1d, nn.Conv2d)) and conv_site_reason(sub) is None:
            hookable = True
        if hookable:
            site_params |= {f"{dot}weight", f"{dot}bias"}
    if structure == "kron":
        for name, param in params.items():
            if (
                param.requires_grad
                and name not in site_params
                and param.ndim >= 2
                and param.shape[0] != 1
            ):
                return (
                    f"Kronecker structure does not support the {param.ndim}-D parameter "
                    f"'{name}' (not a Linear/Conv weight)"
                )
    return None
