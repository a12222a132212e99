"""Uncertainty baselines on the digits open-set split, over 3 seeds.

Run: ``python benchmarks/baselines.py [--plots DIR]`` (under 2 minutes on 2 CPU cores). Prints
recall@1 (test queries against the training embeddings), OOD AUROC (in-distribution test vs
digits 6-9, and vs uniform noise; OOD is the positive class), the area between the
sparsification curve of the OOD score and its oracle (AUSE) and, for MC dropout, the retrieval
ECE, as mean ± std over the seeds (a Markdown table).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from laplace_metric.baselines import (  # noqa: E402
    DeepEnsembleBaseline,
    EnsembleScore,
    KNNDistanceBaseline,
    MahalanobisBaseline,
    MCDropoutBaseline,
    PFEBaseline,
    penultimate,
    train_encoder,
)
from laplace_metric.data import digits_open_set  # noqa: E402
from laplace_metric.evaluation import (  # noqa: E402
    Column,
    ResultTable,
    SeedResult,
    calibration_metrics,
    sparsification_metrics,
)
from laplace_metric.metrics import (  # noqa: E402
    knn_distance_score,
    ood_auroc,
    recall_at_k,
    retrieval_confidence_from_samples,
    top1_labels,
)
from laplace_metric.plots import (  # noqa: E402
    plot_reliability_diagram,
    plot_sparsification,
    plot_uncertainty_histograms,
)


def mlp(dropout: float = 0.0) -> nn.Sequential:
    """The demo's encoder: 64-128-128-16, tanh (optionally dropout after each hidden layer)."""
    layers: list[nn.Module] = []
    for d_in, d_out in [(64, 128), (128, 128)]:
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(128, 16))


COLUMNS = ("recall@1", "AUROC 6-9", "AUROC noise", "AUSE", "ECE")


class _Seed:
    """One seed's split, trainer and evaluator (rows go into a :class:`SeedResult`)."""

    def __init__(self, seed: int, epochs: int, batch_size: int, plot_dir: Path | None) -> None:
        split = digits_open_set(seed=seed)
        self.seed, self.epochs, self.plot_dir = seed, epochs, plot_dir
        self.x_tr, self.y_tr = split.train.tensors
        self.x_te, self.y_te = split.test.tensors
        self.x_dig, self.x_noise = split.ood_digits.tensors[0], split.ood_noise.tensors[0]
        gen = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(split.train, batch_size=batch_size, shuffle=True, generator=gen)
        self.result = SeedResult(seed=seed)

    def trainer(self, enc: nn.Module, s: int) -> None:
        train_encoder(enc, self.loader, epochs=self.epochs, lr=1e-3, seed=s, progress_bar=False)

    def evaluate(self, name: str, baseline, retrieval: bool = True) -> None:
        """Record the row ``name`` of ``baseline`` (OOD AUROCs; recall@1 and AUSE)."""
        s_in = baseline.score(self.x_te)
        s_dig, s_noise = baseline.score(self.x_dig), baseline.score(self.x_noise)
        row = {"AUROC 6-9": ood_auroc(s_in, s_dig), "AUROC noise": ood_auroc(s_in, s_noise)}
        curve = None
        if retrieval:
            emb_te, emb_tr = baseline.embed(self.x_te), baseline.embed(self.x_tr)
            row["recall@1"] = recall_at_k(emb_te, self.y_te, emb_tr, self.y_tr, k=1)
            wrong = top1_labels(emb_te, emb_tr, self.y_tr) != self.y_te
            ause, curve = sparsification_metrics(s_in, wrong, n_steps=100)
            row.update(ause)
        self.result.add_row(name, row, curve=curve)
        if self.plot_dir is not None and self.seed == 0:
            slug = name.split(" (")[0].replace(" ", "_").replace(",", "")
            plot_uncertainty_histograms(
                {"ID test": s_in, "digits 6-9": s_dig, "noise": s_noise},
                self.plot_dir / f"hist_{slug}.png",
                xlabel=f"{name} score",
            )


