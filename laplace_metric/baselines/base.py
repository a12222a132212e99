"""The common interface of the baselines and their registry.

A baseline is fitted once on training data and then scores inputs (higher = more OOD); one that
also retrieves has ``embed``, and one that samples embeddings has ``samples``. Registering a
subclass with :func:`register_baseline` makes it available by name in :data:`BASELINES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

__all__ = ["BASELINES", "OODBaseline", "register_baseline"]


class OODBaseline(ABC):
    """An OOD scorer: ``fit`` on training data once, then ``score`` (higher = more OOD).

    Subclasses implement :meth:`fit` and :meth:`score`; those that retrieve override
    :meth:`embed`, those that draw embedding samples override :meth:`samples`.
    """

    @abstractmethod
    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> OODBaseline:
        """Fit on training inputs ``(N, ...)`` and labels ``(N,)``; returns ``self``."""

    @abstractmethod
    def score(self, x: Tensor) -> Tensor:
        """OOD score ``(n,)`` of inputs ``x``; higher = more OOD."""

    def embed(self, x: Tensor) -> Tensor:
        """Point embeddings ``(n, D)`` for retrieval (not every baseline has them)."""
        raise NotImplementedError(f"{type(self).__name__} does not embed inputs for retrieval.")

    def samples(self, x: Tensor) -> Tensor:
        """Embedding samples ``(S, n, D)`` (only for sampling baselines)."""
        raise NotImplementedError(f"{type(self).__name__} does not sample embeddings.")

    def _require_fit(self, attr: str) -> None:
        if getattr(self, attr, None) is None:
            raise RuntimeError(f"Call {type(self).__name__}.fit(x_train, y_train) first.")


BASELINES: dict[str, type[OODBaseline]] = {}
"""Registered baselines by name (filled by :func:`register_baseline`)."""

_B = TypeVar("_B", bound=type[OODBaseline])


def register_baseline(name: str) -> Callable[[_B], _B]:
    """Class decorator that registers a baseline in :data:`BASELINES` under ``name``.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``'knn_distance'``; must be new.

    Returns
    -------
    decorator : callable
        Returns the class unchanged.
    """

    def decorator(cls: _B) -> _B:
        if not (isinstance(cls, type) and issubclass(cls, OODBaseline)):
            raise TypeError(f"register_baseline needs an OODBaseline subclass, got {cls!r}.")
        if name in BASELINES and BASELINES[name] is not cls:
            raise ValueError(f"A baseline named {name!r} is already registered.")
        BASELINES[name] = cls
        return cls

    return decorator


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    return k
