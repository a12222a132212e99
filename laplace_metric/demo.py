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
from laplace_metric.scores import PosteriorScore, UncertaintyScorer
from laplace_metric.training import fit_online_lam

COLUMNS = ("recall@1", "MAP@R", "AUROC held-out", "AUROC noise", "AUPR held-out", "AUSE", "ECE")

#: Row suffix of each LAM uncertainty score, in table order (the default score first).
SCORE_ROWS = {
    PosteriorScore.POSTERIOR_KNN: "posterior kNN",
    PosteriorScore.SAMPLED_STD: "sampled std",
    PosteriorScore.TRACE: "trace",
}

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
        # fit_online_lam's defaults (prior_update="final", prior_precision=1e4), chosen on the
        # validation split (examples/tune_online_lam.py)
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


def _families(curves: dict) -> dict[str, dict]:
    """Sparsification curves grouped into panels: baselines, then one panel per LAM score."""
    groups: dict[str, dict] = {"baselines": {}}
    for score, suffix in SCORE_ROWS.items():
        default = " (default)" if score == PosteriorScore.POSTERIOR_KNN else ""
        groups[f"LAM, {suffix}{default}"] = {}
    for name, curve in curves.items():
        method, _, suffix = name.rpartition(", ")
        panel = next((g for g in groups if g.startswith(f"LAM, {suffix}")), None)
        if name.startswith(("LAM", "online LAM")) and panel is not None:
            groups[panel][method] = curve
        else:
            groups["baselines"][name] = curve
    return {g: c for g, c in groups.items() if c}


def _data_label(config: DemoConfig, result: SeedResult) -> str:
    ids = list(config.id_classes)
    return f"{config.dataset}, seed {result.seed}, in-distribution classes {ids}"


def write_plots(result: SeedResult, output_dir: Path, config: DemoConfig) -> list[Path]:
    """The plots of one seed: uncertainty histograms, sparsification, reliability, embedding.

    Every title names the method, the seed and the data; file names end in ``_seed<seed>``.
    """
    from laplace_metric.plots import (
        plot_reliability_diagram,
        plot_sparsification,
        plot_uncertainty_histograms,
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    data = _data_label(config, result)
    tag = f"seed{result.seed}"
    paths = []
    for name in (
        "LAM all-layer diag, posterior kNN",
        "LAM all-layer diag, trace",
        "kNN distance (deterministic)",
    ):
        if name not in result.scores:
            continue
        path = output_dir / f"uncertainty_{_slug(name)}_{tag}.png"
        plot_uncertainty_histograms(
            result.scores[name],
            path,
            xlabel=f"{name} score",
            title=f"{name}\n{data}",
            log=name.endswith("trace"),
        )
        paths.append(path)
    path = output_dir / f"sparsification_{tag}.png"
    plot_sparsification(
        _families(result.curves), path, title=f"Sparsification of the test queries ({data})"
    )
    paths.append(path)
    for name, bins in result.reliability.items():
        if "posterior kNN" in name or name.startswith("MC"):
            method = name.rpartition(", posterior kNN")[0] or name
            path = output_dir / f"reliability_{_slug(method)}_{tag}.png"
            plot_reliability_diagram(bins, path, title=f"{method}\n{data}")
            paths.append(path)
    paths.append(_embedding_picture(output_dir / f"embedding_3d_{tag}.png", config, result.seed))
    return paths


def _embedding_picture(path: Path, config: DemoConfig, seed: int) -> Path:
    """A 3-D encoder on the sphere, coloured by class, marker size = posterior kNN score."""
    from laplace_metric.plots import plot_embedding_2d

    split = open_set_split(
        config.dataset, seed=seed, id_classes=tuple(config.id_classes), root=config.data_root
    )
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(split.train, batch_size=config.batch_size, shuffle=True, generator=gen)
    torch.manual_seed(seed)
    encoder = make_encoder(split.train.tensors[0][0].numel(), hidden=64, out_dim=3)
    likelihood = ContrastiveLikelihood(margin=config.margin)
    train_encoder(
        encoder,
        loader,
        lambda g, y: likelihood.loss(g, y, reduction="mean"),
        epochs=config.epochs,
        seed=seed,
        progress_bar=False,
    )
    la = metric_laplace(encoder, likelihood, "last_layer", "full")
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    x = torch.cat([split.test.tensors[0], split.ood_classes.tensors[0][:200]])
    labels = torch.cat([split.test.tensors[1], split.ood_classes.tensors[1][:200]])
    mean, _ = la(x)
    scorer = UncertaintyScorer(la, database=split.train.tensors[0], n_samples=config.n_samples)
    ood = sorted(set(split.ood_classes.tensors[1].tolist()))
    plot_embedding_2d(
        mean,
        labels,
        scorer(x),
        path,
        ood_labels=ood,
        title=(
            f"3-D encoder (MLP {x.shape[1]}-64-64-3), last-layer full LAM; test images and "
            "200 held-out (OOD) images"
            f"\n{config.dataset}, seed {seed}, in-distribution classes "
            f"{list(config.id_classes)}"
        ),
        size_label="posterior kNN score",
    )
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _footer(config: DemoConfig, results: Sequence[SeedResult], elapsed: float) -> str:
    seeds = [r.seed for r in results]
    partial = (
        ""
        if len(seeds) == len(config.seeds)
        else f" (partial: {len(seeds)} of {len(config.seeds)} seeds)"
    )
    return (
        f"\n{config.dataset}: in-distribution classes {list(config.id_classes)}, held-out "
        f"classes and uniform noise as OOD; seeds {seeds}{partial}, {config.epochs} epochs, "
        f"{elapsed:.0f} s. LAM scores: posterior kNN (the default of UncertaintyScorer), "
        "sampled std (LAM's), trace (linearised). OOD = positive class; AUSE: sparsification "
        "of the in-distribution test set by the score, error = wrong top-1 retrieval; ECE: "
        "top-1 retrieval confidence from weight / dropout samples, 10 bins."
    )


def write_results(
    config: DemoConfig, results: Sequence[SeedResult], output_dir: Path, elapsed: float
) -> str:
    """Write ``results.md`` and ``results.json`` for the seeds done so far; returns the table."""
    table = format_table(results)
    (output_dir / "results.md").write_text(table + "\n" + _footer(config, results, elapsed) + "\n")
    (output_dir / "results.json").write_text(
        json.dumps([{"seed": r.seed, "rows": r.rows} for r in results], indent=1, default=float)
    )
    return table


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
    print(_footer(config, results, elapsed))
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
