"""The demo's methods, each adding its rows to a :class:`~laplace_metric.demo.DemoEvaluator`.

Post-hoc and online LAM (one row per uncertainty score) and the baselines: kNN distance,
Mahalanobis, MC dropout and a deep ensemble.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from laplace_metric.baselines import (
    DeepEnsembleBaseline,
    IsotropicNoiseBaseline,
    KNNDistanceBaseline,
    MahalanobisBaseline,
    MCDropoutBaseline,
    penultimate,
    train_encoder,
)
from laplace_metric.controls import curvature_off
from laplace_metric.demo.config import STAGES, DemoConfig, make_encoder
from laplace_metric.demo.evaluator import DemoEvaluator
from laplace_metric.demo.report import SCORE_ROWS
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.metrics import retrieval_confidence_from_samples
from laplace_metric.scores import PosteriorScore, UncertaintyScorer
from laplace_metric.training import fit_online_lam

__all__ = [
    "Trainer",
    "baseline_rows",
    "lam_rows",
    "make_trainer",
    "online_lam_rows",
    "trained_encoder",
]


def _normalised_embed(model: nn.Module) -> Callable[[Tensor], Tensor]:
    @torch.no_grad()
    def embed(x: Tensor) -> Tensor:
        model.eval()
        return torch.nn.functional.normalize(model(x), dim=-1)

    return embed


def lam_rows(
    ev: DemoEvaluator,
    la,
    name: str,
    config: DemoConfig,
    seed: int,
    trace_row: bool = True,
    control: bool = False,
) -> None:
    """Rows of a Laplace estimator, one per :data:`SCORE_ROWS` score (the trace optional),
    and with ``control`` the default score's curvature-off control (which is also that of
    ``'knn_variance_ratio'``: with the curvature off the ratio is 1).

    One :class:`UncertaintyScorer` (fixed weight samples, the training set as database,
    embedded once per sample) scores the test set, the held-out classes and the noise.
    """
    embed = _normalised_embed(la.model)
    gen = torch.Generator(device=next(la.model.parameters()).device).manual_seed(seed)
    scorer = UncertaintyScorer(la, ev.x_tr, ev.y_tr, n_samples=config.n_samples, generator=gen)
    test = scorer.retrieval(ev.x_te)
    confidence = (test.confidence, test.predicted == ev.y_te)
    sampled = [
        PosteriorScore.POSTERIOR_KNN,
        PosteriorScore.KNN_VARIANCE_RATIO,
        PosteriorScore.SAMPLED_STD,
    ]
    cache = {id(x): scorer.scores(x, sampled) for x in (ev.x_te, ev.x_held, ev.x_noise)}
    for score, suffix in SCORE_ROWS.items():
        if score == PosteriorScore.TRACE and not trace_row:
            continue

        def score_fn(x: Tensor, score: PosteriorScore = score) -> Tensor:
            if score == PosteriorScore.TRACE:
                return scorer(x, score)
            return cache[id(x)][score.value]

        ev.row(f"{name}, {suffix}", score_fn, embed, confidence)
    if control:
        _curvature_off_row(ev, la, scorer, name, embed)


def _curvature_off_row(ev: DemoEvaluator, la, scorer: UncertaintyScorer, name, embed) -> None:
    """The control of the default score: the same estimator, prior precision and weight
    samples with the curvature off (the posterior is the prior)."""
    with curvature_off(la):
        test = scorer.retrieval(ev.x_te)
        scores = {id(x): scorer(x) for x in (ev.x_te, ev.x_held, ev.x_noise)}
    confidence = (test.confidence, test.predicted == ev.y_te)
    suffix = SCORE_ROWS[PosteriorScore.POSTERIOR_KNN]
    ev.row(f"{name} (curvature off), {suffix}", lambda x: scores[id(x)], embed, confidence)


Trainer = Callable[[nn.Module, int], None]


def make_trainer(
    config: DemoConfig, loader: DataLoader, likelihood: ContrastiveLikelihood, device: torch.device
) -> Trainer:
    """``trainer(encoder, seed)``: move to ``device`` and train with the contrastive loss."""

    def loss_fn(g: Tensor, y: Tensor) -> Tensor:
        return likelihood.loss(g, y, reduction="mean")

    def trainer(encoder: nn.Module, s: int) -> None:
        encoder.to(device)
        dev_loader = [(x.to(device), y.to(device)) for x, y in loader]
        train_encoder(
            encoder, dev_loader, loss_fn, epochs=config.epochs, seed=s, progress_bar=False
        )

    return trainer


def trained_encoder(
    ev: DemoEvaluator, trainer: Trainer, device: torch.device, seed: int, dropout: float = 0.0
) -> nn.Sequential:
    """A fresh demo encoder built after ``torch.manual_seed(seed)`` and trained."""
    torch.manual_seed(seed)
    encoder = make_encoder(ev.x_tr[0].numel(), dropout=dropout).to(device)
    trainer(encoder, seed)
    return encoder


def baseline_rows(
    ev: DemoEvaluator,
    config: DemoConfig,
    seed: int,
    det: nn.Module,
    trainer: Trainer,
    stage: Callable[[str], None],
) -> None:
    """Rows of the baselines: kNN distance and Mahalanobis on ``det``, MC dropout, ensemble."""
    stage(STAGES[1])
    knn = KNNDistanceBaseline(det, k=1).fit(ev.x_tr)
    ev.row("kNN distance (deterministic)", knn.score, knn.embed)
    features = KNNDistanceBaseline(penultimate(det), k=1, normalize=False).fit(ev.x_tr)
    ev.row("kNN distance (penultimate features)", features.score)
    maha = MahalanobisBaseline(penultimate(det)).fit(ev.x_tr, ev.y_tr)
    ev.row("Mahalanobis (penultimate)", maha.score)
    iso = IsotropicNoiseBaseline(det, n_samples=config.n_samples, seed=seed)
    iso.fit(ev.x_tr, ev.y_tr, x_val=ev.x_val, x_val_ood=ev.x_noise_val)
    noisy = iso.retrieval(ev.x_te)
    confidence = (noisy.confidence, noisy.predicted == ev.y_te)
    ev.row("isotropic weight noise, tuned on validation", iso.score, knn.embed, confidence)
    stage(STAGES[2])
    device = torch.device(config.device)
    dropout_encoder = trained_encoder(ev, trainer, device, 1000 * seed + 1, dropout=0.1)
    mc = MCDropoutBaseline(dropout_encoder, n_samples=config.n_samples, seed=seed)
    conf, pred = retrieval_confidence_from_samples(
        mc.samples(ev.x_te), mc.embed(ev.x_tr), ev.y_tr, mean_emb=mc.embed(ev.x_te)
    )
    ev.row("MC dropout p=0.1", mc.score, mc.embed, (conf, pred == ev.y_te))
    stage(STAGES[3])
    members = [1000 * seed + 10 + i for i in range(config.n_members)]
    in_dim = ev.x_tr[0].numel()
    ensemble = DeepEnsembleBaseline.train(
        lambda: make_encoder(in_dim).to(device), trainer, members, k=1
    )
    ensemble.fit(ev.x_tr)
    ev.row(f"ensemble of {config.n_members}, mean kNN", ensemble.score, ensemble.embed)


def online_lam_rows(
    ev: DemoEvaluator,
    config: DemoConfig,
    seed: int,
    loader: DataLoader,
    likelihood: ContrastiveLikelihood,
) -> None:
    """Rows of online LAM, which trains its own encoder."""
    device = torch.device(config.device)
    torch.manual_seed(1000 * seed + 2)
    online_encoder = make_encoder(ev.x_tr[0].numel()).to(device)
    la = fit_online_lam(
        online_encoder,
        loader,
        likelihood,
        "all",
        "diag",
        epochs=config.epochs,
        # fit_online_lam's defaults (prior_update="final", prior_precision=1e4), chosen on the
        # validation split (examples/tune_online_lam.py)
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    lam_rows(ev, la, "online LAM all-layer diag", config, seed)
