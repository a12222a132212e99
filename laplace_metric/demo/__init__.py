"""The main job, ``laplace-metric demo``: LAM against honest baselines on an open-set split.

One module per job, on the evaluation layer (:mod:`laplace_metric.evaluation`):

* :mod:`~laplace_metric.demo.config`: :class:`DemoConfig`, the encoder, the stages;
* :mod:`~laplace_metric.demo.evaluator`: one row from a score, embeddings and a confidence;
* :mod:`~laplace_metric.demo.methods`: the rows of each method (LAM and the baselines);
* :mod:`~laplace_metric.demo.report`: the table, its footer and the result files;
* :mod:`~laplace_metric.demo.plots`: the plots of one seed;
* :mod:`~laplace_metric.demo.runner`: :func:`run_seed` and :func:`run_demo`.
"""

from __future__ import annotations

from laplace_metric.demo.config import POSTHOC_CONFIGS, STAGES, DemoConfig, make_encoder
from laplace_metric.demo.evaluator import DemoEvaluator
from laplace_metric.demo.plots import write_plots
from laplace_metric.demo.report import COLUMNS, SCORE_ROWS, footer, format_table, write_results
from laplace_metric.demo.runner import run_demo, run_seed
from laplace_metric.evaluation import SeedResult as SeedResult  # documented there

__all__ = [
    "COLUMNS",
    "DemoConfig",
    "DemoEvaluator",
    "POSTHOC_CONFIGS",
    "SCORE_ROWS",
    "STAGES",
    "footer",
    "format_table",
    "make_encoder",
    "run_demo",
    "run_seed",
    "write_plots",
    "write_results",
]
