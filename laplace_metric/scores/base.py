"""The interface of an uncertainty score, the registry of scores and the built-in names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar, TypeVar

import torch

__all__ = [
    "SCORES",
    "PosteriorScore",
    "ProductScore",
    "Score",
    "multiply",
    "parse_score",
    "register_score",
]


class PosteriorScore(str, Enum):
    """Uncertainty scores of :class:`UncertaintyScorer` (higher = less certain)."""

    POSTERIOR_KNN = "posterior_knn"
    """Mean over weight samples of the distance to the ``k``-th nearest database embedding,
    queries and database re-embedded under each sample (the default; needs a database)."""

    SAMPLED_STD = "sampled_std"
    """LAM's score: sum over dimensions of the standard deviation of the sampled (normalised)
    embeddings, ``sum_d std_s[z_d(x; theta_s)]``."""

    TRACE = "trace"
    """Trace of the linearised (GLM) predictive covariance, ``tr(J Sigma J^T)``; the classic
    Laplace score, measured to fail on uniform noise (see :mod:`laplace_metric.scores`)."""

    VARIANCE_RATIO = "variance_ratio"
    """``tr(J Sigma J^T) / tr(J Sigma_0 J^T)``: the share of the prior's predictive variance
    that the fitted curvature leaves (its curvature-off control is 1 for every input); a
    diagnostic of what the curvature alone knows, not a replacement for the default."""

    KNN_VARIANCE_RATIO = "knn_variance_ratio"
    """``'posterior_knn'`` times ``'variance_ratio'``: the distance to the nearest database
    embedding, shrunk where the curvature constrains the query's embedding (needs a database;
    its curvature-off control is ``'posterior_knn'``)."""


class Score(ABC):
    """An uncertainty score of :class:`~laplace_metric.scores.UncertaintyScorer` (higher = less
    certain), computed from the scorer's shared weight samples.

    Subclasses set the class flags and implement :meth:`__call__`; the scorer draws the samples
    only when one of the requested scores needs them.
    """

    needs_samples: ClassVar[bool] = False
    """Whether :meth:`__call__` uses ``sampled``, the queries embedded under each weight sample."""

    needs_database: ClassVar[bool] = False
    """Whether the score needs the scorer's database (embedded under the same samples)."""

    @abstractmethod
    def __call__(self, scorer: Any, x: torch.Tensor, sampled: torch.Tensor | None) -> torch.Tensor:
        """Scores ``(n,)`` of the checked queries ``x``; ``sampled`` is ``(S, n, D)`` or None.

        ``scorer`` is the calling :class:`~laplace_metric.scores.UncertaintyScorer` (typed
        ``Any`` here so that this module does not import the scorer's).
        """


class ProductScore(Score):
    """A score that is the product of other registered scores (:attr:`factors`).

    :meth:`UncertaintyScorer.scores <laplace_metric.scores.UncertaintyScorer.scores>` computes
    each factor once per call, so requesting a product beside its factors costs nothing more.
    """

    factors: ClassVar[tuple[str, ...]] = ()
    """Names of the registered scores multiplied."""

    def __call__(self, scorer: Any, x: torch.Tensor, sampled: torch.Tensor | None) -> torch.Tensor:
        """The product of the factors' scores, ``(n,)``."""
        return multiply([SCORES[name]()(scorer, x, sampled) for name in self.factors])


def multiply(values: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise product of score tensors, in the first one's dtype and device."""
    product = values[0]
    for value in values[1:]:
        product = product * value.to(product)
    return product


SCORES: dict[str, type[Score]] = {}
"""Registered scores by name (filled by :func:`register_score`)."""

_S = TypeVar("_S", bound=type[Score])


def register_score(name: str) -> Callable[[_S], _S]:
    """Class decorator that registers a score in :data:`SCORES` under ``name``.

    Parameters
    ----------
    name : str
        The name :class:`~laplace_metric.scores.UncertaintyScorer` accepts; must be new.

    Returns
    -------
    decorator : callable
        Returns the class unchanged.
    """

    def decorator(cls: _S) -> _S:
        if not (isinstance(cls, type) and issubclass(cls, Score)):
            raise TypeError(f"register_score needs a Score subclass, got {cls!r}.")
        if name in SCORES and SCORES[name] is not cls:
            raise ValueError(f"A score named {name!r} is already registered.")
        SCORES[name] = cls
        return cls

    return decorator


def parse_score(score: PosteriorScore | str) -> str:
    """The registered name of ``score`` (a :class:`PosteriorScore` or a string).

    Parameters
    ----------
    score : PosteriorScore or str

    Returns
    -------
    name : str

    Raises
    ------
    ValueError
        If no score of that name is registered.
    """
    name = score.value if isinstance(score, Enum) else score
    if not isinstance(name, str) or name not in SCORES:
        choices = ", ".join(repr(n) for n in SCORES)
        raise ValueError(f"Unknown score {score!r}; choose one of {choices}.")
    return name
