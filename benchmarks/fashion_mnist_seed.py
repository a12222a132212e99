"""One (D, seed) of ``fashion_mnist.py``: every method's rows, one function per method."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_mnist_methods import (  # noqa: E402
    Data,
    Evaluator,
    Score,
    active_stages,
    all_features,
    knn,
    lam_encoder,
    load_data,
    make_loader,
    train,
)
from harness import Usage, measure  # noqa: E402

from laplace_metric.baselines import IsotropicNoiseBaseline, PFEBaseline  # noqa: E402
from laplace_metric.controls import curvature_off  # noqa: E402
from laplace_metric.evaluation import SeedResult  # noqa: E402
from laplace_metric.likelihoods import ContrastiveLikelihood  # noqa: E402
from laplace_metric.metrics import top1_labels  # noqa: E402
from laplace_metric.predictive import dropout_head_samples, laplace_head_samples  # noqa: E402
from laplace_metric.registry import metric_laplace  # noqa: E402
from laplace_metric.scores import posterior_retrieval  # noqa: E402
from laplace_metric.training import fit_online_lam  # noqa: E402

if TYPE_CHECKING:
    from fashion_mnist import BenchConfig

__all__ = ["CURVATURE_OFF", "run_seed"]

#: Suffix of a posterior's name in the rows of its curvature-off control.
CURVATURE_OFF = " (curvature off)"


@dataclass
class _Seed:
    """What every method of one (D, seed) shares."""

    config: BenchConfig
    dim: int
    seed: int
    data: Data
    loader: DataLoader
    likelihood: ContrastiveLikelihood
    ev: Evaluator


@dataclass
class _Deterministic:
    """The deterministic encoder and what the other methods reuse from it."""

    model: nn.Sequential
    feats: dict[str, Tensor]
    emb: dict[str, Tensor]
    retrieval: dict[str, float]
    wrong: Tensor
    usage: Usage


def _deterministic(s: _Seed) -> _Deterministic:
    usage = Usage()
    with measure(usage):
        torch.manual_seed(1000 * s.seed)
        det = train(lam_encoder(s.dim), s.loader, s.config, 1000 * s.seed)
        feats = all_features(det, s.data)
        emb = {k: F.normalize(det[-1](v), dim=-1).detach() for k, v in feats.items()}
        retrieval = s.ev.retrieval(emb["test"], emb["train"])
        scores = knn(emb["test"], emb["train"]), knn(emb["ood"], emb["train"])
    wrong = top1_labels(emb["test"], emb["train"], s.data.y_train) != s.data.y_test
    s.ev.row(f"deterministic, {Score.KNN.value}", scores, retrieval, wrong, usage)
    if s.dim == 3:
        s.ev.result.embedding = (emb["test"], s.data.y_test, emb["ood"])
    return _Deterministic(det, feats, emb, retrieval, wrong, usage)


def _mc_dropout(s: _Seed) -> None:
    usage = Usage()
    with measure(usage):
        torch.manual_seed(1000 * s.seed + 1)
        mc = train(lam_encoder(s.dim, s.config.dropout), s.loader, s.config, 1000 * s.seed + 1)
        feats = all_features(mc, s.data)
        samples = dropout_head_samples(mc[-1], s.config.dropout, s.config.n_samples, s.seed)
    s.ev.head_rows(f"MC dropout p={s.config.dropout}", samples, feats, usage)


def _ensemble(s: _Seed, det: _Deterministic) -> None:
    """Deep ensemble; member 0 is the deterministic encoder (its training time included)."""
    y_tr = s.data.y_train
    usage = Usage(seconds=det.usage.seconds)
    with measure(usage):
        members = [det.emb]
        for m in range(1, s.config.n_members):
            torch.manual_seed(1000 * s.seed + 10 + m)
            member = train(lam_encoder(s.dim), s.loader, s.config, 1000 * s.seed + 10 + m)
            with torch.no_grad():
                members.append(
                    {k: F.normalize(member(v), dim=-1) for k, v in s.data.splits().items()}
                )
        cat = {k: torch.cat([e[k] for e in members], 1) / math.sqrt(len(members)) for k in det.emb}
        retrieval = s.ev.retrieval(cat["test"], cat["train"])
        predicted = top1_labels(cat["test"], cat["train"], y_tr)
        member_top1 = torch.stack([top1_labels(e["test"], e["train"], y_tr) for e in members])
        conf = (member_top1 == predicted).float().mean(0)
        mean_knn = [
            torch.stack([knn(e[k], e["train"]) for e in members]).mean(0) for k in ("test", "ood")
        ]
        stds = [torch.stack([e[k] for e in members]).std(0).sum(-1) for k in ("test", "ood")]
    wrong = predicted != s.data.y_test
    name = f"deep ensemble of {s.config.n_members}"
    s.ev.row(f"{name}, {Score.LAM_STD.value}", tuple(stds), retrieval, wrong, usage)
    s.ev.row(f"{name}, mean kNN", tuple(mean_knn), retrieval, wrong, usage, conf)


def _pfe(s: _Seed, det: _Deterministic) -> None:
    """PFE: a variance head on the frozen deterministic encoder's features."""
    usage = Usage()
    with measure(usage):
        pfe = PFEBaseline(det.model[-1], feature_fn=nn.Identity())
        pfe.fit(det.feats["train"], s.data.y_train, epochs=s.config.pfe_epochs, seed=s.seed)
        var = {k: pfe.log_variance(det.feats[k]).exp() for k in ("test", "ood")}
    own = pfe.score(det.feats["test"]), pfe.score(det.feats["ood"])
    s.ev.row(f"PFE, {Score.PFE_VARIANCE.value}", own, det.retrieval, det.wrong, usage)
    std_sum = var["test"].sqrt().sum(-1), var["ood"].sqrt().sum(-1)
    s.ev.row(f"PFE, {Score.LAM_STD.value}", std_sum, det.retrieval, det.wrong, usage)


