"""Controls for uncertainty claims: the same fitted estimator with its curvature switched off.

A Laplace posterior's uncertainty has two sources: the prior (isotropic weight noise of
precision ``prior_precision``) and the curvature of the likelihood, which removes noise from
the directions the data constrain. :func:`curvature_off` keeps everything else (the mean, the
prior precision, the weight-sample seed, the score) and sets the curvature's factor to zero,
so the posterior becomes the prior; the difference between a score computed inside and outside
the context is what the curvature adds. Report it beside every uncertainty figure.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["curvature_off", "without_curvature"]


def _check_estimator(la: Any) -> None:
    if not hasattr(la, "pair_likelihood") or not hasattr(la, "temperature"):
        raise TypeError(
            f"curvature_off needs a laplace-metric estimator (built by laplace.Laplace with "
            f"likelihood='contrastive' or 'bregman'), got {type(la).__name__}."
        )
    la._check_fitted()


@contextmanager
def curvature_off(la: Any) -> Iterator[Any]:
    """Context in which the fitted estimator ``la`` is its prior: curvature factor zero.

    Inside, ``temperature`` is infinite, so the posterior precision is the prior precision
    alone (exactly: the curvature is multiplied by ``1 / inf = 0``); the mean, the prior
    precision and everything else are unchanged. On exit the temperature is restored. Cached
    posterior factors are dropped on entry and exit, and an
    :class:`~laplace_metric.scores.UncertaintyScorer` re-draws its database embeddings when the
    curvature factor changes, so one scorer (same weight-sample seed) serves both sides.

    Parameters
    ----------
    la : MetricLaplaceMixin
        A fitted laplace-metric estimator.

    Yields
    ------
    la : MetricLaplaceMixin
        The same estimator, with its curvature off.

    Examples
    --------
    >>> scorer = UncertaintyScorer(la, database=x_train)     # doctest: +SKIP
    >>> fitted = scorer(x_test)                              # doctest: +SKIP
    >>> with curvature_off(la):                              # doctest: +SKIP
    ...     control = scorer(x_test)
    """
    _check_estimator(la)
    previous = la.temperature
    la.temperature = math.inf
    try:
        yield la
    finally:
        la.temperature = previous


def without_curvature(la: Any) -> Any:
    """A copy of the fitted estimator ``la`` whose posterior is its prior (the control).

    The copy shares the model and every tensor with ``la`` (nothing is re-fitted or
    duplicated) and has an infinite temperature, so its curvature factor is zero. Use it where
    both estimators must live side by side (e.g. two :class:`UncertaintyScorer` s); use
    :func:`curvature_off` to switch ``la`` itself.

    Parameters
    ----------
    la : MetricLaplaceMixin
        A fitted laplace-metric estimator.

    Returns
    -------
    control : MetricLaplaceMixin
    """
    _check_estimator(la)
    control = copy.copy(la)
    control.temperature = math.inf
    return control
