"""One-shot posterior retrieval: :func:`posterior_retrieval`, an :class:`UncertaintyScorer`
built and used once."""

from __future__ import annotations

import torch

from laplace_metric.enums import DatabaseEmbedding
from laplace_metric.scores.scorer import UncertaintyScorer
from laplace_metric.scores.support import PosteriorRetrieval


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
    database_embedding: DatabaseEmbedding | str = DatabaseEmbedding.PER_SAMPLE,
    n_candidates: int = 64,
) -> PosteriorRetrieval:
    """Posterior-averaged k-NN distance and top-1 retrieval confidence (one-shot).

    For weight samples ``theta_s ~ q(theta)`` of the fitted Laplace estimator ``la``,

        knn_distance(x) = 1/S sum_s d_k(z(x; theta_s), {z(x_db; theta_s)})

    where ``d_k`` is the Euclidean distance to the ``k``-th nearest database embedding, and
    ``confidence(x) = 1/S sum_s [label_1(x; theta_s) == label_1(x; theta_MAP)]``. To score
    several query sets against one database, build one :class:`UncertaintyScorer` instead: it
    embeds the database once per weight sample.

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
    database_embedding : {'per_sample', 'candidates'}, default='per_sample'
    n_candidates : int, default=64
        See :class:`UncertaintyScorer`.

    Returns
    -------
    result : PosteriorRetrieval
    """
    scorer = UncertaintyScorer(
        la,
        database,
        database_labels,
        k=k,
        n_samples=n_samples,
        generator=generator,
        batch_size=batch_size,
        database_embedding=database_embedding,
        n_candidates=n_candidates,
    )
    return scorer.retrieval(x)


__all__ = ["posterior_retrieval"]
