"""``'posterior_knn'``: mean over weight samples of the distance to the k-th nearest database
embedding, queries and database re-embedded under each sample."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from laplace_metric.scores.base import Score, register_score

if TYPE_CHECKING:
    from laplace_metric.scores.scorer import UncertaintyScorer


@register_score("posterior_knn")
class PosteriorKNNScore(Score):
    """``1/S sum_s d_k(z(x; theta_s), {z(x_db; theta_s)})``, the default score."""

    needs_samples = True
    needs_database = True

    def __call__(
        self, scorer: UncertaintyScorer, x: torch.Tensor, sampled: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean k-th neighbour distance over the weight samples, ``(n,)``."""
        return scorer._knn_top1(sampled)[0].mean(0)
