"""Helpers of :class:`~laplace_metric.scores.UncertaintyScorer`: its result type, query cache,
input checks and the eval-mode guard."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from laplace_metric.encoders import eval_mode
from laplace_metric.memory import check_fits

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class PosteriorRetrieval:
    """Per-query results of :func:`posterior_retrieval` / :meth:`UncertaintyScorer.retrieval`.

    Attributes
    ----------
    knn_distance : torch.Tensor
        Mean over weight samples of the distance to the ``k``-th nearest database embedding,
        ``(n,)``; an OOD score (higher = more likely out of distribution).
    confidence : torch.Tensor
        Fraction of weight samples whose top-1 database label equals the top-1 label at the
        posterior mean, ``(n,)``; the retrieval confidence used for calibration.
    predicted : torch.Tensor
        The top-1 database label at the posterior mean, ``(n,)``.
    """

    knn_distance: torch.Tensor
    confidence: torch.Tensor
    predicted: torch.Tensor


@dataclass
class QueryCache:
    """Embeddings of the last query tensor (see :meth:`UncertaintyScorer._queries`)."""

    x: torch.Tensor
    version: int
    key: tuple
    features: torch.Tensor
    mean: torch.Tensor
    sampled: torch.Tensor | None = None


def in_eval_mode(method: _F) -> _F:
    """Run a scorer method with the encoder in eval mode, restoring every submodule's mode
    and buffer afterwards (:func:`~laplace_metric.encoders.eval_mode`)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with eval_mode(self.la.model):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_tensor(x: Any, name: str, la) -> torch.Tensor:
    """``x`` checked (a non-empty tensor batch whose floating dtype matches the model's) and
    moved to the estimator's device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty batch (n, ...), got shape {tuple(x.shape)}.")
    param = next(la.model.parameters())
    if x.is_floating_point() and x.dtype != param.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the model's parameters have dtype {param.dtype}; "
            f"cast one of them, e.g. {name}.to({param.dtype})."
        )
    return x.to(la._device)


def check_database_fits(db_mean: torch.Tensor, n_samples: int, budget: int) -> None:
    """A :class:`~laplace_metric.memory.MemoryBudgetError` before embedding the database
    ``(m, D)`` under ``n_samples`` weight samples would exceed ``budget``."""
    m, dim = db_mean.shape
    n_bytes = n_samples * m * dim * db_mean.element_size()
    fits = max(int(budget // (m * dim * db_mean.element_size())), 0)
    check_fits(
        n_bytes,
        budget,
        f"the database of {m:,} items embedded under {n_samples} weight samples ({dim}-d)",
        [
            "database_embedding='candidates' (only each query's nearest items at the "
            "posterior mean under the samples)",
            f"n_samples={fits}" if fits >= 2 else "a smaller database",
        ],
    )


__all__ = [
    "PosteriorRetrieval",
    "QueryCache",
    "check_database_fits",
    "check_tensor",
    "in_eval_mode",
]
