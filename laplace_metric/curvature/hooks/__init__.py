"""The architecture-agnostic hook backend: :class:`HookPairGGN` and its predictive covariance."""

from laplace_metric.curvature.hooks.backend import HookPairGGN
from laplace_metric.curvature.hooks.kron import KFACApproximation
from laplace_metric.curvature.hooks.predictive import predictive_covariance
from laplace_metric.curvature.hooks.support import hooks_support_error

__all__ = ["HookPairGGN", "KFACApproximation", "hooks_support_error", "predictive_covariance"]
