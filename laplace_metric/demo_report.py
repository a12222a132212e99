"""Reporting of the demo: per-method metric rows, the table, the result files and the plots.

:mod:`laplace_metric.demo` runs the methods; this module formats what they measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from laplace_metric.baselines import train_encoder
from laplace_metric.datasets import OpenSetSplit, open_set_split
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.metrics import (
    map_at_r,
    ood_aupr,
    ood_auroc,
    recall_at_k,
    reliability_diagram_data,
    sparsification_curve,
    top1_labels,
)
from laplace_metric.registry import metric_laplace
from laplace_metric.scores import PosteriorScore, UncertaintyScorer

if TYPE_CHECKING:
    from laplace_metric.demo import DemoConfig, SeedResult

__all__ = ["COLUMNS", "SCORE_ROWS", "footer", "format_table", "write_plots", "write_results"]

COLUMNS = ("recall@1", "MAP@R", "AUROC held-out", "AUROC noise", "AUPR held-out", "AUSE", "ECE")

#: Row suffix of each LAM uncertainty score, in table order (the default score first).
SCORE_ROWS = {
    PosteriorScore.POSTERIOR_KNN: "posterior kNN",
    PosteriorScore.SAMPLED_STD: "sampled std",
    PosteriorScore.TRACE: "trace",
}


class _Evaluator:
    """Computes one row of metrics from OOD scores and retrieval embeddings."""

    def __init__(self, split: OpenSetSplit, device: torch.device, result: SeedResult) -> None:
        self.x_tr, self.y_tr = (t.to(device) for t in split.train.tensors)
        self.x_te, self.y_te = (t.to(device) for t in split.test.tensors)
        self.x_held = split.ood_classes.tensors[0].to(device)
        self.x_noise = split.ood_noise.tensors[0].to(device)
        self.result = result

    def row(
        self,
        name: str,
        score: Callable[[Tensor], Tensor],
        embed: Callable[[Tensor], Tensor] | None = None,
        confidence: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        s_in, s_held, s_noise = (
            score(x).detach().cpu() for x in (self.x_te, self.x_held, self.x_noise)
        )
        row = {
            "AUROC held-out": ood_auroc(s_in, s_held),
            "AUROC noise": ood_auroc(s_in, s_noise),
            "AUPR held-out": ood_aupr(s_in, s_held),
        }
        if embed is not None:
            emb_te, emb_tr = embed(self.x_te).cpu(), embed(self.x_tr).cpu()
            y_te, y_tr = self.y_te.cpu(), self.y_tr.cpu()
            row["recall@1"] = recall_at_k(emb_te, y_te, emb_tr, y_tr, k=1)
            row["MAP@R"] = map_at_r(emb_te, y_te, emb_tr, y_tr)
            wrong = (top1_labels(emb_te, emb_tr, y_tr) != y_te).double()
            curve = sparsification_curve(s_in, wrong, n_steps=50)
            row["AUSE"] = curve.error_area
            self.result.curves[name] = curve
        if confidence is not None:
            conf, correct = confidence
            bins = reliability_diagram_data(conf.cpu(), correct.cpu())
            row["ECE"] = bins.ece
            self.result.reliability[name] = bins
        self.result.rows[name] = row
        self.result.scores[name] = {
            "test (in-distribution)": s_in,
            "held-out classes": s_held,
            "noise": s_noise,
        }


def format_table(results: Sequence[SeedResult]) -> str:
    """Mean +- std over seeds of every method and metric, as a Markdown table."""
    header = "| method | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name in results[0].rows:
        cells = []
        for col in COLUMNS:
            values = torch.tensor(
                [r.rows[name].get(col, math.nan) for r in results], dtype=torch.float64
            )
            if torch.isnan(values).all():
                cells.append("-")
                continue
            std = values.std().item() if len(values) > 1 else 0.0
            digits = 4 if col in ("AUSE", "ECE") else 3
            cells.append(f"{values.mean().item():.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def write_plots(result: SeedResult, output_dir: Path, config: DemoConfig) -> list[Path]:
    """The plots of one seed: uncertainty histograms, sparsification, reliability, embedding.

    Every title names the method, the seed and the data; file names end in ``_seed<seed>``.
    """
    from laplace_metric.plots import (
        plot_reliability_diagram,
        plot_sparsification,
        plot_uncertainty_histograms,
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    data = _data_label(config, result)
    tag = f"seed{result.seed}"
    paths = []
    for name in (
        "LAM all-layer diag, posterior kNN",
        "LAM all-layer diag, trace",
        "kNN distance (deterministic)",
    ):
        if name not in result.scores:
            continue
        path = output_dir / f"uncertainty_{_slug(name)}_{tag}.png"
        plot_uncertainty_histograms(
            result.scores[name],
            path,
            xlabel=f"{name} score",
            title=f"{name}\n{data}",
            log=name.endswith("trace"),
        )
        paths.append(path)
    path = output_dir / f"sparsification_{tag}.png"
    plot_sparsification(
        _families(result.curves), path, title=f"Sparsification of the test queries ({data})"
    )
    paths.append(path)
    for name, bins in result.reliability.items():
        if "posterior kNN" in name or name.startswith("MC"):
            method = name.rpartition(", posterior kNN")[0] or name
            path = output_dir / f"reliability_{_slug(method)}_{tag}.png"
            plot_reliability_diagram(bins, path, title=f"{method}\n{data}")
            paths.append(path)
    paths.append(_embedding_picture(output_dir / f"embedding_3d_{tag}.png", config, result.seed))
    return paths


def _embedding_picture(path: Path, config: DemoConfig, seed: int) -> Path:
    """A 3-D encoder on the sphere, coloured by class, marker size = posterior kNN score."""
    from laplace_metric.demo import make_encoder  # the runner imports this module
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


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def footer(config: DemoConfig, results: Sequence[SeedResult], elapsed: float) -> str:
    """The note printed and written under the table: data, seeds, epochs, time, definitions."""
    seeds = [r.seed for r in results]
    partial = (
        ""
        if len(seeds) == len(config.seeds)
        else f" (partial: {len(seeds)} of {len(config.seeds)} seeds)"
    )
    return (
        f"\n{config.dataset}: in-distribution classes {list(config.id_classes)}, held-out "
        f"classes and uniform noise as OOD; seeds {seeds}{partial}, {config.epochs} epochs, "
        f"{elapsed:.0f} s. LAM scores: posterior kNN (the default of UncertaintyScorer), "
        "sampled std (LAM's), trace (linearised). OOD = positive class; AUSE: sparsification "
        "of the in-distribution test set by the score, error = wrong top-1 retrieval; ECE: "
        "top-1 retrieval confidence from weight / dropout samples, 10 bins."
    )


def write_results(
    config: DemoConfig, results: Sequence[SeedResult], output_dir: Path, elapsed: float
) -> str:
    """Write ``results.md`` and ``results.json`` for the seeds done so far; returns the table."""
    table = format_table(results)
    (output_dir / "results.md").write_text(table + "\n" + footer(config, results, elapsed) + "\n")
    (output_dir / "results.json").write_text(
        json.dumps([{"seed": r.seed, "rows": r.rows} for r in results], indent=1, default=float)
    )
    return table
