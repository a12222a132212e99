"""Deprecated: the command line lives in :mod:`laplace_metric_cli` (``laplace-metric``).

``laplace_metric_cli`` answers ``--help`` without importing torch; this module only re-exports
its names (``python -m laplace_metric.cli`` still runs it) and warns on import.
"""

from __future__ import annotations

import sys
import warnings

from laplace_metric_cli import UsageError, build_parser, main, validate_demo_args

warnings.warn(
    "laplace_metric.cli is deprecated; import from laplace_metric_cli (or run the "
    "laplace-metric command / python -m laplace_metric_cli) instead.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["UsageError", "build_parser", "main", "validate_demo_args"]

if __name__ == "__main__":
    sys.exit(main())
