"""Tests of laplace_metric.plots: each function writes a readable PNG and checks its input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from laplace_metric import metrics as M
from laplace_metric import plots as P


def check_png(fig: Figure, path) -> np.ndarray:
    assert isinstance(fig, Figure)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    # not a blank canvas
    assert image[..., :3].std() > 0.01
    return image


def test_uncertainty_histograms(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = {
        "ID test": torch.rand(100, generator=gen),
        "digits 6-9": torch.rand(80, generator=gen) + 0.5,
        "noise": np.random.default_rng(0).random(50) + 1.0,
    }
    path = tmp_path / "sub" / "hist.png"
    fig = P.plot_uncertainty_histograms(scores, path)
    check_png(fig, path)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["ID test (n=100)", "digits 6-9 (n=80)", "noise (n=50)"]


def test_uncertainty_histograms_constant_scores(tmp_path) -> None:
    fig = P.plot_uncertainty_histograms(
        {"a": torch.ones(5), "b": torch.ones(3)}, tmp_path / "c.png"
    )
    check_png(fig, tmp_path / "c.png")


def test_uncertainty_histograms_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="empty"):
        P.plot_uncertainty_histograms({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        P.plot_uncertainty_histograms({"a": torch.tensor([math.nan])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="in_distribution"):
        P.plot_uncertainty_histograms({"a": torch.ones(2)}, tmp_path / "x.png", in_distribution="b")
    with pytest.raises(TypeError, match="Tensor"):
        P.plot_uncertainty_histograms({"a": [1.0, 2.0]}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_sparsification_plot(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    err = (torch.rand(200, generator=gen) < 0.2).float()
    good = M.sparsification_curve(err + torch.rand(200, generator=gen), err)
    bad = M.sparsification_curve(torch.rand(200, generator=gen), err)
    path = tmp_path / "sparse.png"
    fig = P.plot_sparsification({"good": good, "random": bad}, path)
    check_png(fig, path)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 5  # 2 curves + 2 oracles + legend proxy
    shown = (1 - good.fractions.numpy()) >= 0.1  # the last 10% of queries are not drawn
    assert np.allclose(ax.get_lines()[0].get_ydata(), good.error.numpy()[shown])
    top = ax.get_ylim()[1]
    for line in ax.get_lines():  # no curve leaves its panel
        assert all(0 <= y <= top for y in line.get_ydata())
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0].startswith("good (AUSE") and texts[-1].startswith("oracle")
    # Many curves: the legend goes beside the axes, so it hides none of them.
    many = {f"method {i}": good for i in range(6)}
    fig = P.plot_sparsification(many, tmp_path / "many.png")
    check_png(fig, tmp_path / "many.png")
    legend = fig.axes[0].get_legend()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend_box = legend.get_window_extent(renderer)
    axes_box = fig.axes[0].get_window_extent(renderer)
    assert legend_box.x0 >= axes_box.x1
    assert len(legend.get_texts()) == 7
    fig = P.plot_sparsification(good, tmp_path / "one.png")
    check_png(fig, tmp_path / "one.png")
    with pytest.raises(TypeError, match="SparsificationCurve"):
        P.plot_sparsification({"x": err}, tmp_path / "bad.png")


def test_reliability_plot(tmp_path) -> None:
    conf = torch.tensor([0.1, 0.15, 0.5, 0.55, 0.9, 1.0])
    correct = torch.tensor([0, 1, 0, 1, 1, 1])
    bins = M.reliability_diagram_data(conf, correct, n_bins=5)
    path = tmp_path / "rel.png"
    fig = P.plot_reliability_diagram(bins, path)
    check_png(fig, path)
    assert fig.axes[0].get_title() == f"ECE = {bins.ece:.4f}"
    # the count panel has one bar per bin, matching the counts
    heights = [p.get_height() for p in fig.axes[1].patches]
    assert heights == bins.count.tolist()
    with pytest.raises(TypeError, match="ReliabilityBins"):
        P.plot_reliability_diagram({"confidence": conf}, path)


@pytest.mark.parametrize("dim", [2, 3])
def test_embedding_plot(tmp_path, dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(60, dim, generator=gen)
    labels = torch.arange(60) % 4 - 1  # includes -1 (noise)
    unc = torch.rand(60, generator=gen)
    path = tmp_path / f"emb{dim}.png"
    fig = P.plot_embedding_2d(emb, labels, unc, path)
    check_png(fig, path)
    assert len(fig.axes) == (1 if dim == 2 else 2)
    # every point is drawn exactly once across the panels, inside the projected disc
    offsets = np.concatenate(
        [c.get_offsets() for ax in fig.axes for c in ax.collections if len(c.get_offsets())]
    )
    assert offsets.shape == (60, 2)
    assert np.linalg.norm(offsets, axis=1).max() <= math.sqrt(2.0) + 1e-9
    # marker sizes follow the uncertainty
    sizes = np.concatenate([c.get_sizes() for ax in fig.axes for c in ax.collections])
    assert sizes.min() == pytest.approx(5.0) and sizes.max() == pytest.approx(85.0)


def test_embedding_plot_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"\(n, 2\) or \(n, 3\)"):
        P.plot_embedding_2d(torch.zeros(5, 4), torch.zeros(5), torch.zeros(5), tmp_path / "e.png")
    with pytest.raises(ValueError, match="must both have shape"):
        P.plot_embedding_2d(torch.ones(5, 2), torch.zeros(4), torch.zeros(5), tmp_path / "e.png")
    with pytest.raises(ValueError, match="NaN"):
        P.plot_embedding_2d(
            torch.ones(2, 2), torch.zeros(2), torch.tensor([0.0, math.nan]), tmp_path / "e.png"
        )


def test_titles_name_method_seed_and_data(tmp_path) -> None:
    conf = torch.tensor([0.1, 0.5, 0.9, 1.0])
    bins = M.reliability_diagram_data(conf, torch.tensor([0, 1, 1, 1]), n_bins=5)
    fig = P.plot_reliability_diagram(bins, tmp_path / "r.png", title="LAM all-layer diag\nseed 2")
    assert fig.axes[0].get_title() == f"LAM all-layer diag\nseed 2\nECE = {bins.ece:.4f}"
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [
        "accuracy in bin",
        "mean confidence",
        "gap to mean confidence",
        "perfect calibration",
    ]
    fig = P.plot_uncertainty_histograms({"a": torch.rand(5)}, tmp_path / "h.png", title="m, seed 1")
    assert fig.axes[0].get_title() == "m, seed 1"


def test_sparsification_panels_per_family(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    err = (torch.rand(200, generator=gen) < 0.2).float()
    good = M.sparsification_curve(err + torch.rand(200, generator=gen), err, n_steps=50)
    bad = M.sparsification_curve(torch.rand(200, generator=gen), err, n_steps=50)
    # a curve whose last points (a handful of queries) jump to 1 must not squash the others
    spike = M.SparsificationCurve(bad.fractions, bad.error.clone(), bad.oracle)
    spike.error[-2:] = 1.0
    groups = {"baselines": {"kNN": good}, "LAM, trace": {"diag": bad, "kron": spike}}
    fig = P.plot_sparsification(groups, tmp_path / "s.png", title="seed 0, digits")
    check_png(fig, tmp_path / "s.png")
    assert [ax.get_title() for ax in fig.axes] == ["baselines", "LAM, trace"]
    assert fig._suptitle.get_text() == "seed 0, digits"
    top = fig.axes[0].get_ylim()[1]
    assert top < 0.9 and top >= bad.error[bad.fractions <= 0.9].max().item()
    assert fig.axes[1].get_ylim() == fig.axes[0].get_ylim()  # shared y-axis
    with pytest.raises(ValueError, match="empty group"):
        P.plot_sparsification({"a": {}}, tmp_path / "x.png")


def test_embedding_plot_marks_ood_labels_axes_and_clips_sizes(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(100, 3, generator=gen)
    labels = torch.arange(100) % 4  # class 3 is OOD
    unc = torch.rand(100, generator=gen)
    unc[0] = 1e6  # one outlier must not shrink every other marker
    fig = P.plot_embedding_2d(emb, labels, unc, tmp_path / "e.png", ood_labels=[3], title="t")
    check_png(fig, tmp_path / "e.png")
    for ax in fig.axes:
        assert ax.get_xlabel().startswith("z[0]") and ax.get_ylabel().startswith("z[1]")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["0", "1", "2", "3 (OOD)"]
    sizes = np.concatenate([c.get_sizes() for ax in fig.axes for c in ax.collections])
    assert np.median(sizes) > 25  # min-max scaling would put nearly all at the minimum, 5
    assert sizes.max() == pytest.approx(85.0)
    assert fig._suptitle.get_text().startswith("t\nmarker size: uncertainty")


def test_uncertainty_histograms_log_scale(tmp_path) -> None:
    fig = P.plot_uncertainty_histograms(
        {"a": torch.tensor([1.0, 10.0, 100.0])}, tmp_path / "l.png", xlabel="trace", log=True
    )
    ax = fig.axes[0]
    assert ax.get_xlabel() == "log10 trace"
    assert ax.get_xlim()[1] < 3
    with pytest.raises(ValueError, match="positive"):
        P.plot_uncertainty_histograms({"a": torch.zeros(3)}, tmp_path / "z.png", log=True)


def _legend_outside(fig) -> bool:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    return ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1


def test_legends_cover_no_bar(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = {"ID": torch.rand(50, generator=gen), "noise": 1 + torch.rand(50, generator=gen)}
    assert _legend_outside(P.plot_uncertainty_histograms(scores, tmp_path / "h.png"))
    confidence = torch.rand(300, generator=gen)
    correct = torch.rand(300, generator=gen) < confidence
    bins = M.reliability_diagram_data(confidence, correct, n_bins=10)
    assert _legend_outside(P.plot_reliability_diagram(bins, tmp_path / "r.png"))
