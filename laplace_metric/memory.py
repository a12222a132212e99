"""Planned memory: a byte budget, size checks before large allocations, and chunking.

Every estimator has a ``memory_budget`` (bytes; see :func:`resolve_budget`). Before an
allocation that may not fit (a dense ``P x P`` curvature or posterior, a ``B x D x P``
Jacobian), the estimator compares its size with the budget and raises
:class:`MemoryBudgetError`, naming the size and the structures or subsets that would fit,
instead of letting the allocator fail with a raw message. Prediction and sampling split their
inputs into chunks whose working memory stays within the budget (:func:`chunk_size`).

The default budget is half of the memory that is free now: ``MemAvailable`` on Linux, capped by
the headroom under an address-space limit (``ulimit -v``), or the free memory of the CUDA
device; ``LAPLACE_METRIC_MEMORY_BUDGET`` (e.g. ``"8GB"``) overrides it. The budget bounds the
*additional* memory of one step, not the process's total footprint (the model, its
activations and the data are not counted).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import torch

#: Environment variable that sets the default budget, e.g. ``"8GB"`` or ``"5e9"``.
BUDGET_ENV = "LAPLACE_METRIC_MEMORY_BUDGET"
#: Fraction of the free memory used as the default budget.
DEFAULT_FRACTION = 0.5
#: Budget used when the free memory cannot be determined.
FALLBACK_BUDGET = 4 * 1024**3

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class MemoryBudgetError(MemoryError):
    """An allocation would exceed the estimator's ``memory_budget``.

    Raised *before* allocating, with the size that was asked for and what would fit.
    """


def format_bytes(n_bytes: float) -> str:
    """Human-readable size in decimal units, e.g. ``'17.2 GB'`` or ``'502 TB'``."""
    value = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1000 or unit == "PB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1000
    raise AssertionError("unreachable")


def parse_bytes(value: int | float | str) -> int:
    """Bytes from a number or a string such as ``'4GB'``, ``'512 MiB'`` or ``'2.5e9'``.

    Raises
    ------
    ValueError
        If the value is not positive or the unit is unknown.
    """
    if isinstance(value, bool):
        raise TypeError("memory_budget must be a number of bytes or a string such as '4GB'.")
    if isinstance(value, (int, float)):
        n_bytes = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"Cannot read memory size {value!r}; use bytes or a unit such as '4GB', '512MiB'."
            )
        try:
            n_bytes = float(match.group(1)) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"Cannot read memory size {value!r}.") from None
    else:
        raise TypeError(
            f"memory_budget must be a number of bytes or a string such as '4GB', got "
            f"{type(value).__name__}."
        )
    if not n_bytes > 0 or n_bytes == float("inf"):
        raise ValueError(f"memory_budget must be a positive, finite size, got {value!r}.")
    return int(n_bytes)


def _linux_available() -> int | None:
    """``MemAvailable`` capped by the headroom under ``RLIMIT_AS``; ``None`` if unknown."""
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open("/proc/self/status") as fh:
                size = next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmSize:"))
            headroom = max(limit - size, 0)
            available = headroom if available is None else min(available, headroom)
    except (OSError, ImportError, StopIteration, ValueError):
        pass
    return available


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Free memory on ``device`` in bytes (CUDA: the device's free memory), or ``None``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return _linux_available()


def default_budget(device: torch.device | str | None = None) -> int:
    """The default ``memory_budget``: ``$LAPLACE_METRIC_MEMORY_BUDGET``, else half the free
    memory of ``device`` (see the module docstring), else 4 GiB."""
    env = os.environ.get(BUDGET_ENV)
    if env:
        return parse_bytes(env)
    free = available_memory(device)
    if not free:
        return FALLBACK_BUDGET
    return max(int(DEFAULT_FRACTION * free), 1)


def resolve_budget(
    value: int | float | str | None, device: torch.device | str | None = None
) -> int:
    """Bytes of a ``memory_budget`` option; ``None`` gives :func:`default_budget`."""
    return default_budget(device) if value is None else parse_bytes(value)


def check_fits(
    n_bytes: float,
    budget: int,
    what: str,
    alternatives: Sequence[str] = (),
) -> None:
    """Raise :class:`MemoryBudgetError` if ``n_bytes`` exceed ``budget``.

    Parameters
    ----------
    n_bytes : float
        Size of the planned allocation.
    budget : int
        The memory budget in bytes.
    what : str
        What needs the memory, e.g. ``"a dense posterior over 11,220,132 parameters"``.
    alternatives : sequence of str
        Options that would fit, each a short clause, e.g. ``"hessian_structure='diag'"``.
    """
    if n_bytes <= budget:
        return
    message = f"{what} needs {format_bytes(n_bytes)}, over the memory budget of " + (
        f"{format_bytes(budget)}"
    )
    if alternatives:
        message += "; use " + " or ".join(alternatives)
    message += f" (or raise the budget: memory_budget='...GB' on the estimator, or ${BUDGET_ENV})."
    raise MemoryBudgetError(message)


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` if it is a positive integer, else a ``ValueError``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return batch_size


def chunk_size(
    n_items: int,
    bytes_per_item: float,
    budget: int,
    batch_size: int | None = None,
    fixed_bytes: float = 0,
) -> int:
    """Items per chunk so that ``fixed_bytes + chunk * bytes_per_item <= budget``.

    Parameters
    ----------
    n_items : int
        Number of items (queries) to process.
    bytes_per_item : float
        Working memory of one item.
    budget : int
        The memory budget in bytes.
    batch_size : int, optional
        An explicit chunk size; overrides the budget.
    fixed_bytes : float, default=0
        Memory needed regardless of the chunk size.

    Returns
    -------
    size : int
        At least 1 (a single item that does not fit is the caller's to reject with
        :func:`check_fits`) and at most ``max(n_items, 1)``.
    """
    if batch_size is not None:
        return min(check_batch_size(batch_size), max(n_items, 1))
    room = budget - fixed_bytes
    size = int(room // bytes_per_item) if bytes_per_item > 0 else n_items
    return max(1, min(size, max(n_items, 1)))


def split(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """Consecutive chunks of at most ``size`` rows of ``x`` (one empty chunk for empty ``x``)."""
    if len(x) == 0:
        yield x
        return
    yield from x.split(size)


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


__all__ = [
    "BUDGET_ENV",
    "MemoryBudgetError",
    "available_memory",
    "check_batch_size",
    "check_fits",
    "chunk_size",
    "default_budget",
    "dtype_bytes",
    "format_bytes",
    "parse_bytes",
    "resolve_budget",
    "split",
]
