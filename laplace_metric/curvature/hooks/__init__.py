"""The architecture-agnostic hook backend: :class:`HookPairGGN` and its predictive covariance."""

from laplace_metric.curvature.hooks.backend import (
    HookPairGGN,
    KFACApproximation,
    hooks_support_error,
)
from laplace_metric.curvature.hooks.predictive import predictive_covariance

__all__ = ["HookPairGGN", "KFACApproximation", "hooks_support_error", "predictive_covariance"]
