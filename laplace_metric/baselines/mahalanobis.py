"""Class-conditional Gaussians with a shared covariance on features (Lee et al., 2018)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from laplace_metric.baselines.base import OODBaseline, register_baseline
from laplace_metric.baselines.embedding import _eval_embed, embed

__all__ = ["MahalanobisBaseline"]


@register_baseline("mahalanobis")
class MahalanobisBaseline(OODBaseline):
    """Class-conditional Gaussians with a shared covariance on features (Lee et al., 2018).

    ``mu_c = mean of class c``, ``Sigma = 1/N sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T + eps I``
    with ``eps = ridge * tr(Sigma) / P``; score ``s(x) = min_c (f(x) - mu_c)^T Sigma^{-1}
    (f(x) - mu_c)`` (the squared distance; the square root ranks identically).

    Parameters
    ----------
    feature_fn : nn.Module or callable
        Feature map ``(B, ...) -> (B, P)``, e.g. ``penultimate(encoder)``.
    ridge : float, default=1e-6
        Relative ridge added to the covariance for invertibility.
    batch_size : int, default=1024
    """

    def __init__(
        self,
        feature_fn: nn.Module | Callable[[Tensor], Tensor],
        ridge: float = 1e-6,
        batch_size: int = 1024,
    ) -> None:
        if not callable(feature_fn):
            raise TypeError(f"feature_fn must be callable, got {type(feature_fn).__name__}.")
        if not ridge >= 0:
            raise ValueError(f"ridge must be non-negative, got {ridge}.")
        self.feature_fn = feature_fn
        self.ridge = float(ridge)
        self.batch_size = batch_size
        self.classes: Tensor | None = None
        self.means: Tensor | None = None
        self.precision: Tensor | None = None

    def features(self, x: Tensor) -> Tensor:
        """Features ``(n, P)`` in float64."""
        if isinstance(self.feature_fn, nn.Module):
            out = _eval_embed(self.feature_fn, x, False, self.batch_size)
        else:
            out = embed(self.feature_fn, x, False, self.batch_size)
        return out.double()

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> MahalanobisBaseline:
        """Estimate the class means and the shared covariance."""
        if y_train is None:
            raise ValueError("MahalanobisBaseline.fit needs the class labels y_train.")
        feats = self.features(x_train)
        y_train = y_train.to(feats.device)
        if y_train.shape != (feats.shape[0],):
            raise ValueError(
                f"y_train must have shape ({feats.shape[0]},), got {tuple(y_train.shape)}."
            )
        self.classes = torch.unique(y_train)
        if len(self.classes) < 1:
            raise ValueError("y_train is empty.")
        self.means = torch.stack([feats[y_train == c].mean(0) for c in self.classes])
        centred = feats - self.means[torch.searchsorted(self.classes, y_train)]
        cov = centred.T @ centred / feats.shape[0]
        eps = self.ridge * cov.diagonal().mean().clamp(min=torch.finfo(cov.dtype).tiny)
        cov = cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        self.precision = torch.linalg.inv(cov)
        return self

    def distances(self, x: Tensor) -> Tensor:
        """Squared Mahalanobis distances to every class mean, ``(n, C)``."""
        self._require_fit("precision")
        diff = self.features(x)[:, None, :] - self.means[None, :, :]
        return torch.einsum("ncp,pq,ncq->nc", diff, self.precision, diff)

    def score(self, x: Tensor) -> Tensor:
        """Smallest squared Mahalanobis distance to a class mean, ``(n,)``."""
        return self.distances(x).min(dim=1).values.float()

    def predict(self, x: Tensor) -> Tensor:
        """Class of the nearest mean, ``(n,)``."""
        return self.classes[self.distances(x).argmin(dim=1)]
