"""Euclidean contrastive loss vs a learned ICNN Bregman divergence on ``load_digits``.

In-distribution classes 0-5 (train / held-out test images), OOD = classes 6-9. An MLP encoder
64-128-16 (tanh, L2-normalised embeddings) is trained with (a) the contrastive loss on the
squared Euclidean distance and (b) the contrastive loss on a jointly learned ICNN Bregman
divergence (strong-convexity alpha = 2, whose quadratic part alone is the Euclidean loss, and
alpha = 0.5, where the learned part matters more), same epochs, batches and seeds. Reported per method (mean +- std over seeds):

* recall@1 and MAP@R of test queries against the training embeddings (pml
  ``AccuracyCalculator``; Bregman kNN ``D(query, item)`` for (b));
* OOD AUROC (test 0-5 vs 6-9) of the deterministic kNN score (distance / divergence to the
  nearest training embedding) and of a post-hoc Laplace posterior (score: trace of the GLM
  predictive covariance of the embedding; prior precision by marginal likelihood).

Run from the repository root: ``PYTHONPATH=. python benchmarks/bregman.py`` (about 1-2 minutes
on one CPU core; add ``--laplace last_layer/kron last_layer/full`` for the dense last-layer
posterior, about 35 s more per method and seed).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import laplace
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import laplace_metric  # noqa: F401, E402  (registers the pairwise likelihoods with laplace.Laplace)
from laplace_metric.bregman import BregmanDivergence, BregmanKNN, ICNNPotential, bregman_knn  # noqa: E402
from laplace_metric.bregman.losses import fit_bregman  # noqa: E402
from laplace_metric.evaluation import Column, ResultTable  # noqa: E402
from laplace_metric.likelihoods import ContrastiveLikelihood  # noqa: E402

ID_CLASSES = 6
# marginal-likelihood steps for the prior precision (a dense 2064 x 2064 posterior is slow)
MARGLIK_STEPS = {"diag": 100, "kron": 100, "full": 30}


def load_split(seed: int) -> dict[str, torch.Tensor]:
    """Train / test images of classes 0-5 and the OOD images of classes 6-9."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    ind = y < ID_CLASSES
    x_tr, x_te, y_tr, y_te = train_test_split(
        x[ind], y[ind], test_size=0.3, stratify=y[ind], random_state=seed
    )
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, "x_ood": x[~ind]}


def encoder() -> nn.Module:
    """MLP 64-128-16 with tanh."""
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16))


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised embeddings of ``x`` without autograd."""
    with torch.no_grad():
        return nn.functional.normalize(model(x), dim=1)


def retrieval(z_query, y_query, z_ref, y_ref, knn_func) -> dict[str, float]:
    """recall@1 and MAP@R of queries against references with pml's ``AccuracyCalculator``."""
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), knn_func=knn_func
    )
    acc = calc.get_accuracy(z_query, y_query, z_ref, y_ref)
    return {"recall@1": acc["precision_at_1"], "MAP@R": acc["mean_average_precision_at_r"]}


def auroc(score_id: torch.Tensor, score_ood: torch.Tensor) -> float:
    """AUROC of separating OOD (positive class) from ID by a score (higher = OOD)."""
    scores = torch.cat([score_id, score_ood]).float()
    target = torch.cat([torch.zeros(len(score_id)), torch.ones(len(score_ood))]).long()
    return float(binary_auroc(scores, target))


