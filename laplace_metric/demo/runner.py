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
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from laplace_metric.data import open_set_split
from laplace_metric.demo.config import POSTHOC_CONFIGS, STAGES, DemoConfig
from laplace_metric.demo.evaluator import DemoEvaluator
from laplace_metric.demo.methods import (
    baseline_rows,
    lam_rows,
    make_trainer,
    online_lam_rows,
    trained_encoder,
)
from laplace_metric.demo.plots import write_plots
from laplace_metric.demo.report import footer, write_results
from laplace_metric.evaluation import SeedResult
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.registry import metric_laplace

__all__ = ["run_demo", "run_seed"]


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
    ev = DemoEvaluator(split, device, result)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(split.train, batch_size=config.batch_size, shuffle=True, generator=gen)
    likelihood = ContrastiveLikelihood(margin=config.margin)
    trainer = make_trainer(config, loader, likelihood, device)
    stage(STAGES[0])
    det = trained_encoder(ev, trainer, device, 1000 * seed)
    baseline_rows(ev, config, seed, det, trainer, stage)
    for name, subset, structure, trace_row in POSTHOC_CONFIGS:
        stage(name)
        la = metric_laplace(det, likelihood, subset, structure)
        la.fit(loader, progress_bar=False)  # the demo shows its own bar
        la.optimize_prior_precision(method="marglik", progress_bar=False)
        lam_rows(ev, la, name, config, seed, trace_row, control=True)
    stage(STAGES[-1])
    online_lam_rows(ev, config, seed, loader, likelihood)
    return result


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
