"""Plots of uncertainty evaluations (matplotlib, safe on the headless ``Agg`` backend).

Every function takes data (tensors or the result objects of :mod:`laplace_metric.metrics`) and
an output path, writes a PNG there and returns the ``Figure``. Figures are built on an Agg
canvas without pyplot, so nothing needs a display and no global figure list grows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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

    Returns
    -------
    Figure
    """
    if not scores:
        raise ValueError("scores is empty; pass at least one named set of scores.")
    arrays = {name: _finite_1d(s, f"scores[{name!r}]") for name, s in scores.items()}
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
    ax.legend()
    return _save(fig, path)


def plot_sparsification(
    curves: SparsificationCurve | Mapping[str, SparsificationCurve],
    path: str | Path,
    ylabel: str = "error of retained queries (1 - recall@1)",
) -> Figure:
    """Sparsification curves (solid) with their oracles (dashed); AUSE in the legend.

    Parameters
    ----------
    curves : SparsificationCurve or mapping of str to SparsificationCurve
        One curve or named curves (e.g. one per method).
    path : str or Path
        Output PNG.
    ylabel : str

    Returns
    -------
    Figure
    """
    if isinstance(curves, SparsificationCurve):
        curves = {"model": curves}
    if not curves:
        raise ValueError("curves is empty.")
    many = len(curves) > 4
    # Wide figure with the legend to the right when there are many curves, so it hides none.
    fig = _figure(figsize=(10, 4.5) if many else (6, 4))
    ax = fig.add_subplot()
    styles = ("-", "-.", ":")
    for i, (name, curve) in enumerate(curves.items()):
        if not isinstance(curve, SparsificationCurve):
            raise TypeError(
                f"curves[{name!r}] must be a SparsificationCurve, got {type(curve).__name__}."
            )
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
    ax.set_ylabel(ylabel)
    if many:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
        fig.subplots_adjust(left=0.08, right=0.58, bottom=0.12)
    else:
        ax.legend()
    return _save(fig, path)


def plot_reliability_diagram(bins: ReliabilityBins, path: str | Path) -> Figure:
    """Reliability diagram: per-bin accuracy vs confidence, gap to the diagonal, counts.

    Parameters
    ----------
    bins : ReliabilityBins
        From :func:`laplace_metric.metrics.reliability_diagram_data`.
    path : str or Path
        Output PNG.

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
    ax.bar(centres[filled], acc[filled], width=width[filled], edgecolor="k", label="accuracy")
    ax.bar(
        centres[filled],
        conf[filled] - acc[filled],
        bottom=acc[filled],
        width=width[filled],
        color="C3",
        alpha=0.4,
        hatch="//",
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy of top-1 retrieval")
    ax.set_ylim(0, 1)
    ax.set_title(f"ECE = {bins.ece:.4f}")
    ax.legend(loc="upper left")
    ax_count.bar(centres, count, width=width, color="grey", edgecolor="k")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("count")
    ax_count.set_xlim(0, 1)
    return _save(fig, path)


def plot_embedding_2d(
    embeddings: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    uncertainty: Tensor | np.ndarray,
    path: str | Path,
    max_marker_size: float = 80.0,
) -> Figure:
    """Scatter 2-D (circle) or 3-D (sphere) embeddings; colour = class, size = uncertainty.

    3-D embeddings are shown with an equal-area (Lambert azimuthal) projection of each
    hemisphere: ``(x, y) * sqrt(2 / (1 + |z|))``, northern (``z >= 0``) and southern panels.
    Embeddings are L2-normalised for the plot. Marker area grows linearly with the
    min-max scaled uncertainty; the title gives its range.

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
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)
    span = unc.max() - unc.min()
    sizes = 5 + max_marker_size * ((unc - unc.min()) / span if span > 0 else np.full_like(unc, 0.5))
    if emb.shape[1] == 2:
        panels = [("circle", emb, np.ones(len(emb), bool))]
    else:
        scale = np.sqrt(2.0 / (1.0 + np.abs(emb[:, 2])))[:, None]
        flat = emb[:, :2] * scale
        panels = [("north (z >= 0)", flat, emb[:, 2] >= 0), ("south (z < 0)", flat, emb[:, 2] < 0)]
    fig = _figure(figsize=(5 * len(panels) + 1.5, 5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    classes = np.unique(lab)
    for ax, (title, pts, mask) in zip(axes, panels):
        limit = math.sqrt(2.0) if emb.shape[1] == 3 else 1.0
        ax.add_patch(Circle((0, 0), limit, fill=False, color="k", lw=0.5))
        for i, c in enumerate(classes):
            sel = mask & (lab == c)
            if not sel.any():
                continue
            if c < 0:
                ax.scatter(*pts[sel].T, s=sizes[sel], marker="x", color="grey", label=f"{c} (OOD)")
            else:
                ax.scatter(*pts[sel].T, s=sizes[sel], color=f"C{i % 10}", alpha=0.6, label=str(c))
        ax.set_aspect("equal")
        ax.set_xlim(-1.1 * limit, 1.1 * limit)
        ax.set_ylim(-1.1 * limit, 1.1 * limit)
        ax.set_title(title)
    handles = {}  # one legend entry per class, whichever panel drew it
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(
        handles.values(), handles.keys(), title="class", loc="center right", fontsize="small"
    )
    fig.suptitle(f"marker size: uncertainty ({unc.min():.3g} to {unc.max():.3g})")
    return _save(fig, path)
