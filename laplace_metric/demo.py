"""The main job: post-hoc and online LAM against honest baselines on an open-set split.

For every seed: train an encoder with the contrastive likelihood on the in-distribution
classes; fit Laplace posteriors over it (last-layer and all-layer, several structures); train
an online-LAM encoder; train the baselines (kNN distance, Mahalanobis, MC dropout, deep
ensemble); score the in-distribution test set, the held-out classes and uniform noise; and
report retrieval (recall@1, MAP@R), OOD detection (AUROC, AUPR), sparsification (AUSE) and
retrieval calibration (ECE) as mean +- std over the seeds. ``laplace-metric demo`` runs it.
"""

from __future__ import annotations

import json
import math
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
from laplace_metric.datasets import OpenSetSplit, open_set_split
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.metrics import (
    map_at_r,
    ood_aupr,
    ood_auroc,
    recall_at_k,
    reliability_diagram_data,
    retrieval_confidence_from_samples,
    sparsification_curve,
    top1_labels,
)
from laplace_metric.registry import metric_laplace
from laplace_metric.scores import posterior_retrieval
from laplace_metric.training import fit_online_lam

COLUMNS = ("recall@1", "MAP@R", "AUROC held-out", "AUROC noise", "AUPR held-out", "AUSE", "ECE")

