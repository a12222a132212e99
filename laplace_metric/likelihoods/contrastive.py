"""The contrastive likelihood of LAM: squared Euclidean distance with a hinge on negatives."""

from __future__ import annotations

import torch

from laplace_metric.likelihoods.base import PairLikelihood


class ContrastiveLikelihood(PairLikelihood):
    """Contrastive likelihood on (by default L2-normalised) embeddings.

    ``delta(z_a, z_b) = ||z_a - z_b||^2``, so a positive pair costs ``||z_a - z_b||^2 / 2`` and a
    negative pair ``max(0, margin - ||z_a - z_b||^2) / 2``. On the unit sphere ``delta`` is at
    most 4, so margins in ``(0, 4]`` are meaningful. The pair's Hessian is
    ``s [[I, -I], [-I, I]]``, so ``L = I``.

    Parameters
    ----------
    margin : float, default=1.0
    normalize : bool, default=True
    hessian_method : {'positives', 'fixed', 'full'}, default='positives'
    miner : callable or str, optional
        A pytorch-metric-learning miner or its name (e.g. ``'multisimilarity'``); ``None`` uses all pairs of the batch.
    """

    name = "contrastive"
    factors_per_sample = True

    def dissimilarity(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        return (z_a - z_b).square().sum(-1)

    def hessian_sqrt(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(z_a.shape[-1], dtype=z_a.dtype, device=z_a.device)
        return eye.expand(z_a.shape[0], -1, -1)

    def sample_factor(self, z: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
        return eye.expand(z.shape[0], -1, -1)
