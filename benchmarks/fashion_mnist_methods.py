"""The methods of ``fashion_mnist.py``: data, LAM's CNN, training, and one seed's rows.

Every method adds its rows to an :class:`Evaluator` (a thin layer over
:mod:`laplace_metric.evaluation`); last-layer posteriors are scored on cached penultimate
features through :class:`laplace_metric.predictive.HeadSamples`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Usage, measure  # noqa: E402

from laplace_metric.data.idx import load_idx_dataset  # noqa: E402
from laplace_metric.evaluation import (  # noqa: E402
    SeedResult,
    calibration_metrics,
    ood_metrics,
    retrieval_metrics,
    sparsification_metrics,
)
from laplace_metric.likelihoods import ContrastiveLikelihood  # noqa: E402
from laplace_metric.predictive import (  # noqa: E402
    HeadSamples,
    head_features,
)

if TYPE_CHECKING:
    from fashion_mnist import BenchConfig


class Score(str, Enum):
    """OOD scores reported for each method."""

    LAM_STD = "LAM std"
    """LAM's score: sum over dimensions of the std of sampled normalised embeddings."""

    SAMPLED_KNN = "sampled kNN"
    """Posterior-averaged distance to the nearest training embedding (this package)."""

    KNN = "kNN"
    """Distance to the nearest training embedding of one deterministic encoder."""

    PFE_VARIANCE = "harmonic-mean variance"
    """PFE's own uncertainty."""


STAGES = (
    "deterministic",
    "MC dropout",
    "deep ensemble",
    "PFE",
    "controls",
    "post-hoc LAM last-layer diag",
    "post-hoc LAM last-layer kron",
    "post-hoc LAM all-layer diag",
    "online LAM last-layer diag",
)


def active_stages(config: BenchConfig) -> tuple[str, ...]:
    """The stages that ``config`` runs, in order."""
    skip = set()
    if not config.kron:
        skip.add("post-hoc LAM last-layer kron")
    if not config.all_layer:
        skip.add("post-hoc LAM all-layer diag")
    return tuple(s for s in STAGES if s not in skip)


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Data:
    """Tensors of one seed: images ``(N, 1, 28, 28)`` in ``[0, 1]`` and labels."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    x_ood: Tensor
    source: str

    def splits(self) -> dict[str, Tensor]:
        """The images scored by every method: ``train``, ``test`` and ``ood``."""
        return {"train": self.x_train, "test": self.x_test, "ood": self.x_ood}


def _images(x: np.ndarray) -> Tensor:
    return torch.as_tensor(x, dtype=torch.float32).div(255.0).unsqueeze(1)


def _stratified(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take = [idx[: n // len(classes) + (i < n % len(classes))] for i, idx in enumerate(per_class)]
    return rng.permutation(np.concatenate(take))


def load_data(config: BenchConfig, seed: int) -> Data:
    """Seeded, stratified subsets of FashionMNIST (train / val / test) and MNIST test (OOD)."""
    fashion = load_idx_dataset("fashion_mnist", config.data_root, config.download)
    mnist = load_idx_dataset("mnist", config.data_root, config.download)
    rng = np.random.default_rng(seed)
    n_fit = config.n_train + config.n_val
    if n_fit > len(fashion.y_train):
        raise ValueError(f"n_train + n_val = {n_fit} exceeds the {len(fashion.y_train)} images.")
    pool = _stratified(fashion.y_train, n_fit, rng)
    train, val = pool[: config.n_train], pool[config.n_train :]
    test = _stratified(fashion.y_test, min(config.n_test, len(fashion.y_test)), rng)
    ood = rng.permutation(len(mnist.y_test))[: config.n_ood]
    y = torch.as_tensor(fashion.y_train)
    return Data(
        x_train=_images(fashion.x_train[train]),
        y_train=y[train],
        x_val=_images(fashion.x_train[val]),
        y_val=y[val],
        x_test=_images(fashion.x_test[test]),
        y_test=torch.as_tensor(fashion.y_test)[test],
        x_ood=_images(mnist.x_test[ood]),
        source=f"FashionMNIST: {fashion.source}; MNIST: {mnist.source}",
    )


# ---------------------------------------------------------------------------- model
def lam_encoder(dim: int, dropout: float = 0.0) -> nn.Sequential:
    """LAM's CNN: Conv 1-32-3, ReLU, Conv 32-64-3, ReLU, MaxPool 2, Flatten, Linear 9216-D.

    The L2 normalisation is applied by the likelihood (``normalize=True``), not by a layer, so
    the last module is the Linear head that last-layer Laplace works on. ``dropout > 0`` puts a
    Dropout on the head input.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    ]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(9216, dim))