def _head_rows_with_control(
    s: _Seed, name: str, la, head: nn.Linear, feats: dict[str, Tensor], usage: Usage
) -> None:
    """A last-layer posterior's rows, then its curvature-off control's (same prior, same seed)."""
    samples = laplace_head_samples(la, head, s.config.n_samples, s.seed)
    s.ev.head_rows(name, samples, feats, usage)
    control = Usage()
    with measure(control), curvature_off(la):
        samples = laplace_head_samples(la, head, s.config.n_samples, s.seed)
    s.ev.head_rows(name + CURVATURE_OFF, samples, feats, control)


def _posthoc_last_layer(s: _Seed, det: _Deterministic, structure: str) -> None:
    usage = Usage()
    with measure(usage):
        la = metric_laplace(det.model, s.likelihood, "last_layer", structure)
        la.fit(s.loader)
        la.optimize_prior_precision(method="marglik")
    name = f"post-hoc LAM last-layer {structure}"
    _head_rows_with_control(s, name, la, det.model[-1], det.feats, usage)


def _controls(s: _Seed, det: _Deterministic) -> None:
    """Controls without a posterior: isotropic head noise tuned on validation data (against
    uniform noise images, never MNIST), and the kNN distance on the penultimate features and on
    the raw pixels."""
    data, usage = s.data, Usage()
    with measure(usage):
        noise = torch.rand(
            (200, *data.x_val.shape[1:]), generator=torch.Generator().manual_seed(s.seed)
        )
        iso = IsotropicNoiseBaseline(
            det.model, parameters="last_layer", n_samples=s.config.n_samples, seed=s.seed
        )
        iso.fit(data.x_train, data.y_train, x_val=data.x_val, x_val_ood=noise)
        test = iso.retrieval(data.x_test)
        scores = test.knn_distance, iso.score(data.x_ood)
    wrong = test.predicted != data.y_test
    name = "isotropic head noise, tuned on validation"
    s.ev.row(name, scores, det.retrieval, wrong, usage, test.confidence)
    for name, x in (("penultimate features", det.feats), ("raw pixels", None)):
        usage = Usage()
        with measure(usage):
            if x is None:
                x = {k: v.flatten(1) for k, v in data.splits().items()}
            scores = knn(x["test"], x["train"]), knn(x["ood"], x["train"])
        s.ev.row(f"kNN distance, {name}", scores, det.retrieval, det.wrong, usage)


