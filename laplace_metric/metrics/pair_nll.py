"""Prior-precision objective: the Gaussian NLL of positive validation pairs under the predictive.

Used by :meth:`~laplace_metric.estimators.MetricLaplaceMixin.optimize_prior_precision`
(``method="gridsearch"``); formerly ``laplace_metric.validation``.
"""

from __future__ import annotations

import math

import torch


class PositivePairGaussianNLL:
    """Gaussian NLL of positive validation pairs under the embedding predictive.

    For a positive pair ``(a, b)`` with predictive means ``mu`` and covariances ``Sigma``,
    ``z_a - z_b ~ N(mu_a - mu_b, Sigma_a + Sigma_b)`` if the two samples had the same true
    embedding. The objective is the mean over positive pairs of

        1/2 d^T (Sigma_a + Sigma_b + eps I)^{-1} d + 1/2 log det(2 pi (Sigma_a + Sigma_b + eps I))

    with ``d = mu_a - mu_b``. It penalises both over-confidence (small covariance, distant
    positives) and under-confidence, so its minimiser calibrates the predictive spread to
    the within-class scatter of held-out data. Lower is better.

    Parameters
    ----------
    eps : float, default=1e-4
        Isotropic jitter (normalised embeddings have no radial variance).
    max_pairs : int, default=20000
        Positive pairs beyond this are subsampled with a fixed seed.
    """

    def __init__(self, eps: float = 1e-4, max_pairs: int = 20000) -> None:
        self.eps = eps
        self.max_pairs = max_pairs

    def __call__(
        self, means: torch.Tensor, covs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        first, second = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
        positive = labels[first] == labels[second]
        first, second = first[positive], second[positive]
        if first.numel() == 0:
            raise ValueError("The validation set has no positive pair (two samples of one class).")
        if first.numel() > self.max_pairs:
            keep = torch.randperm(first.numel(), generator=torch.Generator().manual_seed(0))
            keep = keep[: self.max_pairs].to(first.device)
            first, second = first[keep], second[keep]
        diff = means[first] - means[second]
        dim = diff.shape[-1]
        if covs.ndim == 2:
            var = covs[first] + covs[second] + self.eps
            nll = 0.5 * (diff.square() / var).sum(-1) + 0.5 * var.log().sum(-1)
        else:
            eye = torch.eye(dim, dtype=covs.dtype, device=covs.device)
            cov = covs[first] + covs[second] + self.eps * eye
            chol = torch.linalg.cholesky(cov)
            white = torch.linalg.solve_triangular(chol, diff[..., None], upper=False)[..., 0]
            logdet = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
            nll = 0.5 * white.square().sum(-1) + 0.5 * logdet
        return (nll + 0.5 * dim * math.log(2 * math.pi)).mean()
