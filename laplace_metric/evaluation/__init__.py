"""One evaluation layer for the demo and every benchmark: rows, seeds, aggregation, tables.

A *row* is a method's name and its metrics; a :class:`SeedResult` holds the rows of one seed
(with the data of its plots); a :class:`ResultTable` gathers rows over seeds and renders
mean ± std as Markdown. Adding a row, e.g. a control such as "LAM, curvature off", is one
call: ``table.add_row(name, {metric: [value per seed]})`` or, inside a seed,
``result.add_row(name, {metric: value})``. :mod:`~laplace_metric.evaluation.measures` turns
scores and embeddings into the metric dictionaries; :mod:`~laplace_metric.evaluation.figures`
draws the bar and sphere figures of the benchmarks.
"""

from __future__ import annotations

from laplace_metric.evaluation.figures import (
    plot_metric_bars,
    plot_sphere,
    slug,
    write_seed_plots,
)
from laplace_metric.evaluation.measures import (
    calibration_metrics,
    ood_metrics,
    retrieval_metrics,
    sparsification_metrics,
)
from laplace_metric.evaluation.results import SeedResult
from laplace_metric.evaluation.tables import Column, ResultTable, aggregate, mean_std

__all__ = [
    "Column",
    "ResultTable",
    "SeedResult",
    "aggregate",
    "calibration_metrics",
    "mean_std",
    "ood_metrics",
    "plot_metric_bars",
    "plot_sphere",
    "retrieval_metrics",
    "slug",
    "sparsification_metrics",
    "write_seed_plots",
]
