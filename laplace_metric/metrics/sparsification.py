"""Sparsification: the error of the retained queries as the most uncertain are removed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from laplace_metric.metrics._base import _check_scores

__all__ = ["SparsificationCurve", "sparsification_curve", "sparsification_error_area"]


@dataclass(frozen=True)
class SparsificationCurve:
    """Error of the retained queries as the most uncertain ones are removed.

    Attributes
    ----------
    fractions : Tensor
        ``(n_steps,)`` removed fractions ``0, 1/n_steps, ..., (n_steps - 1)/n_steps``.
    error : Tensor
        ``(n_steps,)`` mean error of the retained queries, removing by uncertainty.
    oracle : Tensor
        ``(n_steps,)`` the same, removing by the true error (the best possible ordering).
    """

    fractions: Tensor
    error: Tensor
    oracle: Tensor

    @property
    def area(self) -> float:
        """Area under the curve, ``AUC = int_0^f_max e(f) df`` (trapezoidal rule)."""
        return torch.trapezoid(self.error, self.fractions).item()

    @property
    def oracle_area(self) -> float:
        """Area under the oracle curve."""
        return torch.trapezoid(self.oracle, self.fractions).item()

    @property
    def error_area(self) -> float:
        """Area between curve and oracle, ``AUSE = int (e(f) - e_oracle(f)) df`` (>= 0)."""
        return self.area - self.oracle_area


def _retained_error(order: Tensor, errors: Tensor, fractions: Tensor) -> Tensor:
    # errors sorted from the first-removed to the last-removed query; the retained part of a
    # removal fraction f is the tail of n - floor(f n) queries.
    sorted_err = errors[order]
    n = errors.numel()
    tail_sums = sorted_err.flip(0).cumsum(0).flip(0)  # tail_sums[i] = sum of sorted_err[i:]
    removed = torch.floor(fractions * n).long().clamp(max=n - 1)
    return tail_sums[removed] / (n - removed).to(errors.dtype)


def sparsification_curve(
    uncertainty: Tensor, errors: Tensor, n_steps: int = 20
) -> SparsificationCurve:
    """Sparsification curve and its oracle.

    For a removed fraction ``f``, remove the ``floor(f N)`` queries with the highest
    uncertainty and report the mean error of the rest,
    ``e(f) = 1 / (N - floor(f N)) sum_{i retained} err_i``; with ``err_i = 1 - 1[top-1
    correct]`` this is ``1 - recall@1`` of the retained queries. The oracle removes by the true
    error instead. A good uncertainty gives a decreasing curve close to the oracle; see
    :attr:`SparsificationCurve.error_area` (AUSE) and :attr:`SparsificationCurve.area` (AUC).
    Ties in ``uncertainty`` are broken by query order (stable sort).

    Parameters
    ----------
    uncertainty : Tensor
        ``(N,)`` higher = less certain.
    errors : Tensor
        ``(N,)`` per-query error (e.g. ``~correct``), any non-negative values.
    n_steps : int, default=20
        Number of removal fractions ``0, 1/n_steps, ..., (n_steps - 1)/n_steps``.

    Returns
    -------
    SparsificationCurve
    """
    _check_scores(uncertainty, "uncertainty")
    _check_scores(errors, "errors")
    if errors.shape != uncertainty.shape:
        raise ValueError(
            f"errors {tuple(errors.shape)} and uncertainty {tuple(uncertainty.shape)} must match."
        )
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}.")
    err = errors.double().cpu()
    if bool((err < 0).any()):
        raise ValueError("errors must be non-negative.")
    unc = uncertainty.double().cpu()
    fractions = torch.arange(n_steps, dtype=torch.float64) / n_steps
    by_uncertainty = torch.sort(unc, descending=True, stable=True).indices
    by_error = torch.sort(err, descending=True, stable=True).indices
    return SparsificationCurve(
        fractions=fractions,
        error=_retained_error(by_uncertainty, err, fractions),
        oracle=_retained_error(by_error, err, fractions),
    )


def sparsification_error_area(uncertainty: Tensor, errors: Tensor, n_steps: int = 20) -> float:
    """Area between the sparsification curve and its oracle (AUSE; lower is better).

    ``AUSE = int_0^f_max (e(f) - e_oracle(f)) df`` with the trapezoidal rule on the grid of
    :func:`sparsification_curve`.

    Parameters
    ----------
    uncertainty : Tensor
        ``(N,)``.
    errors : Tensor
        ``(N,)``.
    n_steps : int, default=20

    Returns
    -------
    ause : float
    """
    return sparsification_curve(uncertainty, errors, n_steps).error_area
