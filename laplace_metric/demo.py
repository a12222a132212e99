"""The main job: post-hoc and online LAM against honest baselines on an open-set split.

For every seed: train an encoder with the contrastive likelihood on the in-distribution
classes; fit Laplace posteriors over it (last-layer and all-layer, several structures); train
an online-LAM encoder; train the baselines (kNN distance, Mahalanobis, MC dropout, deep
ensemble); score the in-distribution test set, the held-out classes and uniform noise; and
report retrieval (recall@1, MAP@R), OOD detection (AUROC, AUPR), sparsification (AUSE) and
retrieval calibration (ECE) as mean +- std over the seeds. ``laplace-metric demo`` runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from laplace_metric.baselines import (
    DeepEnsembleBaseline,
    KNNDistanceBaseline,
    MahalanobisBaseline,
    MCDropoutBaseline,
    penultimate,
    train_encoder,
)
from laplace_metric.datasets import open_set_split
from laplace_metric.demo_report import (
    COLUMNS,
    SCORE_ROWS,
    _Evaluator,
    footer,
    format_table,
    write_plots,
    write_results,
)
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.metrics import (
    retrieval_confidence_from_samples,
)
from laplace_metric.registry import metric_laplace
from laplace_metric.scores import PosteriorScore, UncertaintyScorer
from laplace_metric.training import fit_online_lam

#: Post-hoc LAM configurations: (row name, subset_of_weights, hessian_structure, trace row).
#: The all-layer Kronecker GLM trace is skipped: its covariance is the slowest to evaluate.
POSTHOC_CONFIGS = (
    ("LAM last-layer kron", "last_layer", "kron", True),
    ("LAM last-layer full", "last_layer", "full", True),
    ("LAM all-layer diag", "all", "diag", True),
    ("LAM all-layer kron", "all", "kron", False),
)


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the CLI flags).

    Attributes
    ----------
    dataset : str
        ``'digits'`` (bundled), ``'mnist'`` or ``'fashion_mnist'`` (downloaded by torchvision).
    id_classes : sequence of int
        In-distribution classes; the other classes are the held-out OOD set.
    seeds : sequence of int
    epochs : int
        Training epochs of every encoder.
    batch_size : int
    margin : float
        Contrastive margin on the squared distance.
    n_members : int
        Deep-ensemble size.
    n_samples : int
        Posterior / dropout samples per score.
    output_dir : Path
        Where plots and ``results.json`` / ``results.md`` are written.
    device : str
    threads : int
        Torch intra-op threads (small MLPs run fastest on one).
    progress : bool
        Show a progress bar.
    data_root : Path
        torchvision data folder.
    """

    dataset: str = "digits"
    id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5)
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int = 30
    batch_size: int = 64
    margin: float = 1.0
    n_members: int = 5
    n_samples: int = 30
    output_dir: Path = Path("laplace_metric_output")
    device: str = "cpu"
    threads: int = 1
    progress: bool = True
    data_root: Path = Path("data")


@dataclass
class SeedResult:
    """Metrics of one seed: ``rows[method][metric]``, plus the seed's plot data."""

    seed: int = 0
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    reliability: dict = field(default_factory=dict)


def make_encoder(
    in_dim: int, dropout: float = 0.0, hidden: int = 128, out_dim: int = 16
) -> nn.Sequential:
    """The demo encoder: MLP ``in-128-128-16`` with tanh (optional dropout after hidden layers)."""
    layers: list[nn.Module] = []
    for d_in, d_out in ((in_dim, hidden), (hidden, hidden)):
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, out_dim))


def _normalised_embed(model: nn.Module) -> Callable[[Tensor], Tensor]:
    @torch.no_grad()
    def embed(x: Tensor) -> Tensor:
        model.eval()
        return torch.nn.functional.normalize(model(x), dim=-1)

    return embed


def _lam_rows(
    ev: _Evaluator, la, name: str, config: DemoConfig, seed: int, trace_row: bool = True
) -> None:
    """Rows of a Laplace estimator, one per :data:`SCORE_ROWS` score (the trace optional).

    One :class:`UncertaintyScorer` (fixed weight samples, the training set as database,
    embedded once per sample) scores the test set, the held-out classes and the noise.
    """
    embed = _normalised_embed(la.model)
    gen = torch.Generator(device=la._device).manual_seed(seed)
    scorer = UncertaintyScorer(la, ev.x_tr, ev.y_tr, n_samples=config.n_samples, generator=gen)
    test = scorer.retrieval(ev.x_te)
    confidence = (test.confidence, test.predicted == ev.y_te)
    sampled = [PosteriorScore.POSTERIOR_KNN, PosteriorScore.SAMPLED_STD]
    cache = {id(x): scorer.scores(x, sampled) for x in (ev.x_te, ev.x_held, ev.x_noise)}
    for score, suffix in SCORE_ROWS.items():
        if score == PosteriorScore.TRACE and not trace_row:
            continue

        def score_fn(x: Tensor, score: PosteriorScore = score) -> Tensor:
            if score == PosteriorScore.TRACE:
                return scorer(x, score)
            return cache[id(x)][score.value]

        ev.row(f"{name}, {suffix}", score_fn, embed, confidence)


