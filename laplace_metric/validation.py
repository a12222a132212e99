"""Deprecated: the prior-precision objective moved to :mod:`laplace_metric.metrics.pair_nll`.

(``validation`` named a prior objective, not input validation.)
"""

from __future__ import annotations

import warnings

from laplace_metric.metrics.pair_nll import PositivePairGaussianNLL

warnings.warn(
    "laplace_metric.validation is deprecated; import PositivePairGaussianNLL from "
    "laplace_metric.metrics (or laplace_metric) instead.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["PositivePairGaussianNLL"]
