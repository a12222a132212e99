"""Overlaid histograms of the uncertainty scores of several input sets."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from laplace_metric.plots._common import _figure, _finite_1d, _save

__all__ = ["plot_uncertainty_histograms"]


def _prepare(
    scores: Mapping[str, Tensor | np.ndarray], log: bool, xlabel: str, in_distribution: str | None
) -> tuple[dict[str, np.ndarray], str, str]:
    """Checked arrays (``log10`` if ``log``), the x label and the in-distribution name."""
    arrays = {name: _finite_1d(s, f"scores[{name!r}]") for name, s in scores.items()}
    if log:
        if any((a <= 0).any() for a in arrays.values()):
            raise ValueError("log=True needs positive scores.")
        arrays = {name: np.log10(a) for name, a in arrays.items()}
        xlabel = f"log10 {xlabel}"
    in_distribution = next(iter(arrays)) if in_distribution is None else in_distribution
    if in_distribution not in arrays:
        raise ValueError(f"in_distribution {in_distribution!r} is not a key of scores.")
    return arrays, xlabel, in_distribution


def plot_uncertainty_histograms(
    scores: Mapping[str, Tensor | np.ndarray],
    path: str | Path,
    bins: int = 40,
    in_distribution: str | None = None,
    xlabel: str = "uncertainty score",
    title: str | None = None,
    log: bool = False,
) -> Figure:
    """Overlaid, density-normalised histograms of the uncertainty of several input sets.

    Parameters
    ----------
    scores : mapping of str to Tensor
        Name -> scores ``(n,)``, e.g. ``{"ID test": s_in, "digits 6-9": s_dig, "noise": s_noise}``.
    path : str or Path
        Output PNG.
    bins : int, default=40
        Number of shared bins over the range of all scores.
    in_distribution : str, optional
        Name of the in-distribution set, drawn filled (default: the first entry).
    xlabel : str, default='uncertainty score'
    title : str, optional
        E.g. the method, seed and data set.
    log : bool, default=False
        Histogram ``log10`` of the scores (for heavy-tailed scores such as the trace; they
        must be positive); the x label says so.

    Returns
    -------
    Figure
    """
    if not scores:
        raise ValueError("scores is empty; pass at least one named set of scores.")
    arrays, xlabel, in_distribution = _prepare(scores, log, xlabel, in_distribution)
    lo = min(a.min() for a in arrays.values())
    hi = max(a.max() for a in arrays.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig = _figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, arr in arrays.items():
        if name == in_distribution:
            ax.hist(arr, bins=edges, density=True, alpha=0.5, label=f"{name} (n={arr.size})")
        else:
            ax.hist(
                arr, bins=edges, density=True, histtype="step", lw=2, label=f"{name} (n={arr.size})"
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize="medium")
    # outside the axes, to the right, so that it covers no bar
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return _save(fig, path)
