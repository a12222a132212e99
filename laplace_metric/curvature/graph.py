"""Deprecated: the pair graph moved to :mod:`laplace_metric.pairs`, its folds to
:mod:`laplace_metric.curvature.folds`.

Every name still resolves here, with a :class:`DeprecationWarning` naming its new home.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "PairGraph": "laplace_metric.pairs.graph",
    "Bucket": "laplace_metric.curvature.folds",
    "FOLD_CHUNK_ELEMENTS": "laplace_metric.curvature.folds",
    "SMALL_COMPONENT": "laplace_metric.curvature.folds",
    "component_buckets": "laplace_metric.curvature.folds",
    "fold_diag": "laplace_metric.curvature.folds",
    "fold_gram": "laplace_metric.curvature.folds",
    "fold_input_factor": "laplace_metric.curvature.folds",
    "fold_linear": "laplace_metric.curvature.folds",
    "fold_output_factor": "laplace_metric.curvature.folds",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = _MOVED[name]
    warnings.warn(
        f"laplace_metric.curvature.graph.{name} is deprecated; import it from {home}.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted(_MOVED)
