"""``'trace'``: trace of the linearised (GLM) predictive covariance, ``tr(J Sigma J^T)``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from laplace_metric.scores.base import Score, register_score

if TYPE_CHECKING:
    from laplace_metric.scores.scorer import UncertaintyScorer


@register_score("trace")
class TraceScore(Score):
    """The estimator's ``predictive_uncertainty(x, score='trace')``, in batches."""

    def __call__(
        self, scorer: UncertaintyScorer, x: torch.Tensor, sampled: torch.Tensor | None
    ) -> torch.Tensor:
        """Trace of the predictive covariance, ``(n,)``."""
        chunks = x.split(scorer.batch_size)
        return torch.cat([scorer.la.predictive_uncertainty(c, score="trace") for c in chunks])
