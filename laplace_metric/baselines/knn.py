"""Deterministic encoder; score = distance to the k-th nearest training embedding."""

from __future__ import annotations

from torch import Tensor, nn

from laplace_metric.baselines.base import OODBaseline, _check_k, register_baseline
from laplace_metric.baselines.embedding import _eval_embed
from laplace_metric.metrics import knn_distance_score

__all__ = ["KNNDistanceBaseline"]


@register_baseline("knn_distance")
class KNNDistanceBaseline(OODBaseline):
    """Deterministic encoder; score = distance to the k-th nearest training embedding.

    ``s(x) = ||z(x) - z_train_(k)||`` on (by default L2-normalised) embeddings.

    Parameters
    ----------
    encoder : nn.Module
        Trained encoder ``(B, ...) -> (B, D)``.
    k : int, default=1
    normalize : bool, default=True
    batch_size : int, default=1024
    """

    def __init__(
        self, encoder: nn.Module, k: int = 1, normalize: bool = True, batch_size: int = 1024
    ) -> None:
        self.encoder = encoder
        self.k = _check_k(k)
        self.normalize = normalize
        self.batch_size = batch_size
        self.train_emb: Tensor | None = None

    def embed(self, x: Tensor) -> Tensor:
        """Point embeddings ``(n, D)`` for retrieval."""
        return _eval_embed(self.encoder, x, self.normalize, self.batch_size)

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> KNNDistanceBaseline:
        """Store the training embeddings; ``y_train`` is not used."""
        self.train_emb = self.embed(x_train)
        if self.train_emb.shape[0] < self.k:
            raise ValueError(f"k={self.k} exceeds the {self.train_emb.shape[0]} training inputs.")
        return self

    def score(self, x: Tensor) -> Tensor:
        """Distance to the k-th nearest training embedding, ``(n,)``."""
        self._require_fit("train_emb")
        return knn_distance_score(self.embed(x), self.train_emb, self.k)
