"""The database under the weight samples, embedded only where queries look: each query's
``n_candidates`` nearest items at the posterior mean (``database_embedding='candidates'``).

The default score re-embeds the whole database under every weight sample: ``n_samples``
forward passes and embeddings per item, prohibitive for a gallery of ``10^5-10^6`` under an
all-layer posterior. A query's nearest item under a weight sample is almost always among its
nearest items at the posterior mean, so re-embedding those candidates gives the same distance
at a fraction of the cost; it is exact whenever every sample's nearest item is a candidate, and
an upper bound otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from laplace_metric.memory import check_fits, chunk_size
from laplace_metric.predictive.samples import nearest


class CandidateDatabase:
    """Database embeddings under the weight samples, computed for candidate rows on demand.

    Parameters
    ----------
    features : torch.Tensor
        The database's inputs to the sampled part of the model ``(m, ...)``
        (:meth:`~laplace_metric.predictive.PosteriorEmbedder.features`).
    mean : torch.Tensor
        The database embedded at the posterior mean ``(m, D)``.
    n_candidates : int
        Candidates per query (at most ``m``).
    embed_under_samples : callable
        ``features[rows] -> (S, len(rows), D)``, the embeddings under the scorer's samples.
    n_samples : int
    budget : int
        Bytes the embedded candidates and the distance chunks may take.
    """

    def __init__(
        self,
        features: torch.Tensor,
        mean: torch.Tensor,
        n_candidates: int,
        embed_under_samples: Callable[[torch.Tensor], torch.Tensor],
        n_samples: int,
        budget: int,
    ) -> None:
        self.features, self.mean = features, mean
        self.n_candidates = min(int(n_candidates), len(mean))
        self.embed_under_samples = embed_under_samples
        self.n_samples, self.budget = n_samples, budget
        self.rows = torch.empty(0, dtype=torch.long, device=mean.device)  # sorted
        self.embedded = mean.new_empty(n_samples, 0, mean.shape[1])  # (S, len(rows), D)

    def candidates(self, query_mean: torch.Tensor) -> torch.Tensor:
        """Each query's ``n_candidates`` nearest database rows at the mean, nearest first."""
        return nearest(query_mean, self.mean, self.n_candidates, self.budget)[1]

    @property
    def stored_items(self) -> int:
        """Database items whose embeddings under the weight samples are cached."""
        return len(self.rows)

    def _embed_missing(self, needed: torch.Tensor) -> None:
        """Embed the ``needed`` rows not embedded yet; a store over budget keeps only these."""
        missing = needed[~torch.isin(needed, self.rows)]
        if len(missing) == 0:
            return
        row_bytes = self.n_samples * self.mean.shape[1] * self.mean.element_size()
        check_fits(
            len(needed) * row_bytes,
            self.budget,
            f"the {len(needed):,} candidate database items of these queries under "
            f"{self.n_samples} weight samples",
            ["fewer queries per call", "a smaller n_candidates", "fewer n_samples"],
        )
        if (len(self.rows) + len(missing)) * row_bytes > self.budget:  # start afresh
            self.rows, self.embedded = self.rows[:0], self.embedded[:, :0]
            missing = needed
        rows = torch.cat([self.rows, missing])
        embedded = torch.cat([self.embedded, self.embed_under_samples(self.features[missing])], 1)
        order = rows.argsort()
        self.rows, self.embedded = rows[order], embedded[:, order]

    def knn_top1(
        self,
        sampled: torch.Tensor,
        query_mean: torch.Tensor,
        k: int,
        labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k``-th neighbour distance and top-1 label ``(S, n)`` of the sampled queries
        ``(S, n, D)`` among their candidates under the same samples."""
        candidates = self.candidates(query_mean)  # (n, C)
        self._embed_missing(candidates.unique())
        position = torch.searchsorted(self.rows, candidates)  # (n, C) into the store
        per_query = 3 * self.n_samples * self.n_candidates * self.mean.shape[1]
        size = chunk_size(len(candidates), per_query * self.mean.element_size(), self.budget)
        knn, top1 = [], []
        for start in range(0, len(candidates), size):
            pos = position[start : start + size]
            db = self.embedded[:, pos]  # (S, chunk, C, D)
            dist = (sampled[:, start : start + size, None] - db).norm(dim=-1)  # (S, chunk, C)
            knn.append(dist.topk(k, largest=False).values[..., -1])
            if labels is not None:
                closest = dist.argmin(-1)  # (S, chunk)
                rows = candidates[start : start + size].gather(1, closest.T).T
                top1.append(labels[rows])
        return torch.cat(knn, 1), (torch.cat(top1, 1) if labels is not None else None)


__all__ = ["CandidateDatabase"]
