"""Rows of ``posterior_controls.py --scores``: the other scores of a LAM posterior, each beside
its curvature-off control (the same estimator, prior precision and weight samples).

Per configuration, besides the default score's rows: ``'sampled_std'``, ``'trace'``,
``'variance_ratio'`` and ``'knn_variance_ratio'`` of
:class:`~laplace_metric.scores.UncertaintyScorer`, and the expected nearest-neighbour distance
under the GLM predictive in closed form: the smallest, over the training set, of the posterior
mean of the squared distance ``E[|z(x) - z(x_i)|^2]``
(:meth:`la.predictive_similarity <laplace_metric.estimators.MetricLaplaceMixin.predictive_similarity>`
with ``metric='sqeuclidean'``; query-database cross-covariance included). The last two use the
covariance's shape, not only its scale; ``'variance_ratio'`` is the curvature alone (its control
is 1 for every input), and ``'knn_variance_ratio'``'s control is the default score.

``--scores`` with no names computes all of them on digits and only the two ratio scores on
images (FashionMNIST, LAM's CNN): the others were measured before, and the closed form's
cross-covariances with thousands of database images are out of reach on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

#: The scorer's scores reported by ``--scores`` besides the default.
OTHER_SCORES = ("sampled_std", "trace", "variance_ratio", "knn_variance_ratio")
#: The subset computed on images.
IMAGE_SCORES = ("variance_ratio", "knn_variance_ratio")
EXPECTED_KNN = "expected kNN distance (closed form)"
#: The names ``--scores`` accepts (``expected_knn``: the closed form, digits only).
ALL_OTHER = (*OTHER_SCORES, "expected_knn")


def chosen_scores(names: list[str] | None, image: bool) -> tuple[str, ...]:
    """The scores of ``--scores [SCORE ...]``: none without the flag, all (of the data set's)
    with no names; an unknown name, or the closed form on images, is an error."""
    if names is None:
        return ()
    if not names:
        return IMAGE_SCORES if image else ALL_OTHER
    unknown = sorted(set(names) - set(ALL_OTHER))
    if unknown:
        raise SystemExit(f"--scores: unknown {unknown}; choose from {list(ALL_OTHER)}")
    if image and "expected_knn" in names:
        raise SystemExit("--scores: the closed-form expected kNN distance is digits only")
    return tuple(names)


def expected_knn_distance(la, x: torch.Tensor, database: torch.Tensor) -> torch.Tensor:
    """``min_i E[|z(x) - z(x_i)|^2]`` under the estimator's GLM predictive, ``(n,)``."""
    mean, _ = la.predictive_similarity(x, database, metric="sqeuclidean", return_variance=False)
    return mean.min(1).values


def _scores_of_inputs(scorer, data: dict, names: tuple[str, ...], knn: dict) -> dict:
    """Input set -> score name -> ``(n,)``. ``'knn_variance_ratio'`` is assembled from the
    default score's values ``knn`` (already computed for the row beside it, same samples) and
    ``'variance_ratio'``, as the registered product score does, without sampling the queries
    again."""
    from laplace_metric.scores.base import multiply

    own = [n for n in names if n != "knn_variance_ratio"]
    if "knn_variance_ratio" in names and "variance_ratio" not in own:
        own.append("variance_ratio")
    out = {}
    for key, x in data["inputs"].items():
        values = scorer.scores(x, own)
        if "knn_variance_ratio" in names:
            values["knn_variance_ratio"] = multiply([knn[key], values["variance_ratio"]])
        out[key] = values
    return out


def score_rows(rows: dict, name: str, la, scorer, data: dict, metrics: Callable) -> None:
    """Add the rows ``'{name}, {score}: fitted'`` and ``': curvature off'`` for every score of
    ``data['other_scores']`` (names of :data:`ALL_OTHER`; ``'expected_knn'`` is the closed-form
    expected kNN distance). ``metrics(scores, data)`` computes a row's AUROC columns from a
    mapping input set -> scores; ``rows[f'{name}: {suffix}']['per_input']`` holds the default
    score's values of each input set."""
    from laplace_metric.controls import curvature_off

    names = tuple(n for n in data["other_scores"] if n in OTHER_SCORES)
    closed_form = "expected_knn" in data["other_scores"]
    x_tr = data["train"][0]
    for suffix, off in (("fitted", False), ("curvature off", True)):
        knn = rows[f"{name}: {suffix}"]["per_input"]
        with curvature_off(la) if off else nullcontext():
            values = _scores_of_inputs(scorer, data, names, knn)
            for score in names:
                per_input = {key: v[score] for key, v in values.items()}
                rows[f"{name}, {score}: {suffix}"] = metrics(per_input, data)
            if closed_form:
                rows[f"{name}, {EXPECTED_KNN}: {suffix}"] = metrics(
                    lambda x: expected_knn_distance(la, x, x_tr), data
                )
