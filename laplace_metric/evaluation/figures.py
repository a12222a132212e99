"""Figures of aggregated tables and embeddings (matplotlib, imported when drawing).

The per-seed figures (uncertainty histograms, sparsification curves, reliability diagrams)
are in :mod:`laplace_metric.plots`; :func:`write_seed_plots` draws all of them for one
:class:`~laplace_metric.evaluation.SeedResult`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from laplace_metric.evaluation.results import SeedResult

__all__ = ["plot_metric_bars", "plot_sphere", "slug", "write_seed_plots"]


def slug(name: str) -> str:
    """``name`` as a file-name part: lower case, non-alphanumerics as underscores."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _figure(**kwargs: Any) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_metric_bars(
    table: dict[str, dict[str, tuple[float, float]]],
    metric: str,
    path: Path,
    xlabel: str | None = None,
    title: str | None = None,
) -> Path:
    """Horizontal bars of ``metric`` (mean, std error bar) per method of an aggregated table.

    ``table`` is :meth:`~laplace_metric.evaluation.ResultTable.aggregate`'s output; the axis
    runs from 0 to 1 with a dashed line at chance (0.5).
    """
    names = list(table)
    means = [table[n][metric][0] for n in names]
    stds = [table[n][metric][1] for n in names]
    fig = _figure(figsize=(7, 0.35 * len(names) + 1))
    ax = fig.add_subplot()
    ax.barh(range(len(names)), means, xerr=stds, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel or metric)
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_sphere(
    z_in: Tensor,
    labels: Tensor,
    z_out: Tensor,
    path: Path,
    names: tuple[str, str] = ("in distribution", "OOD"),
    title: str | None = None,
) -> Path:
    """3-D embeddings on the sphere: in-distribution coloured by class, OOD as black crosses."""
    fig = _figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    ax.scatter(*z_in.numpy().T, c=labels.numpy(), cmap="tab10", s=3, label=names[0])
    ax.scatter(*z_out.numpy().T, c="black", marker="x", s=3, alpha=0.3, label=names[1])
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def write_seed_plots(result: SeedResult, output_dir: Path, prefix: str = "") -> list[Path]:
    """Score histograms, the sparsification curves and the reliability diagrams of one seed."""
    from laplace_metric.plots import (
        plot_reliability_diagram,
        plot_sparsification,
        plot_uncertainty_histograms,
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, scores in result.scores.items():
        path = output_dir / f"{prefix}scores_{slug(name)}.png"
        plot_uncertainty_histograms(scores, path, xlabel=name)
        paths.append(path)
    path = output_dir / f"{prefix}sparsification.png"
    plot_sparsification(result.curves, path)
    paths.append(path)
    for name, bins in result.reliability.items():
        path = output_dir / f"{prefix}reliability_{slug(name)}.png"
        plot_reliability_diagram(bins, path)
        paths.append(path)
    return paths
