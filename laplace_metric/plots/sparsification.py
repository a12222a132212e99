"""Sparsification curves with their oracles, one panel per group of curves."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from laplace_metric.metrics import SparsificationCurve
from laplace_metric.plots._common import _figure, _save

__all__ = ["plot_sparsification"]


def _robust_top(curves: Mapping[str, SparsificationCurve], keep: float = 0.1) -> float:
    """Upper y-limit: the largest error while at least ``keep`` of the queries remain.

    The last points of a sparsification curve average over a handful of queries and jump to
    0 or 1; they would squash every other curve.
    """
    top = 0.0
    for curve in curves.values():
        retained = 1.0 - curve.fractions.numpy()
        values = np.concatenate([curve.error.numpy(), curve.oracle.numpy()])
        mask = np.concatenate([retained >= keep, retained >= keep])
        if mask.any():
            top = max(top, float(values[mask].max()))
    return 1.1 * top if top > 0 else 1.0


def _panels(
    curves: SparsificationCurve
    | Mapping[str, SparsificationCurve]
    | Mapping[str, Mapping[str, SparsificationCurve]],
) -> tuple[dict[str, Mapping[str, SparsificationCurve]], bool]:
    """Panel title -> named curves (one untitled panel unless grouped), and whether grouped."""
    if isinstance(curves, SparsificationCurve):
        curves = {"model": curves}
    if not curves:
        raise ValueError("curves is empty.")
    grouped = all(isinstance(c, Mapping) for c in curves.values())
    panels = dict(curves) if grouped else {"": curves}
    for group in panels.values():
        if not group:
            raise ValueError("curves has an empty group.")
        for name, curve in group.items():
            if not isinstance(curve, SparsificationCurve):
                raise TypeError(
                    f"curves[{name!r}] must be a SparsificationCurve, got {type(curve).__name__}."
                )
    return panels, grouped


def _draw_panel(
    ax: Axes, group: Mapping[str, SparsificationCurve], top: float, panel: str, keep: float = 0.1
) -> None:
    """Each curve (solid, AUSE in its label) with its oracle (dashed, same colour), drawn
    while at least ``keep`` of the queries remain (the y-limit covers exactly those points,
    so no curve leaves its panel)."""
    styles = ("-", "-.", ":")
    for i, (name, curve) in enumerate(group.items()):
        colour = f"C{i % 10}"
        frac = curve.fractions.numpy()
        shown = (1.0 - frac) >= keep
        ax.plot(
            frac[shown],
            curve.error.numpy()[shown],
            color=colour,
            ls=styles[(i // 10) % len(styles)],
            label=f"{name} (AUSE {curve.error_area:.4f})",
        )
        ax.plot(frac[shown], curve.oracle.numpy()[shown], color=colour, ls="--", lw=0.8, alpha=0.4)
    ax.plot([], [], color="grey", ls="--", lw=0.8, label="oracle (same colour)")
    ax.set_xlabel("fraction of most uncertain queries removed")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    if panel:
        ax.set_title(panel, fontsize="medium")


def plot_sparsification(
    curves: SparsificationCurve
    | Mapping[str, SparsificationCurve]
    | Mapping[str, Mapping[str, SparsificationCurve]],
    path: str | Path,
    ylabel: str = "error of retained queries (1 - recall@1)",
    title: str | None = None,
) -> Figure:
    """Sparsification curves (solid) with their oracles (dashed); AUSE in the legend.

    Parameters
    ----------
    curves : SparsificationCurve, mapping of str to SparsificationCurve, or mapping of str to such mappings
        One curve, named curves (one panel), or named groups of named curves (one panel per
        group, e.g. one per family of scores, with a shared y-axis).
    path : str or Path
        Output PNG.
    ylabel : str
    title : str, optional
        Figure title, e.g. the seed and data set.

    Returns
    -------
    Figure

    Notes
    -----
    Curves are drawn while at least 10% of the queries are retained, and the y-axis ends a
    little above their largest error: the last points average over a few queries, jump to 0
    or 1, and would either leave the panel or squash the other curves (the AUSE in the legend
    still covers the whole curve).
    A lower area between a curve and its oracle (AUSE) is better.
    """
    panels, grouped = _panels(curves)
    many = not grouped and len(panels[""]) > 4
    n = len(panels)
    # Wide figure with the legend to the right when there are many curves, so it hides none.
    figsize = (4.6 * n, 4.8) if grouped else ((10, 4.5) if many else (6, 4))
    fig = _figure(figsize=figsize)
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    top = max(_robust_top(group) for group in panels.values())
    for ax, (panel, group) in zip(axes, panels.items()):
        _draw_panel(ax, group, top, panel)
        if grouped:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
        elif many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
            fig.subplots_adjust(left=0.08, right=0.58, bottom=0.12)
        else:
            ax.legend()
    axes[0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, y=1.0, va="bottom")
    return _save(fig, path)
