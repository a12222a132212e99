"""Element bounds of the curvature backends lowered from the estimator's ``memory_budget``."""

from __future__ import annotations

#: The smallest bound a budget can lower an element bound to.
MIN_ELEMENTS = 2**16


def working_bytes(elements: int, itemsize: int, per_element: int) -> int:
    """Peak working memory, in bytes, of passes bounded to ``elements`` numbers of
    ``itemsize`` bytes whose peak is ``per_element`` times that bound."""
    return elements * itemsize * per_element


def budget_elements(value: int, budget: int | None, itemsize: int, per_element: int) -> int:
    """``value``, lowered so that ``per_element`` times it (in elements of ``itemsize`` bytes)
    fits ``budget`` bytes; never below :data:`MIN_ELEMENTS` and never raised.

    Parameters
    ----------
    value : int
        The bound that was set.
    budget : int or None
        The estimator's ``memory_budget`` in bytes (``None``: not bounded).
    itemsize : int
        Bytes per element (the model's parameter dtype).
    per_element : int
        Peak working memory of a fit in units of the bound.
    """
    if budget is None:
        return value
    return min(value, max(MIN_ELEMENTS, int(budget) // working_bytes(1, itemsize, per_element)))