Trainer = Callable[[nn.Module, int], None]


def _trainer(
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


def _trained_encoder(
    ev: _Evaluator, trainer: Trainer, device: torch.device, seed: int, dropout: float = 0.0
) -> nn.Sequential:
    """A fresh demo encoder built after ``torch.manual_seed(seed)`` and trained."""
    torch.manual_seed(seed)
    encoder = make_encoder(ev.x_tr[0].numel(), dropout=dropout).to(device)
    trainer(encoder, seed)
    return encoder


def _baseline_rows(
    ev: _Evaluator,
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
    maha = MahalanobisBaseline(penultimate(det)).fit(ev.x_tr, ev.y_tr)
    ev.row("Mahalanobis (penultimate)", maha.score)
    stage(STAGES[2])
    device = torch.device(config.device)
    dropout_encoder = _trained_encoder(ev, trainer, device, 1000 * seed + 1, dropout=0.1)
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


def _online_lam_rows(
    ev: _Evaluator,
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
    _lam_rows(ev, la, "online LAM all-layer diag", config, seed)


def run_seed(
    config: DemoConfig, seed: int, on_stage: Callable[[str], None] | None = None
) -> SeedResult:
    """All methods on one seed of the open-set split.

    Parameters
    ----------
    config : DemoConfig
    seed : int
    on_stage : callable, optional
        Called with each name of :data:`STAGES` as that stage starts (progress reporting).

    Returns
    -------
    result : SeedResult
    """
    stage = on_stage or (lambda name: None)
    device = torch.device(config.device)
    split = open_set_split(
        config.dataset, seed=seed, id_classes=tuple(config.id_classes), root=config.data_root
    )
    result = SeedResult(seed=seed)
    ev = _Evaluator(split, device, result)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(split.train, batch_size=config.batch_size, shuffle=True, generator=gen)
    likelihood = ContrastiveLikelihood(margin=config.margin)
    trainer = _trainer(config, loader, likelihood, device)
    stage(STAGES[0])
    det = _trained_encoder(ev, trainer, device, 1000 * seed)
    _baseline_rows(ev, config, seed, det, trainer, stage)
    for name, subset, structure, trace_row in POSTHOC_CONFIGS:
        stage(name)
        la = metric_laplace(det, likelihood, subset, structure)
        la.fit(loader, progress_bar=False)  # the demo shows its own bar
        la.optimize_prior_precision(method="marglik", progress_bar=False)
        _lam_rows(ev, la, name, config, seed, trace_row)
    stage(STAGES[-1])
    _online_lam_rows(ev, config, seed, loader, likelihood)
    return result


#: The stages of :func:`run_seed`, in order (one progress-bar step each).
STAGES = (
    "train encoder",
    "kNN, Mahalanobis",
    "MC dropout",
    "deep ensemble",
    *(name for name, *_ in POSTHOC_CONFIGS),
    "online LAM",
)


def run_demo(config: DemoConfig) -> tuple[str, list[SeedResult]]:
    """Run every seed, print and write the table and the plots; returns the table and results.

    ``results.md`` / ``results.json`` are rewritten after every seed and the plots of the first
    seed are written as soon as it finishes, so an interrupted run keeps what finished.
    """
    import tqdm

    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results: list[SeedResult] = []
    paths: list[Path] = []
    bar = tqdm.tqdm(
        total=len(config.seeds) * len(STAGES), disable=not config.progress, unit="stage"
    )
    try:
        for seed in config.seeds:
            started = False

            def on_stage(name: str, seed: int = seed) -> None:
                nonlocal started
                if started:
                    bar.update(1)
                started = True
                bar.set_description(f"seed {seed}: {name}")

            results.append(run_seed(config, seed, on_stage))
            bar.update(1)
            write_results(config, results, output_dir, time.perf_counter() - start)
            if len(results) == 1:
                bar.set_description(f"seed {seed}: plots")
                paths = write_plots(results[0], output_dir, config)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    table = write_results(config, results, output_dir, elapsed)
    print(table)
    print(footer(config, results, elapsed))
    print(
        f"\nwrote {len(paths)} plots (seed {results[0].seed}) and results.md / results.json to "
        f"{output_dir.resolve()}"
    )
    return table, results


__all__ = [
    "COLUMNS",
    "DemoConfig",
    "POSTHOC_CONFIGS",
    "SCORE_ROWS",
    "STAGES",
    "SeedResult",
    "format_table",
    "make_encoder",
    "run_demo",
    "run_seed",
    "write_plots",
    "write_results",
]
