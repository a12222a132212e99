"""What every benchmark shares: a memory meter, timing, progress and JSON output.

Benchmarks import it as ``import harness`` (a script's folder is first on ``sys.path``).
Stdlib only at import time, so a benchmark's ``--help`` stays fast.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Usage", "jsonable", "measure", "median_seconds", "rss_mb", "stage_reporter"]


def rss_mb() -> float:
    """Resident memory of this process in MiB, from ``/proc/self/statm`` (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class Usage:
    """Wall time and peak resident-memory increase of a block (see :func:`measure`)."""

    seconds: float = 0.0
    peak_mb: float = math.nan


@contextmanager
def measure(usage: Usage) -> Iterator[Usage]:
    """Add the block's wall time to ``usage`` and set its peak RSS increase (polled, 20 ms).

    The RSS is read from ``/proc/self/statm``; elsewhere the peak is NaN.
    """
    polling = os.path.exists("/proc/self/statm")
    start_rss = rss_mb() if polling else math.nan
    peak = [start_rss]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss_mb())

    thread = threading.Thread(target=poll, daemon=True) if polling else None
    if thread is not None:
        thread.start()
    start = time.perf_counter()
    try:
        yield usage
    finally:
        usage.seconds += time.perf_counter() - start
        stop.set()
        if thread is not None:
            thread.join()
            peak[0] = max(peak[0], rss_mb())
        usage.peak_mb = max(0.0, peak[0] - start_rss) if polling else math.nan


def median_seconds(run: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``run()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_reporter(bar: Any, prefix: str) -> Callable[[str], None]:
    """``on_stage(name)`` for a tqdm ``bar``: steps the bar at every stage after the first."""
    started = [False]

    def on_stage(name: str) -> None:
        if started[0]:
            bar.update(1)
        started[0] = True
        bar.set_description(f"{prefix}: {name}")

    return on_stage


def jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists and paths as strings (for ``json.dumps``)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
