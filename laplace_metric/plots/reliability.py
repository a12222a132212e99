"""Reliability diagram of retrieval confidence, with the bin counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from laplace_metric.metrics import ReliabilityBins
from laplace_metric.plots._common import _figure, _save

__all__ = ["plot_reliability_diagram"]


_LEGEND_ORDER = (
    "accuracy in bin",
    "mean confidence",
    "gap to mean confidence",
    "perfect calibration",
)


def _draw_bins(
    ax: Axes, centres: np.ndarray, width: np.ndarray, acc: np.ndarray, conf: np.ndarray
) -> None:
    """Accuracy bars, the gap to the mean confidence (red outline), its tick and the diagonal."""
    ax.bar(
        centres,
        acc,
        width=width,
        color="C0",
        edgecolor="k",
        lw=0.5,
        label="accuracy in bin",
    )
    gap = conf - acc
    ax.bar(
        centres,
        np.abs(gap),
        bottom=np.minimum(acc, conf),
        width=width,
        fill=False,
        edgecolor="C3",
        lw=1.5,
        label="gap to mean confidence",
    )
    ax.scatter(centres, conf, marker="_", s=200, color="k", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")


def _ordered_legend(ax: Axes) -> None:
    handles, labels = ax.get_legend_handles_labels()
    order = [labels.index(k) for k in _LEGEND_ORDER]
    # outside the axes, to the right: inside, it would cover the bars of some bins
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize="small",
        frameon=False,
    )


def plot_reliability_diagram(
    bins: ReliabilityBins, path: str | Path, title: str | None = None
) -> Figure:
    """Reliability diagram: accuracy per confidence bin against the diagonal, and bin counts.

    Each bar is the fraction of correct top-1 retrievals among the queries whose confidence
    falls in the bin; the black tick on it is the bin's mean confidence, and the red outline
    between them is the gap (its count-weighted mean is the ECE). A calibrated model has every
    bar reach the diagonal.

    Parameters
    ----------
    bins : ReliabilityBins
        From :func:`laplace_metric.metrics.reliability_diagram_data`.
    path : str or Path
        Output PNG.
    title : str, optional
        E.g. the method, seed and data set; the ECE is added below it.

    Returns
    -------
    Figure
    """
    if not isinstance(bins, ReliabilityBins):
        raise TypeError(f"bins must be ReliabilityBins, got {type(bins).__name__}.")
    edges = bins.edges.cpu().numpy()
    centres = (edges[:-1] + edges[1:]) / 2
    width = np.diff(edges)
    acc = bins.accuracy.cpu().numpy()
    conf = bins.confidence.cpu().numpy()
    count = bins.count.cpu().numpy()
    filled = count > 0
    fig = _figure(figsize=(5, 6))
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    _draw_bins(ax, centres[filled], width[filled], acc[filled], conf[filled])
    ax.set_ylabel("accuracy of top-1 retrieval")
    ax.set_ylim(0, 1.02)
    heading = f"ECE = {bins.ece:.4f}"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize="medium")
    _ordered_legend(ax)
    ax_count.bar(centres, count, width=width, color="grey", edgecolor="k")
    ax_count.set_xlabel("confidence (agreement of weight samples with the mean's top-1 label)")
    ax_count.set_ylabel("queries")
    ax_count.set_xlim(0, 1)
    return _save(fig, path)