#: Prior precision of online LAM during training (``prior_update="final"``).
ONLINE_TRAINING_PRIOR = 1e4

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
    """

    dataset: str = "digits"
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


def _normalised_embed(model: nn.Module) -> Callable[[Tensor], Tensor]:
    @torch.no_grad()
    def embed(x: Tensor) -> Tensor:
        model.eval()
        return torch.nn.functional.normalize(model(x), dim=-1)

    return embed


def _lam_rows(
    ev: _Evaluator, la, name: str, config: DemoConfig, seed: int, trace_row: bool = True
) -> None:
    """Rows of a Laplace estimator: the GLM trace score (optional) and the posterior kNN score."""
    embed = _normalised_embed(la.model)
    gen = torch.Generator(device=la._device).manual_seed(seed)

    def trace(x: Tensor) -> Tensor:
        return torch.cat([la.predictive_uncertainty(c) for c in x.split(512)])

    test = posterior_retrieval(
        la, ev.x_te, ev.x_tr, ev.y_tr, n_samples=config.n_samples, generator=gen
    )
    confidence = (test.confidence, test.predicted == ev.y_te)
    if trace_row:
        ev.row(f"{name}, trace", trace, embed, confidence)

    def sampled_knn(x: Tensor) -> Tensor:
        if x is ev.x_te:
            return test.knn_distance
        g = torch.Generator(device=la._device).manual_seed(seed)
        return posterior_retrieval(
            la, x, ev.x_tr, n_samples=config.n_samples, generator=g
        ).knn_distance

    ev.row(f"{name}, sampled kNN", sampled_knn, embed, confidence)


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
    split = open_set_split(config.dataset, seed=seed, root=config.data_root)
    result = SeedResult()
    ev = _Evaluator(split, device, result)
    in_dim = ev.x_tr[0].numel()
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(split.train, batch_size=config.batch_size, shuffle=True, generator=gen)
    likelihood = ContrastiveLikelihood(margin=config.margin)

    def loss_fn(g: Tensor, y: Tensor) -> Tensor:
        return likelihood.loss(g, y, reduction="mean")

    def trainer(encoder: nn.Module, s: int) -> None:
        encoder.to(device)
        dev_loader = [(x.to(device), y.to(device)) for x, y in loader]
        train_encoder(
            encoder, dev_loader, loss_fn, epochs=config.epochs, seed=s, progress_bar=False
        )

    stage(STAGES[0])
    torch.manual_seed(1000 * seed)
    det = make_encoder(in_dim).to(device)
    trainer(det, 1000 * seed)

    # --- baselines
    stage(STAGES[1])
    knn = KNNDistanceBaseline(det, k=1).fit(ev.x_tr)
    ev.row("kNN distance (deterministic)", knn.score, knn.embed)
    maha = MahalanobisBaseline(penultimate(det)).fit(ev.x_tr, ev.y_tr)
    ev.row("Mahalanobis (penultimate)", maha.score)
    stage(STAGES[2])
    torch.manual_seed(1000 * seed + 1)
    dropout_encoder = make_encoder(in_dim, dropout=0.1).to(device)
    trainer(dropout_encoder, 1000 * seed + 1)
    mc = MCDropoutBaseline(dropout_encoder, n_samples=config.n_samples, seed=seed)
    conf, pred = retrieval_confidence_from_samples(
        mc.samples(ev.x_te), mc.embed(ev.x_tr), ev.y_tr, mean_emb=mc.embed(ev.x_te)
    )
    ev.row("MC dropout p=0.1", mc.score, mc.embed, (conf, pred == ev.y_te))
    stage(STAGES[3])
    members = [1000 * seed + 10 + i for i in range(config.n_members)]
    ensemble = DeepEnsembleBaseline.train(
        lambda: make_encoder(in_dim).to(device), trainer, members, k=1
    )
    ensemble.fit(ev.x_tr)
    ev.row(f"ensemble of {config.n_members}, mean kNN", ensemble.score, ensemble.embed)

    # --- post-hoc LAM on the deterministic encoder
    for name, subset, structure, trace_row in POSTHOC_CONFIGS:
        stage(name)
        la = metric_laplace(det, likelihood, subset, structure)
        la.fit(loader)
        la.optimize_prior_precision(method="marglik")
        _lam_rows(ev, la, name, config, seed, trace_row)

    # --- online LAM (trains its own encoder)
    stage(STAGES[-1])
    torch.manual_seed(1000 * seed + 2)
    online_encoder = make_encoder(in_dim).to(device)
    la = fit_online_lam(
        online_encoder,
        loader,
        likelihood,
        "all",
        "diag",
        epochs=config.epochs,
        # A strong training prior keeps the weight samples near the mean; the prior is tuned
        # on the marginal likelihood once at the end (per-epoch marglik: MAP@R 0.67, README).
        prior_update="final",
        prior_precision=ONLINE_TRAINING_PRIOR,
        generator=torch.Generator(device=device).manual_seed(seed),
    )
    _lam_rows(ev, la, "online LAM all-layer diag", config, seed)
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


def write_plots(result: SeedResult, output_dir: Path, config: DemoConfig) -> list[Path]:
    """The plots of one seed: uncertainty histograms, sparsification, reliability, 2-D embedding."""
    from laplace_metric.plots import (
        plot_reliability_diagram,
        plot_sparsification,
        plot_uncertainty_histograms,
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in (
        "LAM all-layer diag, sampled kNN",
        "LAM last-layer full, trace",
        "kNN distance (deterministic)",
    ):
        path = output_dir / f"uncertainty_{_slug(name)}.png"
        plot_uncertainty_histograms(result.scores[name], path, xlabel=f"{name} score")
        paths.append(path)
    path = output_dir / "sparsification.png"
    plot_sparsification(result.curves, path)
    paths.append(path)
    for name, bins in result.reliability.items():
        if "sampled kNN" in name or name.startswith("MC"):
            path = output_dir / f"reliability_{_slug(name)}.png"
            plot_reliability_diagram(bins, path)
            paths.append(path)
    paths.append(_embedding_picture(output_dir / "embedding_3d.png", config))
    return paths


def _embedding_picture(path: Path, config: DemoConfig) -> Path:
    """A 3-D encoder on the sphere, coloured by class, marker size = LAM uncertainty."""
    from laplace_metric.plots import plot_embedding_2d

    split = open_set_split(config.dataset, seed=0, root=config.data_root)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(split.train, batch_size=config.batch_size, shuffle=True, generator=gen)
    torch.manual_seed(0)
    encoder = make_encoder(split.train.tensors[0][0].numel(), hidden=64, out_dim=3)
    likelihood = ContrastiveLikelihood(margin=config.margin)
    train_encoder(
        encoder,
        loader,
        lambda g, y: likelihood.loss(g, y, reduction="mean"),
        epochs=config.epochs,
        progress_bar=False,
    )
    la = metric_laplace(encoder, likelihood, "last_layer", "full")
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    x = torch.cat([split.test.tensors[0], split.ood_classes.tensors[0][:200]])
    labels = torch.cat([split.test.tensors[1], split.ood_classes.tensors[1][:200]])
    mean, _ = la(x)
    plot_embedding_2d(mean, labels, la.predictive_uncertainty(x), path)
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def run_demo(config: DemoConfig) -> tuple[str, list[SeedResult]]:
    """Run every seed, print and write the table and the plots; returns the table and results."""
    import tqdm

    torch.set_num_threads(config.threads)
    start = time.perf_counter()
    results = []
    bar = tqdm.tqdm(
        total=len(config.seeds) * len(STAGES), disable=not config.progress, unit="stage"
    )
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
    bar.close()
    table = format_table(results)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = write_plots(results[0], output_dir, config)
    elapsed = time.perf_counter() - start
    footer = (
        f"\n{config.dataset}: in-distribution classes {list(range(6))}, held-out classes and "
        f"uniform noise as OOD; seeds {list(config.seeds)}, {config.epochs} epochs, "
        f"{elapsed:.0f} s. OOD = positive class; AUSE: sparsification of the in-distribution "
        "test set by the score, error = wrong top-1 retrieval; ECE: top-1 retrieval confidence "
        "from weight / dropout samples, 10 bins."
    )
    (output_dir / "results.md").write_text(table + "\n" + footer + "\n")
    (output_dir / "results.json").write_text(
        json.dumps([r.rows for r in results], indent=1, default=float)
    )
    print(table)
    print(footer)
    print(f"\nwrote {len(paths)} plots and results.md / results.json to {output_dir.resolve()}")
    return table, results


__all__ = [
    "COLUMNS",
    "DemoConfig",
    "POSTHOC_CONFIGS",
    "STAGES",
    "SeedResult",
    "format_table",
    "make_encoder",
    "run_demo",
    "run_seed",
    "write_plots",
]