def _deterministic_rows(s: _Seed) -> None:
    torch.manual_seed(100 * s.seed)
    det = mlp()
    s.trainer(det, 100 * s.seed)
    for k in (1, 5):
        s.evaluate(f"kNN distance (k={k})", KNNDistanceBaseline(det, k=k).fit(s.x_tr))
    maha = MahalanobisBaseline(penultimate(det)).fit(s.x_tr, s.y_tr)
    s.evaluate("Mahalanobis, penultimate", maha, False)
    pfe = PFEBaseline(det).fit(s.x_tr, s.y_tr, seed=s.seed)
    s.evaluate("PFE (variance head, frozen det.)", pfe)


def _dropout_rows(s: _Seed):
    """MC dropout rows; the retrieval ECE from the samples' top-1 agreement."""
    torch.manual_seed(100 * s.seed + 50)
    drop = mlp(dropout=0.1)
    s.trainer(drop, 100 * s.seed + 50)
    for score in ("trace", "std_sum"):
        mc = MCDropoutBaseline(drop, n_samples=30, score=score, seed=s.seed).fit(s.x_tr)
        s.evaluate(f"MC dropout p=0.1 ({score})", mc)
    conf, pred = retrieval_confidence_from_samples(
        mc.samples(s.x_te), mc.embed(s.x_tr), s.y_tr, mean_emb=mc.embed(s.x_te)
    )
    ece, bins = calibration_metrics(conf, pred == s.y_te)
    for score in ("trace", "std_sum"):
        s.result.rows[f"MC dropout p=0.1 ({score})"].update(ece)
    return bins


def run_seed(
    seed: int, epochs: int, n_members: int, batch_size: int, plot_dir: Path | None
) -> SeedResult:
    """Every baseline on one seed of the digits open-set split."""
    s = _Seed(seed, epochs, batch_size, plot_dir)
    _deterministic_rows(s)
    bins = _dropout_rows(s)
    seeds = [100 * seed + 1 + i for i in range(n_members)]
    ens = DeepEnsembleBaseline.train(mlp, s.trainer, seeds, k=1).fit(s.x_tr)
    s.evaluate(f"ensemble of {n_members}, mean kNN", ens)
    ens.score_kind = EnsembleScore.EMBEDDING_STD
    s.evaluate(f"ensemble of {n_members}, embedding std", ens)
    s_in = knn_distance_score(s.x_te, s.x_tr, 1)
    s.result.add_row(
        "kNN on raw pixels",
        {
            "AUROC 6-9": ood_auroc(s_in, knn_distance_score(s.x_dig, s.x_tr, 1)),
            "AUROC noise": ood_auroc(s_in, knn_distance_score(s.x_noise, s.x_tr, 1)),
        },
    )
    if plot_dir is not None and seed == 0:
        plot_sparsification(s.result.curves, plot_dir / "sparsification.png")
        plot_reliability_diagram(bins, plot_dir / "reliability_mc_dropout.png")
    return s.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per encoder")
    parser.add_argument("--members", type=int, default=5, help="deep-ensemble size")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--threads", type=int, default=1, help="tiny MLPs: 1 thread is fastest")
    parser.add_argument("--plots", type=Path, default=None, help="write seed-0 plots here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = [
        run_seed(s, args.epochs, args.members, args.batch_size, args.plots) for s in args.seeds
    ]
    columns = [Column(c, digits=4 if c in ("AUSE", "ECE") else 3) for c in COLUMNS]
    print(ResultTable.from_seeds(results, columns).to_markdown())
    print(
        f"\nseeds {args.seeds}, {args.epochs} epochs, batch {args.batch_size}, "
        f"{time.perf_counter() - start:.0f} s. recall@1: test queries vs training embeddings; "
        "AUROC: OOD positive; AUSE: sparsification by the OOD score, errors = top-1 wrong; "
        "ECE: MC-dropout sample agreement as retrieval confidence, 10 bins."
    )


if __name__ == "__main__":
    main()
