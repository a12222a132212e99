"""Command-line interface: ``laplace-metric demo`` (``python -m laplace_metric.cli``).

The parser and validation live in the top-level package :mod:`laplace_metric_cli`, so that the
console script answers ``--help`` without importing torch; this module re-exports them.
"""

from __future__ import annotations

import sys

from laplace_metric_cli import UsageError, build_parser, main, validate_demo_args

__all__ = ["UsageError", "build_parser", "main", "validate_demo_args"]

if __name__ == "__main__":
    sys.exit(main())
