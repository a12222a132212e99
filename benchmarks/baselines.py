"""Uncertainty baselines on the digits open-set split, over 3 seeds.

Run: ``python benchmarks/baselines.py [--plots DIR]`` (under 2 minutes on 2 CPU cores). Prints
recall@1 (test queries against the training embeddings), OOD AUROC (in-distribution test vs
digits 6-9, and vs uniform noise; OOD is the positive class), the area between the
sparsification curve of the OOD score and its oracle (AUSE) and, for MC dropout, the retrieval
ECE, as mean +- std over the seeds.
"""

from __future__ import annotations

import argparse
import math
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
from laplace_metric.datasets import digits_open_set  # noqa: E402
from laplace_metric.metrics import (  # noqa: E402
    SparsificationCurve,
    knn_distance_score,
    ood_auroc,
    recall_at_k,
    reliability_diagram_data,
    retrieval_confidence_from_samples,
    sparsification_curve,
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


def run_seed(
    seed: int, epochs: int, n_members: int, batch_size: int, plot_dir: Path | None
) -> dict[str, dict[str, float]]:
    split = digits_open_set(seed=seed)
    x_tr, y_tr = split.train.tensors
    x_te, y_te = split.test.tensors
    x_dig, x_noise = split.ood_digits.tensors[0], split.ood_noise.tensors[0]
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(split.train, batch_size=batch_size, shuffle=True, generator=gen)
    curves: dict[str, SparsificationCurve] = {}

    def trainer(enc: nn.Module, s: int) -> None:
        train_encoder(enc, loader, epochs=epochs, lr=1e-3, seed=s, progress_bar=False)

    def evaluate(name: str, baseline, retrieval: bool = True) -> dict[str, float]:
        s_in = baseline.score(x_te)
        s_dig, s_noise = baseline.score(x_dig), baseline.score(x_noise)
        row = {"AUROC 6-9": ood_auroc(s_in, s_dig), "AUROC noise": ood_auroc(s_in, s_noise)}
        if retrieval:
            emb_te, emb_tr = baseline.embed(x_te), baseline.embed(x_tr)
            row["recall@1"] = recall_at_k(emb_te, y_te, emb_tr, y_tr, k=1)
            wrong = (top1_labels(emb_te, emb_tr, y_tr) != y_te).double()
            curves[name] = sparsification_curve(s_in, wrong, n_steps=100)
            row["AUSE"] = curves[name].error_area
        if plot_dir is not None and seed == 0:
            slug = name.split(" (")[0].replace(" ", "_").replace(",", "")
            plot_uncertainty_histograms(
                {"ID test": s_in, "digits 6-9": s_dig, "noise": s_noise},
                plot_dir / f"hist_{slug}.png",
                xlabel=f"{name} score",
            )
        return row

    rows: dict[str, dict[str, float]] = {}
    torch.manual_seed(100 * seed)
    det = mlp()
    trainer(det, 100 * seed)
    for k in (1, 5):
        name = f"kNN distance (k={k})"
        rows[name] = evaluate(name, KNNDistanceBaseline(det, k=k).fit(x_tr))
    name = "Mahalanobis, penultimate"
    rows[name] = evaluate(name, MahalanobisBaseline(penultimate(det)).fit(x_tr, y_tr), False)
    name = "PFE (variance head, frozen det.)"
    rows[name] = evaluate(name, PFEBaseline(det).fit(x_tr, y_tr, seed=seed))
    torch.manual_seed(100 * seed + 50)
    drop = mlp(dropout=0.1)
    trainer(drop, 100 * seed + 50)
    for score in ("trace", "std_sum"):
        name = f"MC dropout p=0.1 ({score})"
        mc = MCDropoutBaseline(drop, n_samples=30, score=score, seed=seed).fit(x_tr)
        rows[name] = evaluate(name, mc)
    # retrieval calibration of MC dropout: agreement of the samples' top-1 labels
    conf, pred = retrieval_confidence_from_samples(
        mc.samples(x_te), mc.embed(x_tr), y_tr, mean_emb=mc.embed(x_te)
    )
    bins = reliability_diagram_data(conf, pred == y_te)
    rows[name]["ECE"] = rows["MC dropout p=0.1 (trace)"]["ECE"] = bins.ece
    seeds = [100 * seed + 1 + i for i in range(n_members)]
    ens = DeepEnsembleBaseline.train(mlp, trainer, seeds, k=1).fit(x_tr)
    name = f"ensemble of {n_members}, mean kNN"
    rows[name] = evaluate(name, ens)
    ens.score_kind = EnsembleScore.EMBEDDING_STD
    name = f"ensemble of {n_members}, embedding std"
    rows[name] = evaluate(name, ens)
    s_in = knn_distance_score(x_te, x_tr, 1)
    rows["kNN on raw pixels"] = {
        "AUROC 6-9": ood_auroc(s_in, knn_distance_score(x_dig, x_tr, 1)),
        "AUROC noise": ood_auroc(s_in, knn_distance_score(x_noise, x_tr, 1)),
    }
    if plot_dir is not None and seed == 0:
        plot_sparsification(curves, plot_dir / "sparsification.png")
        plot_reliability_diagram(bins, plot_dir / "reliability_mc_dropout.png")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="tiny MLPs: 1 thread is fastest")
    parser.add_argument("--plots", type=Path, default=None, help="write seed-0 plots here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = [
        run_seed(s, args.epochs, args.members, args.batch_size, args.plots) for s in args.seeds
    ]
    header = f"{'method':34s} | " + " | ".join(f"{c:>15s}" for c in COLUMNS)
    print(header)
    print("-" * len(header))
    for name in results[0]:
        cells = []
        for col in COLUMNS:
            vals = torch.tensor([r[name].get(col, math.nan) for r in results], dtype=torch.float64)
            if torch.isnan(vals).all():
                cells.append("-")
            else:
                std = vals.std().item() if len(vals) > 1 else 0.0
                d = 4 if col == "AUSE" else 3
                cells.append(f"{vals.mean().item():.{d}f} +- {std:.{d}f}")
        print(f"{name:34s} | " + " | ".join(f"{c:>15s}" for c in cells))
    print(
        f"\nseeds {args.seeds}, {args.epochs} epochs, batch {args.batch_size}, "
        f"{time.perf_counter() - start:.0f} s. recall@1: test queries vs training embeddings; "
        "AUROC: OOD positive; AUSE: sparsification by the OOD score, errors = top-1 wrong; "
        "ECE: MC-dropout sample agreement as retrieval confidence, 10 bins."
    )


if __name__ == "__main__":
    main()
