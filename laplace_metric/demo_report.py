"""Deprecated: the demo's reporting moved to :mod:`laplace_metric.demo.report` and
:mod:`laplace_metric.demo.plots` (the demo is a package now)."""

from __future__ import annotations

import warnings

from laplace_metric.demo.evaluator import DemoEvaluator as _Evaluator
from laplace_metric.demo.plots import write_plots
from laplace_metric.demo.report import COLUMNS, SCORE_ROWS, footer, format_table, write_results

warnings.warn(
    "laplace_metric.demo_report is deprecated; import from laplace_metric.demo "
    "(laplace_metric.demo.report, laplace_metric.demo.plots) instead.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["COLUMNS", "SCORE_ROWS", "footer", "format_table", "write_plots", "write_results"]
_ = _Evaluator
