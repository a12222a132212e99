"""The demo's plots of one seed: uncertainty histograms, sparsification, reliability, sphere."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from laplace_metric.baselines import train_encoder
from laplace_metric.data import open_set_split
from laplace_metric.demo.config import DemoConfig, make_encoder
from laplace_metric.demo.report import SCORE_ROWS
from laplace_metric.evaluation import SeedResult, slug
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.registry import metric_laplace
from laplace_metric.scores import PosteriorScore, UncertaintyScorer

__all__ = ["write_plots"]


def _families(curves: dict) -> dict[str, dict]:
    """Sparsification curves grouped into panels: baselines, then one panel per LAM score."""
    groups: dict[str, dict] = {"baselines": {}}
    for score, suffix in SCORE_ROWS.items():
        default = " (default)" if score == PosteriorScore.POSTERIOR_KNN else ""
        groups[f"LAM, {suffix}{default}"] = {}
    for name, curve in curves.items():
        method, _, suffix = name.rpartition(", ")
        panel = next((g for g in groups if g.startswith(f"LAM, {suffix}")), None)
        if name.startswith(("LAM", "online LAM")) and panel is not None:
            groups[panel][method] = curve
        else:
            groups["baselines"][name] = curve
    return {g: c for g, c in groups.items() if c}


def _data_label(config: DemoConfig, result: SeedResult) -> str:
    ids = list(config.id_classes)
    return f"{config.dataset}, seed {result.seed}, in-distribution classes {ids}"


def _histograms(result: SeedResult, output_dir: Path, data: str, tag: str) -> list[Path]:
    from laplace_metric.plots import plot_uncertainty_histograms

    paths = []
    for name in (
        "LAM all-layer diag, posterior kNN",
        "LAM all-layer diag, trace",
        "kNN distance (deterministic)",
    ):
        if name not in result.scores:
            continue
        path = output_dir / f"uncertainty_{slug(name)}_{tag}.png"
        plot_uncertainty_histograms(
            result.scores[name],
            path,
            xlabel=f"{name} score",
            title=f"{name}\n{data}",
            log=name.endswith("trace"),
        )
        paths.append(path)
    return paths


def write_plots(result: SeedResult, output_dir: Path, config: DemoConfig) -> list[Path]:
    """The plots of one seed: uncertainty histograms, sparsification, reliability, embedding.

    Every title names the method, the seed and the data; file names end in ``_seed<seed>``.
    """
    from laplace_metric.plots import plot_reliability_diagram, plot_sparsification

    output_dir.mkdir(parents=True, exist_ok=True)
    data = _data_label(config, result)
    tag = f"seed{result.seed}"
    paths = _histograms(result, output_dir, data, tag)
    path = output_dir / f"sparsification_{tag}.png"
    plot_sparsification(
        _families(result.curves), path, title=f"Sparsification of the test queries ({data})"
    )
    paths.append(path)
    for name, bins in result.reliability.items():
        if "posterior kNN" in name or name.startswith("MC"):
            method = name.rpartition(", posterior kNN")[0] or name
            path = output_dir / f"reliability_{slug(method)}_{tag}.png"
            plot_reliability_diagram(bins, path, title=f"{method}\n{data}")
            paths.append(path)
    paths.append(_embedding_picture(output_dir / f"embedding_3d_{tag}.png", config, result.seed))
    return paths


def _embedding_picture(path: Path, config: DemoConfig, seed: int) -> Path:
    """A 3-D encoder on the sphere, coloured by class, marker size = posterior kNN score."""
    from laplace_metric.plots import plot_embedding_2d

    split = open_set_split(
        config.dataset, seed=seed, id_classes=tuple(config.id_classes), root=config.data_root
    )
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(split.train, batch_size=config.batch_size, shuffle=True, generator=gen)
    torch.manual_seed(seed)
    encoder = make_encoder(split.train.tensors[0][0].numel(), hidden=64, out_dim=3)
    likelihood = ContrastiveLikelihood(margin=config.margin)
    train_encoder(
        encoder,
        loader,
        lambda g, y: likelihood.loss(g, y, reduction="mean"),
        epochs=config.epochs,
        seed=seed,
        progress_bar=False,
    )
    la = metric_laplace(encoder, likelihood, "last_layer", "full")
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    x = torch.cat([split.test.tensors[0], split.ood_classes.tensors[0][:200]])
    labels = torch.cat([split.test.tensors[1], split.ood_classes.tensors[1][:200]])
    mean, _ = la(x)
    scorer = UncertaintyScorer(la, database=split.train.tensors[0], n_samples=config.n_samples)
    ood = sorted(set(split.ood_classes.tensors[1].tolist()))
    plot_embedding_2d(
        mean,
        labels,
        scorer(x),
        path,
        ood_labels=ood,
        title=(
            f"3-D encoder (MLP {x.shape[1]}-64-64-3), last-layer full LAM; test images and "
            "200 held-out (OOD) images"
            f"\n{config.dataset}, seed {seed}, in-distribution classes "
            f"{list(config.id_classes)}"
        ),
        size_label="posterior kNN score",
    )
    return path
