"""Uncertainty scores of a fitted Laplace posterior: one entry point, named scores.

:class:`UncertaintyScorer` is the entry point. It draws one fixed set of weight samples from the
posterior and scores queries by any of the :class:`PosteriorScore` options::

    scorer = UncertaintyScorer(la, database=x_train)
    s = scorer(x_test)                    # 'posterior_knn', the default
    s = scorer(x_test, "sampled_std")     # LAM's score
    s = scorer(x_test, "trace")           # trace of the linearised covariance
    s = scorer(x_test, "variance_ratio")  # that trace over the prior's: the curvature alone
    s = scorer(x_test, "knn_variance_ratio")  # 'posterior_knn' times 'variance_ratio'

The default, ``'posterior_knn'``, re-embeds both the queries *and* the database under each weight
sample, so that what is measured is how far a query stays from its neighbours when the encoder
varies as the posterior allows: in-distribution queries move with their neighbours,
out-of-distribution queries do not. The database embeddings are computed once per weight sample
and cached, so repeated queries (test set, OOD sets, batches) do not re-embed it; the cache is
dropped when the posterior changes (a new fit or prior precision). For galleries too large to
embed ``n_samples`` times, ``UncertaintyScorer(..., database_embedding='candidates')`` embeds
the database once at the posterior mean and, under the samples, only each query's nearest
items there (:mod:`laplace_metric.scores.candidates`).

Why not the trace? On the unit sphere the linearised covariance is
``P J Sigma J^T P / ||g||^2`` with ``P = I - z z^T``: its trace is dominated by the
``1 / ||g(x)||^2`` factor of the normalisation. On the digits split held-out digits have small
``||g||`` (flagged) and uniform noise has large ``||g||`` (looks *certain*); the trace without
that factor flags noise (AUROC 1.00) but no longer held-out digits (0.26-0.51). See
``docs/uncertainty.rst`` for the measurements.

Each score is one module holding a :class:`~laplace_metric.scores.base.Score` subclass decorated
by ``@register_score("name")``; importing the module (one line below) registers it in
:data:`~laplace_metric.scores.base.SCORES`, and :class:`UncertaintyScorer` then accepts the name.
"""

# the scores: importing a module registers its score (one line per score)
from laplace_metric.scores import (  # noqa: F401
    knn_variance_ratio,
    posterior_knn,
    sampled_std,
    trace,
    variance_ratio,
)
from laplace_metric.scores.base import SCORES, PosteriorScore, ProductScore, Score, register_score
from laplace_metric.scores.oneshot import posterior_retrieval
from laplace_metric.scores.scorer import PosteriorRetrieval, UncertaintyScorer

__all__ = [
    "SCORES",
    "PosteriorRetrieval",
    "PosteriorScore",
    "ProductScore",
    "Score",
    "UncertaintyScorer",
    "posterior_retrieval",
    "register_score",
]
