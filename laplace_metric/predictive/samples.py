"""Posterior embeddings under weight samples, with a frozen backbone run once.

For a last-layer posterior the backbone runs once per input (:class:`PosteriorEmbedder`);
each weight sample only re-runs the head on the cached features. Weight samples and
embeddings are drawn in blocks that fit the estimator's ``memory_budget``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.nn.utils import vector_to_parameters

from laplace_metric.memory import check_batch_size, check_fits, chunk_size, dtype_bytes, split
from laplace_metric.predictive.glm import linear_head
from laplace_metric.predictive.view import PredictiveView, as_view

#: Rows per forward pass when the budget does not bound them (activations are not planned).
FORWARD_BATCH_SIZE = 256


class PosteriorEmbedder:
    """Embeddings of inputs under posterior weight samples, running a frozen backbone once.

    For a last-layer posterior, :meth:`features` runs the backbone and caches the last
    layer's inputs; :meth:`embed` then applies only the head at a weight sample (for an
    ``nn.Linear`` head functionally, without touching the model's parameters). For any other
    posterior the "features" are the inputs and :meth:`embed` runs the whole model.

    Parameters
    ----------
    la : PredictiveView or estimator
        A fitted estimator or its :class:`~laplace_metric.predictive.PredictiveView`.
    batch_size : int, optional
        Rows per forward pass; default :data:`FORWARD_BATCH_SIZE`.
    """

    def __init__(self, la: PredictiveView, batch_size: int | None = None) -> None:
        la = as_view(la)
        la.check_fitted()
        self.la = la
        self.batch_size = check_batch_size(FORWARD_BATCH_SIZE if batch_size is None else batch_size)
        self.last_layer = la.last_layer
        self.head = linear_head(la)
        self.params = la.posterior_parameters()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs of the sampled part: backbone features (last-layer) or ``x`` itself."""
        if not self.last_layer:
            return x
        return torch.cat(
            [self.la.model.forward_with_features(c)[1] for c in split(x, self.batch_size)]
        )

    @contextmanager
    def _weights(self, sample: torch.Tensor | None):
        if sample is None:
            yield
            return
        vector_to_parameters(sample, self.params)
        try:
            yield
        finally:
            vector_to_parameters(self.la.mean, self.params)

    @torch.no_grad()
    def raw(self, features: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs ``(n, D)`` at weight vector ``sample`` (``None``: the posterior mean)."""
        if self.head is not None:
            vector = self.la.mean if sample is None else sample
            D, N = self.head.out_features, self.head.in_features
            weight = vector[: D * N].reshape(D, N)
            bias = vector[D * N :] if self.head.bias is not None else None
            return F.linear(features, weight, bias)
        module = self.la.model.last_layer if self.last_layer else self.la.model
        with self._weights(sample):
            return torch.cat([module(c) for c in split(features, self.batch_size)])

    def embed(self, features: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings ``(n, D)`` at weight vector ``sample`` (``None``: the posterior mean).

        Raises
        ------
        ValueError
            If the outputs under a weight sample are NaN or infinite: the posterior's weight
            noise overflows the network (its prior precision is too small for it).
        """
        raw = self.raw(features, sample)
        if sample is not None and not bool(torch.isfinite(raw).all()):
            prior = torch.as_tensor(self.la.posterior.prior_precision).detach().float()
            raise ValueError(
                "The encoder returned NaN or inf embeddings under a posterior weight sample: "
                f"the weight noise overflows the network (prior precision {prior.min():.3g}"
                f"{'' if prior.numel() == 1 else f' to {prior.max():.3g}'}). Raise the prior "
                "precision (la.optimize_prior_precision(method='marglik') or a larger "
                "la.prior_precision), or put the posterior over fewer weights "
                "(subset_of_weights='last_layer')."
            )
        return self.la.likelihood.embed(raw)

    def samples(
        self, n_samples: int, generator: torch.Generator | None = None
    ) -> Iterator[torch.Tensor]:
        """Weight samples one at a time, drawn in blocks that fit a quarter of the budget.

        Draws all ``n_samples`` at once (the same stream as ``la.sample``) when they fit.
        """
        if n_samples < 1:
            raise ValueError(f"n_samples must be positive, got {n_samples}.")
        la = self.la
        per_sample = int(la.mean.numel()) * dtype_bytes(la.dtype)
        block = chunk_size(n_samples, per_sample, la.memory_budget // 4)
        remaining = n_samples
        while remaining > 0:
            draw = min(block, remaining)
            yield from la.sample(draw, generator)
            remaining -= draw


def draw_weight_samples(
    la: PredictiveView, n_samples: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """``n_samples`` weight vectors, kept to reuse across query chunks (checked to fit)."""
    la = as_view(la)
    check_fits(
        n_samples * int(la.mean.numel()) * dtype_bytes(la.dtype),
        la.memory_budget,
        f"{n_samples} weight samples of {int(la.mean.numel()):,} parameters",
        ["fewer samples", "pred_type='glm'"],
    )
    return list(PosteriorEmbedder(la).samples(n_samples, generator))


def nn_embedding_samples(
    la: PredictiveView,
    x: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    weights: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Embeddings ``(n_samples, B, D)`` of ``x`` under weight samples (frozen backbone once).

    ``weights``: reuse these weight samples instead of drawing ``n_samples`` new ones.
    """
    la = as_view(la)
    embedder = PosteriorEmbedder(la, batch_size)
    if weights is not None:
        n_samples = len(weights)
    if batch_size is None:
        itemsize = dtype_bytes(la.dtype)
        per_query = n_samples * int(la.n_outputs) * itemsize * 2
        out_bytes = len(x) * per_query
        check_fits(
            out_bytes,
            la.memory_budget,
            f"{n_samples} embedding samples of {len(x)} queries",
            ["fewer samples or queries at a time"],
        )
    features = embedder.features(x)
    samples = embedder.samples(n_samples, generator) if weights is None else weights
    return torch.stack([embedder.embed(features, w) for w in samples])


@torch.no_grad()
def nearest(
    z_q: torch.Tensor, z_db: torch.Tensor, k: int, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices ``(n, k)`` of each query's ``k`` nearest database embeddings,
    nearest first, over query chunks whose ``(chunk, len(z_db))`` distance matrix fits
    ``budget``."""
    per_query = 3 * len(z_db) * z_db.element_size()
    size = chunk_size(len(z_q), per_query, budget)
    values, indices = [], []
    for chunk in split(z_q, size):
        found = torch.cdist(chunk, z_db).topk(k, largest=False)
        values.append(found.values)
        indices.append(found.indices)
    return torch.cat(values), torch.cat(indices)


def knn_and_top1(
    z_q: torch.Tensor,
    z_db: torch.Tensor,
    k: int,
    db_labels: torch.Tensor | None,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Distance to the ``k``-th nearest database embedding and the top-1 database label
    (see :func:`nearest`)."""
    values, indices = nearest(z_q, z_db, k, budget)
    return values[:, -1], (db_labels[indices[:, 0]] if db_labels is not None else None)


def iter_query_chunks(
    la: PredictiveView, x: torch.Tensor, batch_size: int | None, per_query: float
) -> Iterator[torch.Tensor]:
    """Chunks of ``x`` whose memory ``per_query`` each fits the budget (or ``batch_size``)."""
    la = as_view(la)
    yield from split(x, chunk_size(len(x), per_query, la.memory_budget, batch_size))


__all__ = [
    "FORWARD_BATCH_SIZE",
    "PosteriorEmbedder",
    "draw_weight_samples",
    "iter_query_chunks",
    "knn_and_top1",
    "nearest",
    "nn_embedding_samples",
]
