"""Deprecated: moved to :mod:`laplace_metric.data.idx` (the data family, :mod:`laplace_metric.data`)."""

from __future__ import annotations

import warnings

from laplace_metric.data import idx as _moved

globals().update({k: v for k, v in vars(_moved).items() if not k.startswith("__")})
__all__ = list(_moved.__all__)

warnings.warn(
    "laplace_metric.idx is deprecated; import from laplace_metric.data "
    "(laplace_metric.data.idx) instead.",
    DeprecationWarning,
    stacklevel=2,
)
