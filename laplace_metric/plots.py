"""Plots of uncertainty evaluations (matplotlib, safe on the headless ``Agg`` backend).

Every function takes data (tensors or the result objects of :mod:`laplace_metric.metrics`) and
an output path, writes a PNG there and returns the ``Figure``. Figures are built on an Agg
canvas without pyplot, so nothing needs a display and no global figure list grows.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle
from torch import Tensor

from laplace_metric.metrics import ReliabilityBins, SparsificationCurve

__all__ = [
    "plot_embedding_2d",
    "plot_reliability_diagram",
    "plot_sparsification",
    "plot_uncertainty_histograms",
]


def _numpy(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}.")
    return x


def _finite_1d(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    arr = _numpy(x, name).astype(float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values.")
    return arr


def _save(fig: Figure, path: str | Path) -> Figure:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    return fig


def _figure(**kwargs) -> Figure:
    # a Figure on an Agg canvas, without pyplot: no global state, no display needed
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


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
    arrays = {name: _finite_1d(s, f"scores[{name!r}]") for name, s in scores.items()}
    if log:
        if any((a <= 0).any() for a in arrays.values()):
            raise ValueError("log=True needs positive scores.")
        arrays = {name: np.log10(a) for name, a in arrays.items()}
        xlabel = f"log10 {xlabel}"
    in_distribution = next(iter(arrays)) if in_distribution is None else in_distribution
    if in_distribution not in arrays:
        raise ValueError(f"in_distribution {in_distribution!r} is not a key of scores.")
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
    ax.legend()
    return _save(fig, path)


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
    The y-axis ends a little above the largest error while at least 10% of the queries are
    retained: the last points average over a few queries and would squash the other curves.
    A lower area between a curve and its oracle (AUSE) is better.
    """
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
    many = not grouped and len(panels[""]) > 4
    n = len(panels)
    # Wide figure with the legend to the right when there are many curves, so it hides none.
    figsize = (4.6 * n, 4.8) if grouped else ((10, 4.5) if many else (6, 4))
    fig = _figure(figsize=figsize)
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    top = max(_robust_top(group) for group in panels.values())
    styles = ("-", "-.", ":")
    for ax, (panel, group) in zip(axes, panels.items()):
        for i, (name, curve) in enumerate(group.items()):
            colour = f"C{i % 10}"
            frac = curve.fractions.numpy()
            ax.plot(
                frac,
                curve.error.numpy(),
                color=colour,
                ls=styles[(i // 10) % len(styles)],
                label=f"{name} (AUSE {curve.error_area:.4f})",
            )
            ax.plot(frac, curve.oracle.numpy(), color=colour, ls="--", lw=0.8, alpha=0.4)
        ax.plot([], [], color="grey", ls="--", lw=0.8, label="oracle (same colour)")
        ax.set_xlabel("fraction of most uncertain queries removed")
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
        if panel:
            ax.set_title(panel, fontsize="medium")
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
    ax.bar(
        centres[filled],
        acc[filled],
        width=width[filled],
        color="C0",
        edgecolor="k",
        lw=0.5,
        label="accuracy in bin",
    )
    gap = conf[filled] - acc[filled]
    ax.bar(
        centres[filled],
        np.abs(gap),
        bottom=np.minimum(acc[filled], conf[filled]),
        width=width[filled],
        fill=False,
        edgecolor="C3",
        lw=1.5,
        label="gap to mean confidence",
    )
    ax.scatter(centres[filled], conf[filled], marker="_", s=200, color="k", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy of top-1 retrieval")
    ax.set_ylim(0, 1.02)
    heading = f"ECE = {bins.ece:.4f}"
    ax.set_title(f"{title}\n{heading}" if title else heading, fontsize="medium")
    handles, labels = ax.get_legend_handles_labels()
    order = [
        labels.index(k)
        for k in (
            "accuracy in bin",
            "mean confidence",
            "gap to mean confidence",
            "perfect calibration",
        )
    ]
    ax.legend(
        [handles[i] for i in order], [labels[i] for i in order], loc="upper left", fontsize="small"
    )
    ax_count.bar(centres, count, width=width, color="grey", edgecolor="k")
    ax_count.set_xlabel("confidence (agreement of weight samples with the mean's top-1 label)")
    ax_count.set_ylabel("queries")
    ax_count.set_xlim(0, 1)
    return _save(fig, path)


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
    ood = {int(c) for c in ood_labels}
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)
    lo, hi = np.percentile(unc, [5, 95]) if unc.size >= 20 else (unc.min(), unc.max())
    span = hi - lo
    scaled = np.clip((unc - lo) / span, 0, 1) if span > 0 else np.full_like(unc, 0.5)
    sizes = 5 + max_marker_size * scaled
    if emb.shape[1] == 2:
        panels = [("unit circle", emb, np.ones(len(emb), bool))]
        axis_labels = ("z[0]", "z[1]")
    else:
        scale = np.sqrt(2.0 / (1.0 + np.abs(emb[:, 2])))[:, None]
        flat = emb[:, :2] * scale
        panels = [
            ("northern hemisphere (z[2] >= 0)", flat, emb[:, 2] >= 0),
            ("southern hemisphere (z[2] < 0)", flat, emb[:, 2] < 0),
        ]
        axis_labels = ("z[0] (equal-area projection)", "z[1] (equal-area projection)")
    fig = _figure(figsize=(5 * len(panels) + 2, 5.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    classes = np.unique(lab)
    for ax, (panel_title, pts, mask) in zip(axes, panels):
        limit = math.sqrt(2.0) if emb.shape[1] == 3 else 1.0
        ax.add_patch(Circle((0, 0), limit, fill=False, color="k", lw=0.5))
        for i, c in enumerate(classes):
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
        ax.set_aspect("equal")
        ax.set_xlim(-1.1 * limit, 1.1 * limit)
        ax.set_ylim(-1.1 * limit, 1.1 * limit)
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
        ax.set_title(panel_title, fontsize="medium")
    handles = {}  # one legend entry per class, whichever panel drew it
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
    heading = (
        f"marker size: {size_label} ({lo:.3g} to {hi:.3g}, 5th-95th percentile; "
        "larger = less certain)"
    )
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize="medium", y=1.0, va="bottom")
    return _save(fig, path)
