"""``python -m laplace_metric_cli``: the ``laplace-metric`` command."""

import sys

from laplace_metric_cli import main

sys.exit(main())
