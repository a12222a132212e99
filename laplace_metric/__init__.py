"""laplace-metric: Bayesian metric learning for laplace-torch.

Importing the package registers the pairwise likelihoods with ``laplace.Laplace``::

    import laplace_metric  # noqa: F401
    from laplace import Laplace

    la = Laplace(encoder, likelihood="contrastive", subset_of_weights="all",
                 hessian_structure="diag")
"""

import warnings as _warnings

# laplace-torch imports ASDL, whose module-level ``torch.jit.script`` raises a FutureWarning on
# torch >= 2.10 that users cannot act on; silence it for this import only.
with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    import laplace as _laplace  # noqa: F401

from laplace_metric import host_version as _host_version  # noqa: E402, F401  (checks laplace-torch)
from laplace_metric import registry as _registry  # noqa: E402
from laplace_metric.curvature import (
    AsdlPairGGN,
    BackPackPairGGN,
    HookPairGGN,
    PairCurvatureInterface,
    ReferencePairGGN,
    default_backend,
)
from laplace_metric.encoders import SelectOutput, check_encoder_output
from laplace_metric.enums import (
    CovarianceScore,
    DatabaseEmbedding,
    HessianMethod,
    MetricLikelihood,
    SelectionCriterion,
)
from laplace_metric.estimators import (
    ESTIMATORS,
    MetricDiagLaplace,
    MetricDiagLLLaplace,
    MetricDiagSubnetLaplace,
    MetricFullLaplace,
    MetricFullLLLaplace,
    MetricFullSubnetLaplace,
    MetricKronLaplace,
    MetricKronLLLaplace,
    MetricLaplaceMixin,
)
from laplace_metric.likelihoods import (
    BregmanLikelihood,
    ContrastiveLikelihood,
    PairLikelihood,
    build_likelihood,
)
from laplace_metric.memory import MemoryBudgetError
from laplace_metric.metrics.pair_nll import PositivePairGaussianNLL
from laplace_metric.mining import PairBudgetMiner, Pairs, mine_pairs
from laplace_metric.registry import metric_laplace
from laplace_metric.scores import (
    PosteriorRetrieval,
    PosteriorScore,
    UncertaintyScorer,
    posterior_retrieval,
)
from laplace_metric.selection import PosteriorConfig, PosteriorSelection, select_posterior
from laplace_metric.training import fit_online_lam
from laplace_metric.uncertainty import covariance_score

__version__ = "0.1.0"

_registry.install()

__all__ = [
    "AsdlPairGGN",
    "BackPackPairGGN",
    "BregmanLikelihood",
    "ContrastiveLikelihood",
    "CovarianceScore",
    "DatabaseEmbedding",
    "ESTIMATORS",
    "HookPairGGN",
    "HessianMethod",
    "MemoryBudgetError",
    "MetricDiagLLLaplace",
    "MetricDiagLaplace",
    "MetricDiagSubnetLaplace",
    "MetricFullLLLaplace",
    "MetricFullLaplace",
    "MetricFullSubnetLaplace",
    "MetricKronLLLaplace",
    "MetricKronLaplace",
    "MetricLaplaceMixin",
    "MetricLikelihood",
    "PairBudgetMiner",
    "PairCurvatureInterface",
    "PairLikelihood",
    "Pairs",
    "PositivePairGaussianNLL",
    "PosteriorConfig",
    "PosteriorRetrieval",
    "PosteriorScore",
    "PosteriorSelection",
    "ReferencePairGGN",
    "SelectOutput",
    "SelectionCriterion",
    "UncertaintyScorer",
    "build_likelihood",
    "check_encoder_output",
    "covariance_score",
    "default_backend",
    "fit_online_lam",
    "posterior_retrieval",
    "metric_laplace",
    "mine_pairs",
    "select_posterior",
]

#: Former public names, kept as deprecated aliases: ``{old: (new name, object)}``.
_DEPRECATED = {
    "UncertaintyScore": ("CovarianceScore", CovarianceScore),
    "uncertainty_score": ("covariance_score", covariance_score),
}


def __getattr__(name: str) -> object:
    if name in _DEPRECATED:
        import warnings

        new, obj = _DEPRECATED[name]
        warnings.warn(
            f"laplace_metric.{name} is deprecated; use laplace_metric.{new} (same object).",
            DeprecationWarning,
            stacklevel=2,
        )
        return obj
    raise AttributeError(f"module 'laplace_metric' has no attribute {name!r}")
