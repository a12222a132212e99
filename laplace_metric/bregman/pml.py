"""pytorch-metric-learning adapters: a learned Bregman divergence as a pml distance, and kNN
retrieval under it (also for pml's ``AccuracyCalculator``).

Retrieval ranks database (reference) items ``y`` for a query ``x`` by ``D(x, y)``, the
convention of :mod:`laplace_metric.bregman.divergence`.
"""

from __future__ import annotations

from itertools import chain

import torch
from pytorch_metric_learning.distances import BaseDistance

from laplace_metric.bregman.divergence import BregmanDivergence, as_divergence
from laplace_metric.bregman.potentials import ConvexPotential, check_points


class BregmanDistance(BaseDistance):
    """A learned Bregman divergence as a pytorch-metric-learning distance.

    ``mat[i, j] = D(query_i, ref_j)`` (smaller is closer, ``is_inverted=False``), so every pml
    loss and miner works with it. pml miners compute distances under ``torch.no_grad``; the
    potential's gradient is then taken with grad enabled locally on a detached copy.

    Parameters
    ----------
    divergence : BregmanDivergence or ConvexPotential
        The divergence (its potential's parameters are registered as this module's, so an
        optimiser over ``loss.parameters()`` or ``distance.parameters()`` trains ``phi``).
    normalize_embeddings : bool, default=True
        L2-normalise embeddings first (pml's default; matches ``BregmanLikelihood``'s).
    **kwargs
        Passed to :class:`pytorch_metric_learning.distances.BaseDistance` (``power``, ...).
    """

    def __init__(
        self,
        divergence: BregmanDivergence | ConvexPotential,
        normalize_embeddings: bool = True,
        **kwargs,
    ) -> None:
        if kwargs.get("is_inverted", False):
            raise ValueError("A Bregman divergence is a dissimilarity: is_inverted must be False.")
        kwargs.pop("is_inverted", None)
        super().__init__(normalize_embeddings=normalize_embeddings, is_inverted=False, **kwargs)
        self.divergence = as_divergence(divergence)

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor | None) -> torch.Tensor:
        """All-pairs divergences ``(n_query, n_ref)``."""
        return self.divergence.pairwise(query_emb, query_emb if ref_emb is None else ref_emb)

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        """Divergences of paired rows ``(n,)``."""
        return self.divergence(query_emb, ref_emb)


def bregman_knn(
    query: torch.Tensor,
    database: torch.Tensor,
    k: int,
    divergence: BregmanDivergence | ConvexPotential,
    batch_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` database items with the smallest ``D(query, item)`` for every query.

    ``grad phi`` is computed once on the database; queries are processed in chunks of
    ``batch_size`` so the full matrix is never materialised. Runs without autograd.

    Parameters
    ----------
    query : torch.Tensor
        Query embeddings, shape ``(n, D)``.
    database : torch.Tensor
        Database embeddings, shape ``(m, D)``.
    k : int
        Number of neighbours, ``1 <= k <= m``.
    divergence : BregmanDivergence or ConvexPotential
        The divergence.
    batch_size : int, default=1024
        Queries per chunk.

    Returns
    -------
    distances : torch.Tensor
        ``(n, k)`` divergences, ascending.
    indices : torch.Tensor
        ``(n, k)`` database indices.
    """
    divergence = as_divergence(divergence)
    check_points(query, divergence.dim)
    check_points(database, divergence.dim)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(database):
        raise ValueError(f"k must be an int in [1, {len(database)}] (database size), got {k!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    with torch.no_grad():
        grad = divergence.potential.gradient(database)
        dists, idx = [], []
        for start in range(0, len(query), batch_size):
            mat = divergence.pairwise(query[start : start + batch_size], database, grad_y=grad)
            d, i = torch.topk(mat, k, dim=1, largest=False)
            dists.append(d)
            idx.append(i)
    if not dists:
        empty = query.new_zeros(0, k)
        return empty, empty.long()
    return torch.cat(dists), torch.cat(idx)


class BregmanKNN:
    """kNN under a Bregman divergence with the ``knn_func`` interface of pml's
    ``AccuracyCalculator`` (like ``pytorch_metric_learning.utils.inference.CustomKNN``).

    Example: ``AccuracyCalculator(include=("precision_at_1",), knn_func=BregmanKNN(div))``.

    Parameters
    ----------
    divergence : BregmanDivergence or ConvexPotential
        The divergence.
    normalize_embeddings : bool, default=False
        L2-normalise query and reference first (use when the embeddings passed to the
        calculator are raw encoder outputs and the divergence was trained on normalised ones).
    batch_size : int, default=1024
        Queries per chunk.
    """

    def __init__(
        self,
        divergence: BregmanDivergence | ConvexPotential,
        normalize_embeddings: bool = False,
        batch_size: int = 1024,
    ) -> None:
        self.divergence = as_divergence(divergence)
        self.normalize_embeddings = bool(normalize_embeddings)
        self.batch_size = int(batch_size)

    def __call__(
        self,
        query: torch.Tensor,
        k: int,
        reference: torch.Tensor,
        ref_includes_query: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distances, indices)`` of the ``k`` nearest references of every query.

        With ``ref_includes_query``, the first ``len(query)`` references are the queries
        themselves; each query's own index is removed from its neighbours (pml's semantics).
        """
        # pml's AccuracyCalculator casts embeddings to float32: match the potential instead.
        device = query.device
        like = next(chain(self.divergence.parameters(), self.divergence.buffers()), None)
        if like is not None:
            query = query.to(device=like.device, dtype=like.dtype)
            reference = reference.to(device=like.device, dtype=like.dtype)
        if self.normalize_embeddings:
            query = torch.nn.functional.normalize(query, dim=1)
            reference = torch.nn.functional.normalize(reference, dim=1)
        k_search = min(k + 1, len(reference)) if ref_includes_query else k
        dists, idx = bregman_knn(query, reference, k_search, self.divergence, self.batch_size)
        dists, idx = dists.to(device), idx.to(device)
        if not ref_includes_query:
            return dists, idx
        is_self = idx == torch.arange(len(query), device=idx.device)[:, None]
        # Rows without their own index drop their farthest neighbour instead.
        no_self = ~is_self.any(1)
        is_self[no_self, -1] = True
        keep = ~is_self
        n_keep = k_search - 1
        return dists[keep].view(len(query), n_keep), idx[keep].view(len(query), n_keep)
