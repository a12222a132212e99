"""2-D (circle) or 3-D (sphere) embeddings coloured by class, sized by uncertainty."""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from torch import Tensor

from laplace_metric.plots._common import _figure, _finite_1d, _numpy, _save

__all__ = ["plot_embedding_2d"]


def _checked(
    embeddings: Tensor | np.ndarray, labels: Tensor | np.ndarray, uncertainty: Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L2-normalised embeddings ``(n, 2|3)``, labels ``(n,)`` and uncertainty ``(n,)``."""
    emb = _numpy(embeddings, "embeddings").astype(float)
    if emb.ndim != 2 or emb.shape[1] not in (2, 3):
        raise ValueError(f"embeddings must have shape (n, 2) or (n, 3), got {emb.shape}.")
    if emb.shape[0] == 0:
        raise ValueError("embeddings is empty.")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contains NaN or inf values.")
    lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else _numpy(labels, "labels")
    unc = _finite_1d(uncertainty, "uncertainty")
    if lab.shape != (emb.shape[0],) or unc.shape != (emb.shape[0],):
        raise ValueError(
            f"labels {lab.shape} and uncertainty {unc.shape} must both have shape ({emb.shape[0]},)."
        )
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1.0), lab, unc


def _marker_sizes(unc: np.ndarray, max_marker_size: float) -> tuple[np.ndarray, float, float]:
    """Marker areas linear in the uncertainty clipped to ``[lo, hi]`` (5th-95th percentile)."""
    lo, hi = np.percentile(unc, [5, 95]) if unc.size >= 20 else (unc.min(), unc.max())
    span = hi - lo
    scaled = np.clip((unc - lo) / span, 0, 1) if span > 0 else np.full_like(unc, 0.5)
    return 5 + max_marker_size * scaled, lo, hi


def _panels(emb: np.ndarray) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], tuple[str, str]]:
    """``(title, 2-D points, mask)`` per panel: the circle, or two equal-area hemispheres."""
    if emb.shape[1] == 2:
        return [("unit circle", emb, np.ones(len(emb), bool))], ("z[0]", "z[1]")
    scale = np.sqrt(2.0 / (1.0 + np.abs(emb[:, 2])))[:, None]
    flat = emb[:, :2] * scale
    panels = [
        ("northern hemisphere (z[2] >= 0)", flat, emb[:, 2] >= 0),
        ("southern hemisphere (z[2] < 0)", flat, emb[:, 2] < 0),
    ]
    return panels, ("z[0] (equal-area projection)", "z[1] (equal-area projection)")


def _circle_axes(ax: Axes, limit: float, axis_labels: tuple[str, str], title: str) -> None:
    """The boundary circle of radius ``limit``, equal aspect, limits, labels and title."""
    ax.add_patch(Circle((0, 0), limit, fill=False, color="k", lw=0.5))
    ax.set_aspect("equal")
    ax.set_xlim(-1.1 * limit, 1.1 * limit)
    ax.set_ylim(-1.1 * limit, 1.1 * limit)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title, fontsize="medium")


def _scatter_classes(
    ax: Axes, pts: np.ndarray, mask: np.ndarray, lab: np.ndarray, sizes: np.ndarray, ood: set[int]
) -> None:
    """One scatter per class: noise as grey crosses, OOD classes as edged triangles."""
    for i, c in enumerate(np.unique(lab)):
        sel = mask & (lab == c)
        if not sel.any():
            continue
        if c < 0:
            ax.scatter(
                *pts[sel].T, s=sizes[sel], marker="x", color="grey", label=f"{c} (noise, OOD)"
            )
        elif int(c) in ood:
            ax.scatter(
                *pts[sel].T,
                s=sizes[sel],
                marker="^",
                color=f"C{i % 10}",
                edgecolors="k",
                linewidths=0.6,
                alpha=0.8,
                label=f"{c} (OOD)",
            )
        else:
            ax.scatter(*pts[sel].T, s=sizes[sel], color=f"C{i % 10}", alpha=0.6, label=str(c))


def _class_legend(fig: Figure, axes: np.ndarray) -> None:
    """One legend entry per class, whichever panel drew it; in-distribution classes first."""
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    order = sorted(handles, key=lambda name: ("OOD" in name, int(name.split()[0])))
    fig.legend(
        [handles[k] for k in order],
        order,
        title="class",
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize="small",
    )


def plot_embedding_2d(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    uncertainty: Tensor | np.ndarray,
    path: str | Path,
    max_marker_size: float = 80.0,
    ood_labels: Collection[int] = (),
    title: str | None = None,
    size_label: str = "uncertainty",
) -> Figure:
    """Scatter 2-D (circle) or 3-D (sphere) embeddings; colour = class, size = uncertainty.

    3-D embeddings are shown with an equal-area (Lambert azimuthal) projection of each
    hemisphere: ``(x, y) * sqrt(2 / (1 + |z|))``, northern (``z >= 0``) and southern panels.
    Embeddings are L2-normalised for the plot. Marker area grows linearly with the
    uncertainty, clipped to its 5th-95th percentile range so that one outlier does not set
    every other size; the title gives that range.

    Parameters
    ----------
    embeddings : Tensor
        ``(n, 2)`` or ``(n, 3)``.
    labels : Tensor
        ``(n,)`` class ids (negative ids, e.g. noise, are drawn as grey crosses).
    uncertainty : Tensor
        ``(n,)`` uncertainty scores.
    path : str or Path
        Output PNG.
    max_marker_size : float, default=80
    ood_labels : collection of int, default=()
        Classes that are out of distribution (e.g. held-out digits): drawn as black-edged
        triangles and marked "(OOD)" in the legend.
    title : str, optional
        E.g. the method, seed and data set.
    size_label : str, default='uncertainty'
        What the marker size shows.

    Returns
    -------
    Figure
    """
    emb, lab, unc = _checked(embeddings, labels, uncertainty)
    sizes, lo, hi = _marker_sizes(unc, max_marker_size)
    panels, axis_labels = _panels(emb)
    fig = _figure(figsize=(5 * len(panels) + 2, 5.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    limit = math.sqrt(2.0) if emb.shape[1] == 3 else 1.0
    ood = {int(c) for c in ood_labels}
    for ax, (panel_title, pts, mask) in zip(axes, panels):
        _circle_axes(ax, limit, axis_labels, panel_title)
        _scatter_classes(ax, pts, mask, lab, sizes, ood)
    _class_legend(fig, axes)
    heading = (
        f"marker size: {size_label} ({lo:.3g} to {hi:.3g}, 5th-95th percentile; "
        "larger = less certain)"
    )
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize="medium", y=1.0, va="bottom")
    return _save(fig, path)