def _posthoc_all_layer(s: _Seed, det: _Deterministic) -> None:
    """Post-hoc all-layer diag LAM, scored through the package's estimator API (slow)."""
    data, n = s.data, s.config.n_samples
    usage = Usage()
    with measure(usage):
        la = metric_laplace(det.model, s.likelihood, "all", "diag")
        la.fit(s.loader)
        la.optimize_prior_precision(method="marglik")
        gen = torch.Generator().manual_seed(s.seed)
        std = tuple(
            torch.cat(
                [
                    la.predictive_uncertainty(c, score="std_sum", pred_type="nn", n_samples=n)
                    for c in x.split(512)
                ]
            )
            for x in (data.x_test, data.x_ood)
        )
        test = posterior_retrieval(
            la, data.x_test, data.x_train, data.y_train, n_samples=n, generator=gen
        )
        ood = posterior_retrieval(la, data.x_ood, data.x_train, n_samples=n)
    retrieval = s.ev.retrieval(det.emb["test"], det.emb["train"])
    name = "post-hoc LAM all-layer diag"
    conf = test.confidence
    s.ev.row(f"{name}, {Score.LAM_STD.value}", std, retrieval, det.wrong, usage, conf)
    knn_scores = test.knn_distance, ood.knn_distance
    s.ev.row(f"{name}, {Score.SAMPLED_KNN.value}", knn_scores, retrieval, det.wrong, usage, conf)


def _online(s: _Seed) -> None:
    """Online LAM: trains its own encoder, posterior on the head."""
    usage = Usage()
    with measure(usage):
        torch.manual_seed(1000 * s.seed + 2)
        la = fit_online_lam(
            lam_encoder(s.dim),
            s.loader,
            s.likelihood,
            "last_layer",
            "diag",
            epochs=s.config.epochs,
            lr=s.config.lr,
            prior_update="final",
            prior_precision=s.config.online_prior,
            generator=torch.Generator().manual_seed(s.seed),
        )
        online = la.model.model
        feats = all_features(online, s.data)
    _head_rows_with_control(s, "online LAM last-layer diag", la, online[-1], feats, usage)


def run_seed(
    config: BenchConfig, dim: int, seed: int, stage: Callable[[str], None] = lambda s: None
) -> SeedResult:
    """Every method of :func:`active_stages` on one (D, seed)."""
    data = load_data(config, seed)
    result = SeedResult(seed=seed, source=data.source)
    likelihood = ContrastiveLikelihood(margin=config.margin)
    s = _Seed(
        config,
        dim,
        seed,
        data,
        make_loader(data, config, seed),
        likelihood,
        Evaluator(data, result),
    )
    stages = active_stages(config)
    stage(stages[0])
    det = _deterministic(s)
    stage("MC dropout")
    _mc_dropout(s)
    stage("deep ensemble")
    _ensemble(s, det)
    stage("PFE")
    _pfe(s, det)
    stage("controls")
    _controls(s, det)
    for structure in ("diag", "kron"):
        if f"post-hoc LAM last-layer {structure}" in stages:
            stage(f"post-hoc LAM last-layer {structure}")
            _posthoc_last_layer(s, det, structure)
    if config.all_layer:
        stage("post-hoc LAM all-layer diag")
        _posthoc_all_layer(s, det)
    stage("online LAM last-layer diag")
    _online(s)
    return result
