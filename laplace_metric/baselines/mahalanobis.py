"""Class-conditional Gaussians with a shared covariance on features (Lee et al., 2018)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor, nn

from laplace_metric.baselines.base import OODBaseline, register_baseline
from laplace_metric.baselines.embedding import run_batches
from laplace_metric.encoders import eval_mode
from laplace_metric.enums import parse_enum

__all__ = ["FeaturePooling", "MahalanobisBaseline", "fit_class_gaussians", "pool_features"]


class FeaturePooling(str, Enum):
    """How feature maps ``(B, C, ...)`` become feature vectors."""

    FLATTEN = "flatten"
    """Flatten everything after the batch dimension (``(B, C*H*W)``)."""

    AVG = "avg"
    """Global average pooling over the spatial dimensions (``(B, C)``), the usual recipe for
    convolutional feature maps (Lee et al., 2018)."""


def pool_features(features: Tensor, pooling: FeaturePooling | str) -> Tensor:
    """Feature vectors ``(B, P)`` from features of any shape ``(B, ...)``.

    Parameters
    ----------
    features : Tensor
    pooling : {'flatten', 'avg'}

    Returns
    -------
    vectors : Tensor
    """
    pooling = parse_enum(FeaturePooling, pooling, "pooling")
    if pooling == FeaturePooling.AVG and features.ndim > 2:
        return features.flatten(2).mean(-1)
    return features.flatten(1)


def fit_class_gaussians(
    feats: Tensor, y: Tensor, ridge: float, warn_rank: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Class means and the shared precision of ``feats`` ``(N, P)`` (float64), with the
    relative ``ridge``; warns when ``P >= N`` (a rank-deficient covariance)."""
    if y.shape != (feats.shape[0],):
        raise ValueError(f"y_train must have shape ({feats.shape[0]},), got {tuple(y.shape)}.")
    n, p = feats.shape
    if warn_rank and p >= n:
        warnings.warn(
            f"MahalanobisBaseline: {p}-dimensional features from {n} training inputs give a "
            "rank-deficient covariance, held up only by the ridge (and inverting it costs "
            f"O(P^3) = {p}^3). Pool convolutional feature maps (pooling='avg' with a "
            "feature_fn that returns the map, e.g. encoder[:k]), use a narrower layer, or more "
            "training inputs.",
            UserWarning,
            stacklevel=3,
        )
    classes = torch.unique(y)
    means = torch.stack([feats[y == c].mean(0) for c in classes])
    centred = feats - means[torch.searchsorted(classes, y)]
    cov = centred.T @ centred / n
    eps = ridge * cov.diagonal().mean().clamp(min=torch.finfo(cov.dtype).tiny)
    cov = cov + eps * torch.eye(p, dtype=cov.dtype, device=cov.device)
    return classes, means, torch.linalg.inv(cov)


def class_distances(feats: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """Squared Mahalanobis distances ``(n, C)`` of ``feats`` to every class mean."""
    diff = feats[:, None, :] - means[None, :, :]
    return torch.einsum("ncp,pq,ncq->nc", diff, precision, diff)


@register_baseline("mahalanobis")
class MahalanobisBaseline(OODBaseline):
    """Class-conditional Gaussians with a shared covariance on features (Lee et al., 2018).

    ``mu_c = mean of class c``, ``Sigma = 1/N sum_i (f_i - mu_{y_i})(f_i - mu_{y_i})^T + eps I``
    with ``eps = ridge * tr(Sigma) / P``; score ``s(x) = min_c (f(x) - mu_c)^T Sigma^{-1}
    (f(x) - mu_c)`` (the squared distance; the square root ranks identically).

    Choosing the features: the covariance has ``P^2`` entries and needs well over ``P``
    training inputs. The flattened penultimate layer of a CNN is large (``penultimate(cnn)``
    on a 28x28 CNN: 9216 features; 3000 training images leave the covariance rank-deficient
    and its inversion slow), so pool the last convolutional feature map instead:
    ``MahalanobisBaseline(cnn[:k], pooling="avg")`` with ``cnn[:k]`` ending at that map (one
    feature per channel). ``fit`` warns when ``P >= N``. For the multi-layer recipe of Lee et
    al. (several intermediate layers, pooled, combined), see
    :class:`~laplace_metric.baselines.MultiLayerMahalanobisBaseline`.

    Parameters
    ----------
    feature_fn : nn.Module or callable
        Feature map ``(B, ...) -> (B, P)`` or ``(B, C, H, W)``, e.g. ``penultimate(encoder)``.
        An ``nn.Module`` runs in eval mode (its modes and buffers restored afterwards).
    ridge : float, default=1e-6
        Relative ridge added to the covariance for invertibility.
    batch_size : int, default=1024
    pooling : {'flatten', 'avg'}, default='flatten'
        How features with spatial dimensions become vectors (see :class:`FeaturePooling`).
    """

    def __init__(
        self,
        feature_fn: nn.Module | Callable[[Tensor], Tensor],
        ridge: float = 1e-6,
        batch_size: int = 1024,
        pooling: FeaturePooling | str = FeaturePooling.FLATTEN,
    ) -> None:
        if not callable(feature_fn):
            raise TypeError(f"feature_fn must be callable, got {type(feature_fn).__name__}.")
        if not ridge >= 0:
            raise ValueError(f"ridge must be non-negative, got {ridge}.")
        self.feature_fn = feature_fn
        self.ridge = float(ridge)
        self.batch_size = batch_size
        self.pooling = parse_enum(FeaturePooling, pooling, "pooling")
        self.classes: Tensor | None = None
        self.means: Tensor | None = None
        self.precision: Tensor | None = None

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Features ``(n, P)`` in float64 (pooled as ``pooling`` says)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
        fn = self.feature_fn
        if isinstance(fn, nn.Module):
            with eval_mode(fn):
                out = run_batches(fn, x, self.batch_size)
        else:
            out = torch.cat(
                [fn(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
            )
        out = pool_features(out, self.pooling).double().to(x.device)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("The feature function returned NaN or inf values.")
        return out

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> MahalanobisBaseline:
        """Estimate the class means and the shared covariance."""
        if y_train is None:
            raise ValueError("MahalanobisBaseline.fit needs the class labels y_train.")
        feats = self.features(x_train)
        if len(feats) == 0:
            raise ValueError("x_train is empty.")
        y_train = y_train.to(feats.device)
        self.classes, self.means, self.precision = fit_class_gaussians(feats, y_train, self.ridge)
        return self

    def distances(self, x: Tensor) -> Tensor:
        """Squared Mahalanobis distances to every class mean, ``(n, C)``."""
        self._require_fit("precision")
        return class_distances(self.features(x), self.means, self.precision)

    def score(self, x: Tensor) -> Tensor:
        """Smallest squared Mahalanobis distance to a class mean, ``(n,)``."""
        return self.distances(x).min(dim=1).values.float()

    def predict(self, x: Tensor) -> Tensor:
        """Class of the nearest mean, ``(n,)``."""
        return self.classes[self.distances(x).argmin(dim=1)]