def make_loader(data: Data, config: BenchConfig, seed: int) -> DataLoader:
    """Shuffled training batches of ``config.batch_size`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(data.x_train, data.y_train)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=gen)


def train(
    model: nn.Module,
    loader: DataLoader,
    config: BenchConfig,
    seed: int,
    on_epoch: Callable[[int], None] | None = None,
) -> nn.Module:
    """Adam on the mean contrastive loss over all in-batch pairs; ``model`` left in eval mode."""
    likelihood = ContrastiveLikelihood(margin=config.margin)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    for epoch in range(config.epochs):
        model.train()
        for x, y in loader:
            loss = likelihood.loss(model(x), y, reduction="mean")
            if not torch.isfinite(loss):
                raise ValueError("The training loss became NaN or inf; lower --lr.")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return model


def all_features(encoder: nn.Sequential, data: Data) -> dict[str, Tensor]:
    """Penultimate features of the ``train``, ``test`` and ``ood`` images."""
    return {k: head_features(encoder, x) for k, x in data.splits().items()}


def knn(query: Tensor, db: Tensor) -> Tensor:
    """Distance of each query to its nearest database item."""
    return torch.cdist(query, db).min(1).values


# ---------------------------------------------------------------------------- evaluation
class Evaluator:
    """Turns scores and embeddings into one row of the benchmark's table."""

    def __init__(self, data: Data, result: SeedResult) -> None:
        self.data = data
        self.result = result

    def retrieval(self, emb_test: Tensor, emb_train: Tensor) -> dict[str, float]:
        """recall@1/5, mAP@5, MAP@R of test queries against the training database."""
        d = self.data
        return retrieval_metrics(
            emb_test, d.y_test, emb_train, d.y_train, recall_ks=(1, 5), map_ks=(5,)
        )

    def row(
        self,
        name: str,
        scores: tuple[Tensor, Tensor],
        retrieval: dict[str, float],
        wrong: Tensor,
        usage: Usage,
        confidence: Tensor | None = None,
    ) -> None:
        """Record one method: OOD metrics, AUSE (error = wrong top-1), ECE, cost."""
        score_in, score_out = (s.detach().double() for s in scores)
        row = {**retrieval, **ood_metrics(score_in, score_out)}
        ause, curve = sparsification_metrics(score_in, wrong)
        row.update(ause)
        bins = None
        if confidence is not None:
            ece, bins = calibration_metrics(confidence.double(), (~wrong.bool()).double())
            row.update(ece)
        row["time s"], row["peak MB"] = usage.seconds, usage.peak_mb
        plots = {"FashionMNIST test": score_in, "MNIST (OOD)": score_out}
        self.result.add_row(name, row, scores=plots, curve=curve, reliability=bins)

    def head_rows(self, name: str, samples: HeadSamples, feats: dict[str, Tensor], usage: Usage):
        """The LAM-std and sampled-kNN rows of a sampled head on cached features."""
        y_tr = self.data.y_train
        with measure(usage):
            emb_te, emb_tr = samples.embed(feats["test"]), samples.embed(feats["train"])
            retrieval = self.retrieval(emb_te, emb_tr)
            std = samples.lam_std(feats["test"]), samples.lam_std(feats["ood"])
            knn_in, conf, predicted = samples.sampled_knn(feats["test"], feats["train"], y_tr)
            knn_out, _, _ = samples.sampled_knn(feats["ood"], feats["train"], y_tr)
        wrong = predicted != self.data.y_test
        self.row(f"{name}, {Score.LAM_STD.value}", std, retrieval, wrong, usage, conf)
        self.row(f"{name}, {Score.SAMPLED_KNN.value}", (knn_in, knn_out), retrieval, wrong, usage)
        rows = self.result.rows
        rows[f"{name}, {Score.SAMPLED_KNN.value}"]["ECE"] = rows[f"{name}, {Score.LAM_STD.value}"][
            "ECE"
        ]
