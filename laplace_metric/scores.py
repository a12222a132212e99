"""Retrieval-level uncertainty from posterior weight samples.

:func:`posterior_retrieval` re-embeds both the queries *and* the database under each weight
sample, so that what is measured is how far a query stays from its neighbours when the encoder
varies as the posterior allows. In-distribution queries move with their neighbours;
out-of-distribution queries do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from laplace_metric.predictive import PosteriorEmbedder, knn_and_top1


@dataclass
class PosteriorRetrieval:
    """Per-query results of :func:`posterior_retrieval`.

    Attributes
    ----------
    knn_distance : torch.Tensor
        Mean over weight samples of the distance to the ``k``-th nearest database embedding,
        ``(n,)``; an OOD score (higher = more likely out of distribution).
    confidence : torch.Tensor
        Fraction of weight samples whose top-1 database label equals the top-1 label at the
        posterior mean, ``(n,)``; the retrieval confidence used for calibration.
    predicted : torch.Tensor
        The top-1 database label at the posterior mean, ``(n,)``.
    """

    knn_distance: torch.Tensor
    confidence: torch.Tensor
    predicted: torch.Tensor


@torch.no_grad()
def posterior_retrieval(
    la,
    x: torch.Tensor,
    database: torch.Tensor,
    database_labels: torch.Tensor | None = None,
    k: int = 1,
    n_samples: int = 30,
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
) -> PosteriorRetrieval:
    """Posterior-averaged k-NN distance and top-1 retrieval confidence.

    For weight samples ``theta_s ~ q(theta)`` of the fitted Laplace estimator ``la``,

        knn_distance(x) = 1/S sum_s d_k(z(x; theta_s), {z(x_db; theta_s)})

    where ``d_k`` is the Euclidean distance to the ``k``-th nearest database embedding, and
    ``confidence(x) = 1/S sum_s [label_1(x; theta_s) == label_1(x; theta_MAP)]``.

    Parameters
    ----------
    la : MetricLaplaceMixin
        A fitted laplace-metric estimator.
    x : torch.Tensor
        Queries ``(n, ...)``.
    database : torch.Tensor
        Database inputs ``(m, ...)``, e.g. the training inputs.
    database_labels : torch.Tensor, optional
        Labels ``(m,)``; needed for ``confidence`` and ``predicted`` (else they are empty).
    k : int, default=1
    n_samples : int, default=30
    generator : torch.Generator, optional
    batch_size : int, default=1024
        Rows per forward pass. For a last-layer posterior the backbone runs once per input
        (its features are cached) and each weight sample re-runs only the last layer; the
        distance computations run in query chunks that fit ``la.memory_budget``.

    Returns
    -------
    result : PosteriorRetrieval
    """
    la._check_fitted()
    if k < 1 or k > len(database):
        raise ValueError(f"k must be in [1, {len(database)}], got {k}.")
    x, database = x.to(la._device), database.to(la._device)
    has_labels = database_labels is not None
    if has_labels:
        database_labels = database_labels.to(la._device)
        if database_labels.shape != (len(database),):
            raise ValueError("database_labels must have shape (len(database),).")

    embedder = PosteriorEmbedder(la, batch_size)
    f_db, f_q = embedder.features(database), embedder.features(x)

    def top1_and_knn(sample):
        z_db, z_q = embedder.embed(f_db, sample), embedder.embed(f_q, sample)
        return knn_and_top1(z_q, z_db, k, database_labels, la.memory_budget)

    _, predicted = top1_and_knn(None)
    knn_sum = torch.zeros(len(x), dtype=la._dtype, device=la._device)
    agree = torch.zeros_like(knn_sum)
    for sample in embedder.samples(n_samples, generator):
        knn, top1 = top1_and_knn(sample)
        knn_sum += knn
        if has_labels:
            agree += (top1 == predicted).to(agree.dtype)
    empty = torch.empty(0, device=la._device)
    return PosteriorRetrieval(
        knn_distance=knn_sum / n_samples,
        confidence=agree / n_samples if has_labels else empty,
        predicted=predicted if has_labels else empty,
    )


__all__ = ["PosteriorRetrieval", "posterior_retrieval"]
