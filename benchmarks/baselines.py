"""Uncertainty baselines on the digits open-set split (BRIEF section 6), over 3 seeds.

Run: ``python benchmarks/baselines.py`` (about a minute on 2 CPU cores). Prints recall@1
(test queries against the training embeddings) and OOD AUROC (in-distribution test vs digits
6-9, and vs uniform noise; OOD is the positive class) as mean +- std over the seeds.
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
    penultimate,
    train_encoder,
)
from laplace_metric.datasets import digits_open_set  # noqa: E402
from laplace_metric.metrics import knn_distance_score, ood_auroc, recall_at_k  # noqa: E402


def mlp(dropout: float = 0.0) -> nn.Sequential:
    """The BRIEF encoder: 64-128-128-16, tanh (optionally dropout after each hidden layer)."""
    layers: list[nn.Module] = []
    for d_in, d_out in [(64, 128), (128, 128)]:
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(128, 16))


def run_seed(seed: int, epochs: int, n_members: int, batch_size: int) -> dict[str, tuple]:
    split = digits_open_set(seed=seed)
    x_tr, y_tr = split.train.tensors
    x_te, y_te = split.test.tensors
    x_dig, x_noise = split.ood_digits.tensors[0], split.ood_noise.tensors[0]
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(split.train, batch_size=batch_size, shuffle=True, generator=gen)

    def trainer(enc: nn.Module, s: int) -> None:
        train_encoder(enc, loader, epochs=epochs, lr=1e-3, seed=s, progress=False)

    def evaluate(baseline, retrieval: bool = True) -> tuple:
        s_in = baseline.score(x_te)
        r1 = float("nan")
        if retrieval:
            r1 = recall_at_k(baseline.embed(x_te), y_te, baseline.embed(x_tr), y_tr, k=1)
        return r1, ood_auroc(s_in, baseline.score(x_dig)), ood_auroc(s_in, baseline.score(x_noise))

    rows: dict[str, tuple] = {}
    torch.manual_seed(100 * seed)
    det = mlp()
    trainer(det, 100 * seed)
    for k in (1, 5):
        rows[f"kNN distance (k={k})"] = evaluate(KNNDistanceBaseline(det, k=k).fit(x_tr))
    rows["Mahalanobis, penultimate"] = evaluate(
        MahalanobisBaseline(penultimate(det)).fit(x_tr, y_tr), retrieval=False
    )
    torch.manual_seed(100 * seed + 50)
    drop = mlp(dropout=0.1)
    trainer(drop, 100 * seed + 50)
    for score in ("trace", "std_sum"):
        rows[f"MC dropout p=0.1 ({score})"] = evaluate(
            MCDropoutBaseline(drop, n_samples=30, score=score, seed=seed).fit(x_tr)
        )
    seeds = [100 * seed + 1 + i for i in range(n_members)]
    ens = DeepEnsembleBaseline.train(mlp, trainer, seeds, k=1).fit(x_tr)
    rows[f"ensemble of {n_members}, mean kNN"] = evaluate(ens)
    ens.score_kind = EnsembleScore.EMBEDDING_STD
    rows[f"ensemble of {n_members}, embedding std"] = evaluate(ens)
    s_in = knn_distance_score(x_te, x_tr, 1)
    rows["kNN on raw pixels"] = (
        float("nan"),
        ood_auroc(s_in, knn_distance_score(x_dig, x_tr, 1)),
        ood_auroc(s_in, knn_distance_score(x_noise, x_tr, 1)),
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="tiny MLPs: 1 thread is fastest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = [run_seed(s, args.epochs, args.members, args.batch_size) for s in args.seeds]
    header = (
        f"{'method':34s} | {'recall@1':>13s} | {'AUROC digits 6-9':>16s} | {'AUROC noise':>13s}"
    )
    print(header)
    print("-" * len(header))
    for name in results[0]:
        cells = []
        for col in range(3):
            vals = torch.tensor([r[name][col] for r in results], dtype=torch.float64)
            if torch.isnan(vals).all():
                cells.append("-")
            else:
                std = vals.std().item() if len(vals) > 1 else 0.0
                cells.append(f"{vals.mean().item():.3f} +- {std:.3f}")
        print(f"{name:34s} | {cells[0]:>13s} | {cells[1]:>16s} | {cells[2]:>13s}")
    print(
        f"\nseeds {args.seeds}, {args.epochs} epochs, batch {args.batch_size}, "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
