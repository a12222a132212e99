"""``'sampled_std'``: LAM's score, the summed per-dimension std of the sampled embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from laplace_metric.scores.base import Score, register_score

if TYPE_CHECKING:
    from laplace_metric.scores.scorer import UncertaintyScorer


@register_score("sampled_std")
class SampledStdScore(Score):
    """``sum_d std_s[z_d(x; theta_s)]`` over the (normalised) embedding samples."""

    needs_samples = True

    def __call__(
        self, scorer: UncertaintyScorer, x: torch.Tensor, sampled: torch.Tensor | None
    ) -> torch.Tensor:
        """Sum over dimensions of the std over samples, ``(n,)``."""
        return sampled.std(0).sum(-1)
