"""Deprecated: moved to :mod:`laplace_metric.data.open_set` (the data family, :mod:`laplace_metric.data`)."""

from __future__ import annotations

import warnings

from laplace_metric.data import open_set as _moved

globals().update({k: v for k, v in vars(_moved).items() if not k.startswith("__")})
__all__ = list(_moved.__all__)

warnings.warn(
    "laplace_metric.datasets is deprecated; import from laplace_metric.data "
    "(laplace_metric.data.open_set) instead.",
    DeprecationWarning,
    stacklevel=2,
)
