"""Options of laplace-metric, as string enums in the style of ``laplace.utils.enums``."""

from __future__ import annotations

from enum import Enum


class MetricLikelihood(str, Enum):
    """Pairwise likelihoods added to ``laplace.Laplace`` by this package."""

    CONTRASTIVE = "contrastive"
    """Contrastive loss on (by default L2-normalised) embeddings (LAM)."""

    BREGMAN = "bregman"
    """Contrastive loss on a learned Bregman divergence."""


class HessianMethod(str, Enum):
    """How the indefinite pairwise Hessian is made positive semi-definite (LAM)."""

    POSITIVES = "positives"
    """Keep the positive pairs only: PSD by construction."""

    FIXED = "fixed"
    """Hessian w.r.t. the second embedding of each pair only, signed, then projected to PSD."""

    FULL = "full"
    """Exact signed pairwise GGN over both embeddings, then projected to PSD."""


class LikelihoodScale(str, Enum):
    """How many pairs the fitted pairwise likelihood (curvature and loss) stands for."""

    BATCH = "batch"
    """The pairs the batches offered, ``sum_b B_b (B_b - 1) / 2`` (the curvature as summed)."""

    DATASET = "dataset"
    """All ``N (N - 1) / 2`` pairs of the fitted data set (LAM's convention, up to ordering):
    curvature and loss are rescaled by ``N (N - 1) / sum_b B_b (B_b - 1)``."""

    COMPOSITE = "composite"
    """All pairs with the composite-likelihood magnitude adjustment ``1 / (N - 1)``: every
    sample enters ``N - 1`` of the ``N (N - 1) / 2`` pairs, so the all-pairs likelihood counts
    each sample's information ``N - 1`` times; adjusted, the likelihood stands for ``N / 2``
    pairs, i.e. each sample is counted once (see ``docs/mathematics.rst``)."""


class CovarianceScore(str, Enum):
    """Reductions of a predictive covariance to one uncertainty number per input.

    Used by :func:`laplace_metric.uncertainty.covariance_score` and
    ``predictive_uncertainty``; not to be confused with
    :class:`~laplace_metric.scores.PosteriorScore`, the scores of ``UncertaintyScorer``
    (whose ``TRACE`` is this ``TRACE`` of the linearised predictive).
    """

    TRACE = "trace"
    """Trace of the predictive covariance, ``sum_d Var[z_d]``."""

    STD_SUM = "std_sum"
    """Sum of the per-dimension predictive standard deviations."""

    LOGDET = "logdet"
    """Log-determinant of the predictive covariance plus a small jitter."""


class SelectionCriterion(str, Enum):
    """What :func:`laplace_metric.selection.select_posterior` chooses a posterior by."""

    ECE = "ece"
    """Expected calibration error of the top-1 retrieval confidence of validation queries
    (lower is better; needs only labels)."""

    AUROC = "auroc"
    """AUROC of the default score between validation queries and an OOD proxy such as uniform
    noise (higher is better)."""


class DatabaseEmbedding(str, Enum):
    """How :class:`~laplace_metric.scores.UncertaintyScorer` embeds its database under the
    weight samples."""

    PER_SAMPLE = "per_sample"
    """The whole database under every weight sample, like the queries (the default): a query
    is compared with neighbours that move with the same weights. ``n_samples`` forward passes
    and embeddings per database item, cached across calls."""

    CANDIDATES = "candidates"
    """The database once at the posterior mean; under the weight samples only each query's
    ``n_candidates`` nearest items at the mean (the same distance whenever a sample's nearest
    item is among them, an upper bound otherwise). For large galleries under all-layer
    posteriors, where the per-sample database dominates time and memory."""


#: The former name of :class:`CovarianceScore` (kept; ``laplace_metric.UncertaintyScore`` warns).
UncertaintyScore = CovarianceScore


def parse_enum(enum_cls: type[Enum], value: object, name: str) -> Enum:
    """Convert ``value`` to a member of ``enum_cls`` or raise a clear ``ValueError``.

    Parameters
    ----------
    enum_cls : type[Enum]
        The enum to convert to.
    value : object
        A member or its string value.
    name : str
        The argument name, used in the error message.

    Returns
    -------
    member : Enum
    """
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"Unknown {name} {value!r}; choose one of {choices}.") from None
