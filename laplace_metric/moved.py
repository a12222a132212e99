"""Deprecation shims for modules whose names moved elsewhere."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["moved_names"]


def moved_names(
    module: str, moved: dict[str, tuple[str, str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a deprecated module ``module``.

    Parameters
    ----------
    module : str
        The deprecated module's name, for the messages.
    moved : dict
        ``old name -> (new module, new name)``. Each access imports the new module lazily and
        warns with a :class:`DeprecationWarning` naming the new home.

    Returns
    -------
    getattr, dir : callable
        Assign them to the module's ``__getattr__`` and ``__dir__``.
    """

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, new_name = moved[name]
        warnings.warn(
            f"{module}.{name} is deprecated; use {home}.{new_name}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(home), new_name)

    def __dir__() -> list[str]:
        return sorted(moved)

    return __getattr__, __dir__
