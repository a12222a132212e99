"""Plumbing shared by the metric families: input checks and the kNN search.

Private: the public functions live in :mod:`~laplace_metric.metrics.retrieval`,
:mod:`~laplace_metric.metrics.ood`, :mod:`~laplace_metric.metrics.calibration` and
:mod:`~laplace_metric.metrics.sparsification`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pytorch-metric-learning is imported lazily: it pulls in scipy.stats
    from pytorch_metric_learning.distances import BaseDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

DistanceFn = Callable[[Tensor, Tensor], Tensor]
"""A distance ``distance(query (n, D), db (m, D)) -> (n, m)``; smaller = closer."""


# ---------------------------------------------------------------------------- validation
def _check_embeddings(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, D), got {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty.")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values.")
    return x


def _check_labels(labels: Tensor, n: int, name: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.ndim != 1:
        raise ValueError(f"{name} must have shape (n,), got {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must hold integer class ids, got dtype {labels.dtype}.")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but its embeddings have {n} rows.")
    return labels


def _check_scores(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape (n,), got {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty.")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {x.dtype}.")
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values.")
    return x


def _check_pair(query: Tensor, db: Tensor) -> None:
    if query.shape[1] != db.shape[1]:
        raise ValueError(
            f"Query embeddings have dimension {query.shape[1]} but database embeddings "
            f"have {db.shape[1]}."
        )
    if query.device != db.device:
        raise ValueError(f"Query is on {query.device} but the database is on {db.device}.")


def _check_self(query: Tensor, db: Tensor, exclude_self: bool) -> None:
    if exclude_self and (query.shape != db.shape or not torch.equal(query, db)):
        raise ValueError(
            "exclude_self=True needs the query set to be the database itself "
            "(same tensor values, same order)."
        )


# ---------------------------------------------------------------------------- kNN
class _CallableDistance:
    """Adapter that gives a plain ``distance(query, db)`` callable the interface that
    pytorch-metric-learning's ``CustomKNN`` expects (``is_inverted`` and ``__call__``)."""

    is_inverted = False

    def __init__(self, fn: DistanceFn) -> None:
        self.fn = fn

    def __call__(self, query: Tensor, db: Tensor) -> Tensor:
        mat = self.fn(query, db)
        if not isinstance(mat, Tensor) or mat.shape != (query.shape[0], db.shape[0]):
            got = tuple(mat.shape) if isinstance(mat, Tensor) else type(mat).__name__
            raise ValueError(
                f"distance(query, db) must return a ({query.shape[0]}, {db.shape[0]}) "
                f"tensor, got {got}."
            )
        if not bool(torch.isfinite(mat).all()):
            raise ValueError("distance(query, db) returned NaN or inf values.")
        return mat


def _is_pml_distance(distance: object) -> bool:
    from pytorch_metric_learning.distances import BaseDistance

    return isinstance(distance, BaseDistance)


def _knn_func(distance: DistanceFn | BaseDistance | None) -> CustomKNN:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    if distance is None:
        # pml normalises by default; we measure distances between the embeddings as given.
        distance = LpDistance(normalize_embeddings=False, p=2, power=1)
    elif not _is_pml_distance(distance):
        if not callable(distance):
            raise TypeError(
                f"distance must be a callable or a pml BaseDistance, got {type(distance).__name__}."
            )
        distance = _CallableDistance(distance)
    return CustomKNN(distance)


def _check_k(k: int, n_db: int, exclude_self: bool) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}.")
    available = n_db - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] for a database of {n_db}, got {k}.")
    return k
