"""Lee et al.'s multi-layer Mahalanobis score: pooled features of several layers, combined."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from laplace_metric.baselines.base import OODBaseline, register_baseline
from laplace_metric.baselines.mahalanobis import (
    FeaturePooling,
    class_distances,
    fit_class_gaussians,
    pool_features,
)
from laplace_metric.encoders import eval_mode
from laplace_metric.enums import parse_enum

__all__ = ["MultiLayerMahalanobisBaseline"]


@register_baseline("mahalanobis_layers")
class MultiLayerMahalanobisBaseline(OODBaseline):
    """Mahalanobis scores on the pooled features of several intermediate layers, combined
    (the feature ensemble of Lee et al., 2018).

    For each named layer ``l``, its output is pooled (global average over the spatial
    dimensions by default: one feature per channel), class-conditional Gaussians with a shared
    covariance are fitted, and ``s_l(x) = min_c (f_l(x) - mu_{l,c})^T Sigma_l^{-1}
    (f_l(x) - mu_{l,c})``. The layers' scores live on different scales, so each is z-scored
    with its mean and standard deviation over the training inputs, and the score is their
    average, ``s(x) = 1/L sum_l (s_l(x) - m_l) / sd_l``. (Lee et al. weight the layers by a
    logistic regression on validation OOD data; the unweighted average needs no OOD data.)

    Pooling keeps every layer's covariance small (``C x C`` for ``C`` channels) where the
    flattened maps would be rank-deficient; see
    :class:`~laplace_metric.baselines.MahalanobisBaseline` for a single layer.

    Parameters
    ----------
    model : nn.Module
        The trained encoder; runs in eval mode (modes and buffers restored afterwards).
    layers : sequence of str
        Names of the modules whose outputs are used, as in ``model.named_modules()``, e.g.
        ``["2", "5", "8"]`` for the ReLUs of an ``nn.Sequential`` CNN.
    pooling : {'avg', 'flatten'}, default='avg'
    ridge : float, default=1e-6
    batch_size : int, default=1024
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        pooling: FeaturePooling | str = FeaturePooling.AVG,
        ridge: float = 1e-6,
        batch_size: int = 1024,
    ) -> None:
        modules = dict(model.named_modules())
        layers = list(layers)
        if not layers:
            raise ValueError("layers needs at least one module name.")
        unknown = [name for name in layers if name not in modules]
        if unknown:
            raise ValueError(
                f"layers {unknown} are not modules of the model; choose names from "
                f"model.named_modules(), e.g. {[n for n in modules if n][:8]}."
            )
        if not ridge >= 0:
            raise ValueError(f"ridge must be non-negative, got {ridge}.")
        self.model = model
        self.layers = layers
        self.pooling = parse_enum(FeaturePooling, pooling, "pooling")
        self.ridge = float(ridge)
        self.batch_size = batch_size
        self.gaussians: list[tuple[Tensor, Tensor, Tensor]] | None = None
        self.score_mean: Tensor | None = None
        self.score_std: Tensor | None = None

    @torch.no_grad()
    def layer_features(self, x: Tensor) -> list[Tensor]:
        """Pooled float64 features ``(n, P_l)`` of every layer, in the order of ``layers``."""
        modules = dict(self.model.named_modules())
        device = next(self.model.parameters()).device
        outputs: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        hooks = [
            modules[name].register_forward_hook(
                lambda m, i, out, name=name: outputs[name].append(
                    pool_features(out, self.pooling).double()
                )
            )
            for name in self.layers
        ]
        try:
            with eval_mode(self.model):
                for start in range(0, len(x), self.batch_size):
                    self.model(x[start : start + self.batch_size].to(device))
        finally:
            for hook in hooks:
                hook.remove()
        return [torch.cat(outputs[name]).to(x.device) for name in self.layers]

    def layer_scores(self, x: Tensor) -> Tensor:
        """Each layer's smallest squared Mahalanobis distance, ``(n, L)``."""
        self._require_fit("gaussians")
        feats = self.layer_features(x)
        return torch.stack(
            [
                class_distances(f, means, precision).min(dim=1).values
                for f, (_, means, precision) in zip(feats, self.gaussians)
            ],
            dim=1,
        )

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> MultiLayerMahalanobisBaseline:
        """Fit one set of class Gaussians per layer and the z-scoring of the layer scores."""
        if y_train is None:
            raise ValueError("MultiLayerMahalanobisBaseline.fit needs the class labels y_train.")
        feats = self.layer_features(x_train)
        y_train = y_train.to(feats[0].device)
        self.gaussians = [fit_class_gaussians(f, y_train, self.ridge) for f in feats]
        train_scores = self.layer_scores(x_train)
        self.score_mean = train_scores.mean(0)
        self.score_std = train_scores.std(0).clamp(min=torch.finfo(train_scores.dtype).tiny)
        return self

    def score(self, x: Tensor) -> Tensor:
        """Average over layers of the z-scored Mahalanobis scores, ``(n,)``."""
        scores = self.layer_scores(x)
        return ((scores - self.score_mean) / self.score_std).mean(1).float()
