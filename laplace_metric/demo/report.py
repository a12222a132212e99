"""The demo's table, its footer and its result files, on the evaluation layer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from laplace_metric.demo.config import DemoConfig
from laplace_metric.evaluation import Column, ResultTable, SeedResult
from laplace_metric.scores import PosteriorScore

__all__ = ["COLUMNS", "SCORE_ROWS", "TABLE_COLUMNS", "footer", "format_table", "write_results"]

COLUMNS = ("recall@1", "MAP@R", "AUROC held-out", "AUROC noise", "AUPR held-out", "AUSE", "ECE")

#: :data:`COLUMNS` with their formats (AUSE and ECE with 4 decimals).
TABLE_COLUMNS = tuple(Column(c, digits=4 if c in ("AUSE", "ECE") else 3) for c in COLUMNS)

#: Row suffix of each LAM uncertainty score, in table order (the default score first).
SCORE_ROWS = {
    PosteriorScore.POSTERIOR_KNN: "posterior kNN",
    PosteriorScore.KNN_VARIANCE_RATIO: "kNN x variance ratio",
    PosteriorScore.SAMPLED_STD: "sampled std",
    PosteriorScore.TRACE: "trace",
}


def format_table(results: Sequence[SeedResult]) -> str:
    """Mean +- std over seeds of every method and metric, as a Markdown table."""
    return ResultTable.from_seeds(results, TABLE_COLUMNS).to_markdown()


def footer(config: DemoConfig, results: Sequence[SeedResult], elapsed: float) -> str:
    """The note printed and written under the table: data, seeds, epochs, time, definitions."""
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
        "kNN x variance ratio (posterior kNN times the share of the prior's linearised variance "
        "the curvature leaves; its curvature-off control is the posterior kNN one), sampled std "
        "(LAM's), trace (linearised). OOD = positive class; AUSE: sparsification "
        "of the in-distribution test set by the score, error = wrong top-1 retrieval; ECE: "
        "top-1 retrieval confidence from weight / dropout samples, 10 bins."
    )


def write_results(
    config: DemoConfig, results: Sequence[SeedResult], output_dir: Path, elapsed: float
) -> str:
    """Write ``results.md`` and ``results.json`` for the seeds done so far; returns the table."""
    table = format_table(results)
    (output_dir / "results.md").write_text(table + "\n" + footer(config, results, elapsed) + "\n")
    (output_dir / "results.json").write_text(
        json.dumps([{"seed": r.seed, "rows": r.rows} for r in results], indent=1, default=float)
    )
    return table
