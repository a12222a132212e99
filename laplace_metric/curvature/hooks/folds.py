"""Deprecated: the hook backend's folds are :mod:`laplace_metric.curvature.folds`, shared by
every backend (``structure``/``Structure`` are ``fold_plan``/``FoldPlan`` there).

Every name still resolves here, with a :class:`DeprecationWarning` naming its new home.
"""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = {
    "Structure": "FoldPlan",
    "structure": "fold_plan",
    "fold_diag": "fold_diag",
    "fold_gram": "fold_gram",
    "fold_input_factor": "fold_input_factor",
    "fold_output_factor": "fold_output_factor",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from laplace_metric.curvature import folds

    warnings.warn(
        f"laplace_metric.curvature.hooks.folds.{name} is deprecated; use "
        f"laplace_metric.curvature.folds.{_MOVED[name]}.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(folds, _MOVED[name])


def __dir__() -> list[str]:
    return sorted(_MOVED)