def laplace_auroc(
    model, data, likelihood: str, structure: str, subset: str, marglik_steps: int, **kwargs
) -> float:
    """OOD AUROC of the trace of the Laplace GLM predictive covariance."""
    loader = DataLoader(
        TensorDataset(data["x_train"], data["y_train"]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    la = laplace.Laplace(
        model,
        likelihood=likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        hessian_method="positives",
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader)
        la.optimize_prior_precision(method="marglik", n_steps=marglik_steps)
    return auroc(
        la.predictive_uncertainty(data["x_test"]), la.predictive_uncertainty(data["x_ood"])
    )


def method_label(method: str) -> str:
    """Row label of a method key."""
    if method == "euclidean":
        return "(a) Euclidean contrastive"
    return f"(b) ICNN Bregman, alpha={float(method.split('=')[1]):g}"


def _train(method: str, model: nn.Module, loader: DataLoader, epochs: int):
    """Train ``model`` for ``method``; returns the retrieval kNN and the divergence (or None)."""
    if method == "euclidean":
        lik = ContrastiveLikelihood(margin=1.0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            for xb, yb in loader:
                opt.zero_grad()
                lik.loss(model(xb), yb, reduction="mean").backward()
                opt.step()
        model.eval()
        return CustomKNN(LpDistance(normalize_embeddings=True)), None
    # alpha = 2: the quadratic part alone gives ||x - y||^2, the Euclidean loss (a)
    alpha = float(method.split("=")[1])
    div = BregmanDivergence(ICNNPotential(16, hidden=(64, 64), alpha=alpha))
    fit_bregman(
        model, div, loader, epochs=epochs, lr=1e-3, loss="contrastive", margin=1.0,
        progress_bar=False,
    )  # fmt: skip
    return BregmanKNN(div), div


def _laplace_rows(row: dict, model, data, div, laplace_configs) -> None:
    """The Laplace OOD AUROC and fit time of every (subset, structure) into ``row``."""
    for subset, structure in laplace_configs:
        start = time.perf_counter()
        kwargs = {"margin": 1.0}
        if div is None:
            name = "contrastive"
        else:
            name = "bregman"
            kwargs["divergence"] = div
        row[f"AUROC LA {subset}/{structure}"] = laplace_auroc(
            model, data, name, structure, subset, MARGLIK_STEPS[structure], **kwargs
        )
        row[f"LA {subset}/{structure} s"] = time.perf_counter() - start


def run_seed(
    seed: int, epochs: int, alphas: list[float], laplace_configs: list[tuple[str, str]]
) -> dict[str, dict]:
    """Train, evaluate and fit Laplace for every method on one seed's split."""
    data = load_split(seed)
    results: dict[str, dict] = {}
    for method in ["euclidean"] + [f"bregman alpha={a}" for a in alphas]:
        torch.manual_seed(seed)
        model = encoder()
        loader = DataLoader(
            TensorDataset(data["x_train"], data["y_train"]),
            batch_size=64,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        start = time.perf_counter()
        knn, div = _train(method, model, loader, epochs)
        train_time = time.perf_counter() - start
        z_tr, z_te, z_ood = (embed(model, data[k]) for k in ("x_train", "x_test", "x_ood"))
        row = retrieval(z_te, data["y_test"], z_tr, data["y_train"], knn)
        if div is None:
            nn_id = torch.cdist(z_te, z_tr).min(1).values
            nn_ood = torch.cdist(z_ood, z_tr).min(1).values
        else:
            nn_id = bregman_knn(z_te, z_tr, 1, div)[0][:, 0]
            nn_ood = bregman_knn(z_ood, z_tr, 1, div)[0][:, 0]
        row["AUROC kNN"] = auroc(nn_id, nn_ood)
        row["train s"] = train_time
        _laplace_rows(row, model, data, div, laplace_configs)
        results[method] = row
    return results


def main() -> None:
    """Parse arguments, run all seeds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument(
        "--laplace",
        nargs="*",
        default=["last_layer/kron"],
        help="subset/structure pairs for the Laplace OOD AUROC",
    )
    parser.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        default=[2.0, 0.5],
        help="strong-convexity moduli of the ICNN potentials (2 nests the Euclidean loss)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = [tuple(c.split("/")) for c in args.laplace]
    start = time.perf_counter()
    per_seed = [run_seed(s, args.epochs, args.alphas, configs) for s in args.seeds]
    names = list(per_seed[0]["euclidean"])
    table = ResultTable([Column(c, digits=1 if c.endswith(" s") else 3) for c in names])
    for method in per_seed[0]:
        table.add_row(method_label(method), {c: [r[method][c] for r in per_seed] for c in names})
    print(
        f"digits: train classes 0-{ID_CLASSES - 1}, OOD 6-9; MLP 64-128-16; {args.epochs} "
        f"epochs; seeds {args.seeds}; mean ± std (sample std over seeds)\n"
    )
    print(table.to_markdown())
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
