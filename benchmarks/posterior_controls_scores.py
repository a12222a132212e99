"""Rows of ``posterior_controls.py --scores``: the other scores of a LAM posterior, each beside
its curvature-off control (the same estimator, prior precision and weight samples).

Per configuration, besides the default score's rows: ``'sampled_std'``, ``'trace'`` and
``'variance_ratio'`` of :class:`~laplace_metric.scores.UncertaintyScorer`, and the expected
nearest-neighbour distance under the GLM predictive in closed form: the smallest, over the
training set, of the posterior mean of the squared distance ``E[|z(x) - z(x_i)|^2]``
(:meth:`la.predictive_similarity <laplace_metric.estimators.MetricLaplaceMixin.predictive_similarity>`
with ``metric='sqeuclidean'``; query-database cross-covariance included). The last uses the
covariance's shape, not only its scale; ``'variance_ratio'`` is the curvature alone (its control
is 1 for every input).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

#: The scorer's scores reported by ``--scores`` besides the default.
OTHER_SCORES = ("sampled_std", "trace", "variance_ratio")
EXPECTED_KNN = "expected kNN distance (closed form)"


def expected_knn_distance(la, x: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
    """``min_i E[|z(x) - z(x_i)|^2]`` under the estimator's GLM predictive, ``(n,)``."""
    mean, _ = la.predictive_similarity(x, database, metric="sqeuclidean", return_variance=False)
    return mean.min(1).values


def score_rows(rows: dict, name: str, la, scorer, data: dict, metrics: Callable) -> None:
    """Add the rows ``'{name}, {score}: fitted'`` and ``': curvature off'`` for every score of
    :data:`OTHER_SCORES` and the closed-form expected kNN distance; ``metrics(score_fn, data)``
    computes a row's AUROC columns."""
    from laplace_metric.controls import curvature_off

    x_tr = data["train"][0]
    for suffix, off in (("fitted", False), ("curvature off", True)):
        with curvature_off(la) if off else nullcontext():
            for score in OTHER_SCORES:
                rows[f"{name}, {score}: {suffix}"] = metrics(
                    lambda x, score=score: scorer(x, score), data
                )
            rows[f"{name}, {EXPECTED_KNN}: {suffix}"] = metrics(
                lambda x: expected_knn_distance(la, x, x_tr), data
            )
