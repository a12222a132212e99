"""Weight samples of a Linear head on cached features: a sample costs one matrix product.

For a last-layer posterior (or dropout on the head input) the backbone runs once per input;
every weight sample of the head ``z = normalise(W f + b)`` is then one product with the cached
features ``f``. :func:`laplace_head_samples` draws them from a fitted last-layer estimator,
:func:`dropout_head_samples` from dropout masks on the head input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["HeadSamples", "dropout_head_samples", "head_features", "laplace_head_samples"]


@dataclass
class HeadSamples:
    """Samples of a Linear head ``z = normalise(W f + b)``: ``weight (S, D, P)``, ``bias (S, D)``.

    ``mean_weight`` / ``mean_bias`` give the point embedding used for retrieval.
    """

    weight: Tensor
    bias: Tensor
    mean_weight: Tensor
    mean_bias: Tensor

    def embed(self, feats: Tensor, index: int | None = None) -> Tensor:
        """Normalised embeddings of ``feats`` under sample ``index`` (``None``: the mean)."""
        if index is None:
            w, b = self.mean_weight, self.mean_bias
        else:
            w, b = self.weight[index], self.bias[index]
        return F.normalize(feats @ w.T + b, dim=-1)

    def lam_std(self, feats: Tensor) -> Tensor:
        """LAM's score: sum over dimensions of the std over samples, ``(N,)``."""
        samples = torch.stack([self.embed(feats, s) for s in range(len(self.weight))])
        return samples.std(0).sum(-1)

    def sampled_knn(
        self, feats: Tensor, db_feats: Tensor, db_labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior-averaged 1-NN distance, top-1 confidence and top-1 label at the mean.

        The same estimator as :func:`laplace_metric.posterior_retrieval` with ``k = 1``.
        """
        predicted = db_labels[torch.cdist(self.embed(feats), self.embed(db_feats)).argmin(1)]
        knn = torch.zeros(len(feats))
        agree = torch.zeros(len(feats))
        for s in range(len(self.weight)):
            dist = torch.cdist(self.embed(feats, s), self.embed(db_feats, s))
            value, index = dist.min(1)
            knn += value
            agree += (db_labels[index] == predicted).float()
        return knn / len(self.weight), agree / len(self.weight), predicted


def _split_head(vectors: Tensor, head: nn.Linear) -> tuple[Tensor, Tensor]:
    n_weight = head.weight.numel()
    weight = vectors[:, :n_weight].reshape(len(vectors), *head.weight.shape)
    return weight, vectors[:, n_weight:]


def laplace_head_samples(la: Any, head: nn.Linear, n_samples: int, seed: int) -> HeadSamples:
    """Head samples of a fitted last-layer estimator (parameter order: weight, then bias).

    Parameters
    ----------
    la : fitted last-layer metric Laplace estimator
        Only its public ``sample`` and ``mean`` are used.
    head : nn.Linear
        The last layer the posterior is over.
    n_samples, seed : int
    """
    gen = torch.Generator().manual_seed(seed)
    weight, bias = _split_head(la.sample(n_samples, gen).detach().float(), head)
    mean_w, mean_b = _split_head(la.mean.detach().float()[None], head)
    return HeadSamples(weight, bias, mean_w[0], mean_b[0])


def dropout_head_samples(head: nn.Linear, p: float, n_samples: int, seed: int) -> HeadSamples:
    """Dropout on the head input as weight samples: column masks scaled by ``1 / (1 - p)``.

    One mask per sample is shared by all inputs (Gal and Ghahramani's weight view of dropout),
    so queries and database are re-embedded under the same sample; the per-input marginal is
    that of ordinary MC dropout.
    """
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(n_samples, head.in_features, generator=gen) >= p
    weight = head.weight.detach()[None] * keep[:, None, :].float() / (1 - p)
    bias = head.bias.detach().expand(n_samples, -1)
    return HeadSamples(weight, bias.clone(), head.weight.detach(), head.bias.detach())


@torch.no_grad()
def head_features(encoder: nn.Sequential, x: Tensor, batch_size: int = 512) -> Tensor:
    """Penultimate features (the head input) of a Sequential ``encoder`` in eval mode."""
    body = encoder[:-1].eval()
    return torch.cat([body(chunk) for chunk in x.split(batch_size)])
