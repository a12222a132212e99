"""Deep ensemble of encoders trained from different seeds; rotation-invariant kNN score."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from laplace_metric.baselines.base import OODBaseline, _check_k, register_baseline
from laplace_metric.baselines.embedding import _eval_embed
from laplace_metric.enums import parse_enum
from laplace_metric.metrics import knn_distance_score

__all__ = ["DeepEnsembleBaseline", "EnsembleScore"]


class EnsembleScore(str, Enum):
    """OOD scores of :class:`DeepEnsembleBaseline`."""

    MEAN_KNN = "mean_knn"
    """Mean over members of the distance to the k-th nearest training embedding."""

    EMBEDDING_STD = "embedding_std"
    """Sum over dimensions of the across-member std of the embeddings. Not rotation-invariant,
    hence not meaningful: kept only to reproduce the naive baseline."""


@register_baseline("deep_ensemble")
class DeepEnsembleBaseline(OODBaseline):
    """Deep ensemble of encoders trained from different seeds (Lakshminarayanan et al., 2017).

    The embedding of a metric-learning loss is only defined up to an isometry: every rotation of
    a member's embedding space has the same loss. Two members therefore disagree on the raw
    coordinates even for training inputs, and the spread of raw embeddings across members
    measures arbitrary rotations, not uncertainty (measured on the digits split: AUROC 0.54 / 0.33). The
    default score is rotation-invariant: the mean over members ``m`` of the distance from
    ``z_m(x)`` to its k-th nearest training embedding *of the same member*. Retrieval uses the
    concatenation ``[z_1, ..., z_M] / sqrt(M)``, whose squared distances are the members' mean
    squared distances (also rotation-invariant). After :meth:`fit`, ``train_emb`` holds exactly
    what :meth:`embed` returns for the training inputs (the scaled concatenation), so the two can
    be mixed for retrieval; ``member_train_emb`` holds each member's own training embeddings.

    Parameters
    ----------
    members : sequence of nn.Module
        Trained encoders.
    k : int, default=1
    score : {'mean_knn', 'embedding_std'}, default='mean_knn'
    normalize : bool, default=True
    batch_size : int, default=1024
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        k: int = 1,
        score: EnsembleScore | str = EnsembleScore.MEAN_KNN,
        normalize: bool = True,
        batch_size: int = 1024,
    ) -> None:
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"An ensemble needs at least two members, got {len(members)}.")
        self.members = members
        self.k = _check_k(k)
        self.score_kind = parse_enum(EnsembleScore, score, "score")
        self.normalize = normalize
        self.batch_size = batch_size
        self.train_emb: Tensor | None = None
        self.member_train_emb: list[Tensor] | None = None

    @classmethod
    def train(
        cls,
        factory: Callable[[], nn.Module],
        trainer: Callable[[nn.Module, int], Any],
        seeds: Sequence[int] = (0, 1, 2, 3, 4),
        **kwargs: Any,
    ) -> DeepEnsembleBaseline:
        """Build and train one member per seed.

        Parameters
        ----------
        factory : callable
            ``factory() -> nn.Module``, called after ``torch.manual_seed(seed)``.
        trainer : callable
            ``trainer(encoder, seed)``, e.g.
            ``lambda enc, s: train_encoder(enc, loader, seed=s, progress_bar=False)``.
        seeds : sequence of int, default=(0, 1, 2, 3, 4)
        **kwargs
            Passed to the constructor.

        Returns
        -------
        DeepEnsembleBaseline
        """
        members = []
        for seed in seeds:
            torch.manual_seed(seed)
            member = factory()
            trainer(member, seed)
            members.append(member)
        return cls(members, **kwargs)

    def member_embeddings(self, x: Tensor) -> list[Tensor]:
        """Each member's embeddings ``(n, D)``."""
        return [_eval_embed(m, x, self.normalize, self.batch_size) for m in self.members]

    def _joint(self, member_embeddings: list[Tensor]) -> Tensor:
        return torch.cat(member_embeddings, dim=1) / math.sqrt(len(self.members))

    def embed(self, x: Tensor) -> Tensor:
        """Concatenated member embeddings scaled by ``1/sqrt(M)``, ``(n, M D)``."""
        return self._joint(self.member_embeddings(x))

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> DeepEnsembleBaseline:
        """Store the training embeddings: ``train_emb`` (as :meth:`embed` returns them) and
        ``member_train_emb`` (each member's); ``y_train`` is not used."""
        members = self.member_embeddings(x_train)
        if members[0].shape[0] < self.k:
            raise ValueError(f"k={self.k} exceeds the {members[0].shape[0]} training inputs.")
        self.member_train_emb = members
        self.train_emb = self._joint(members)
        return self

    def score(self, x: Tensor) -> Tensor:
        """Mean kNN distance over members (or the naive embedding std), ``(n,)``."""
        embs = self.member_embeddings(x)
        if self.score_kind == EnsembleScore.EMBEDDING_STD:
            return torch.stack(embs).std(dim=0).sum(-1)
        self._require_fit("member_train_emb")
        dists = [knn_distance_score(e, t, self.k) for e, t in zip(embs, self.member_train_emb)]
        return torch.stack(dists).mean(0)
