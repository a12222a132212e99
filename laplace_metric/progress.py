"""Progress bars for long work: on by default in a terminal, quiet otherwise or when asked.

Every long-running entry point (``fit``, ``optimize_prior_precision``,
:class:`~laplace_metric.scores.UncertaintyScorer` scores and retrieval) takes
``progress_bar``:

* ``None`` (the default): a tqdm bar with a total, shown only when standard error is a terminal
  and only once the work has run for :data:`DELAY_S` seconds, so short calls stay silent;
* ``True``: always shown, from the start;
* ``False``: never shown.

Setting the environment variable ``LAPLACE_METRIC_PROGRESS=0`` silences the default bars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["DELAY_S", "progress", "progress_enabled"]

#: Seconds of work before a default (``progress_bar=None``) bar appears.
DELAY_S = 3.0

_T = TypeVar("_T")


def progress_enabled(progress_bar: bool | None) -> bool:
    """Whether a bar is shown: ``progress_bar`` if given, else whether stderr is a terminal
    (and ``LAPLACE_METRIC_PROGRESS`` is not ``0``).

    Parameters
    ----------
    progress_bar : bool or None

    Returns
    -------
    enabled : bool
    """
    if progress_bar is not None:
        if not isinstance(progress_bar, bool):
            raise TypeError(f"progress_bar must be True, False or None, got {progress_bar!r}.")
        return progress_bar
    if os.environ.get("LAPLACE_METRIC_PROGRESS", "").strip() in {"0", "false", "False"}:
        return False
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress(
    iterable: Iterable[_T] | None = None,
    *,
    total: int | None = None,
    desc: str,
    progress_bar: bool | None = None,
    **kwargs: Any,
) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one, with ``total``), following
    :func:`progress_enabled`; a default bar waits :data:`DELAY_S` seconds before it shows.

    Parameters
    ----------
    iterable : iterable, optional
    total : int, optional
        Number of steps; read from ``len(iterable)`` when it has one.
    desc : str
        Label of the bar.
    progress_bar : bool or None, default=None
    **kwargs
        Passed to ``tqdm.tqdm``.

    Returns
    -------
    bar : tqdm.tqdm
    """
    import tqdm

    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    delay = DELAY_S if progress_bar is None else 0.0
    kwargs.setdefault("leave", False)
    return tqdm.tqdm(
        iterable,
        total=total,
        desc=desc,
        disable=not progress_enabled(progress_bar),
        delay=delay,
        **kwargs,
    )
