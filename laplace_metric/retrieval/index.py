"""A gallery index that returns the top-k matches with their posterior similarity moments.

The index keeps, once, what the closed-form moments of a last-layer diag or kron posterior
need (:class:`~laplace_metric.predictive.similarity_stats.RotatedDiagonal`): per gallery item
the rotated head features ``psi`` ``(G, N)``, the unit embedding ``z`` and its norm, and the
diagonal of its own covariance ``c`` ``(G, D)``. A search

1. finds ``n_candidates`` candidates per query by the MAP cosine (a torch matrix product in
   chunks, or a faiss index);
2. computes the second-order mean and first-order variance of the cosine of each candidate,
   cross-covariance included, and re-ranks the candidates by the mean;
3. with gallery labels, gives the probability that the top-1 match has the query's label
   (:mod:`~laplace_metric.retrieval.probability`).

Working memory is ``O(chunk x G)`` for the candidate search and ``O(chunk x n_candidates x
N)`` for the moments, never ``O(Q x G x samples)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from laplace_metric.memory import chunk_size, dtype_bytes, resolve_budget, split
from laplace_metric.predictive.similarity import (
    SimilarityMetric,
    gallery_items,
    pair_moments,
    similarity_provider,
)
from laplace_metric.predictive.similarity_stats import Items, Pairing, RotatedDiagonal
from laplace_metric.retrieval.probability import (
    fit_temperature,
    margin_variance,
    match_probability,
)

#: Candidates per query re-ranked by the posterior mean when not given.
DEFAULT_CANDIDATES = 64
_ITEM_KEYS = ("z", "n", "psi", "c")
_POSTERIOR_KEYS = ("W", "R", "Q2", "bias", "weight", "bias_mean")


class SearchResult(NamedTuple):
    """What :meth:`RetrievalIndex.search` returns, per query."""

    indices: torch.Tensor
    """``(Q, k)`` gallery indices, by decreasing posterior mean similarity."""
    mean: torch.Tensor
    """``(Q, k)`` posterior mean of the cosine similarity."""
    variance: torch.Tensor
    """``(Q, k)`` posterior variance of the cosine similarity."""
    match_probability: torch.Tensor | None
    """``(Q,)`` probability that the top-1 match has the query's label (labelled galleries)."""
    margin: torch.Tensor | None
    """``(Q, 2)`` mean and variance of the margin behind ``match_probability``."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "candidate_search='faiss' needs faiss: pip install 'laplace-metric[faiss]' "
            "(or faiss-cpu); the default 'torch' needs nothing."
        ) from None
    return faiss


class RetrievalIndex:
    """Top-k retrieval with closed-form posterior similarity moments (cosine).

    Build it with :meth:`from_laplace` from a fitted last-layer diag or kron estimator.

    Parameters
    ----------
    posterior : RotatedDiagonal
    gallery : Items
    labels : torch.Tensor, optional
        ``(G,)`` gallery labels (needed for the match probability).
    n_candidates : int, default=64
    candidate_search : {'torch', 'faiss'}, default='torch'
    faiss_factory : str, default='Flat'
        A ``faiss.index_factory`` string (inner product), e.g. ``'HNSW32'`` for ``G >= 1e6``;
        candidates are re-ranked exactly either way.
    faiss_params : str, optional
        Search parameters of the faiss index, set with ``faiss.ParameterSpace`` (e.g.
        ``'efSearch=128'`` for HNSW, ``'nprobe=32'`` for IVF): approximate indexes trade
        candidate recall for speed.
    memory_budget : int or str, optional
        Bytes one search chunk may allocate (``None``: half the free memory).
    """

    def __init__(
        self,
        posterior: RotatedDiagonal,
        gallery: Items,
        labels: torch.Tensor | None = None,
        n_candidates: int = DEFAULT_CANDIDATES,
        candidate_search: str = "torch",
        faiss_factory: str = "Flat",
        memory_budget: int | str | None = None,
        faiss_params: str | None = None,
    ) -> None:
        if candidate_search not in ("torch", "faiss"):
            raise ValueError(
                f"candidate_search must be 'torch' or 'faiss', got {candidate_search!r}."
            )
        if labels is not None and len(labels) != len(gallery.n):
            raise ValueError(f"{len(labels)} labels for a gallery of {len(gallery.n)} items.")
        self.posterior, self.gallery, self.labels = posterior, gallery, labels
        self.n_candidates = int(n_candidates)
        self.candidate_search, self.faiss_factory = candidate_search, faiss_factory
        self.faiss_params = faiss_params
        self.memory_budget = memory_budget
        self.tau, self.kappa = 1.0, 0.0
        self.la = None
        self._faiss_index = None
        if candidate_search == "faiss":
            self._build_faiss()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_laplace(
        cls, la: Any, x_gallery: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> RetrievalIndex:
        """Index ``x_gallery`` under the posterior of ``la`` (runs the backbone once)."""
        la._check_fitted()
        provider = similarity_provider(la)
        if not isinstance(provider, RotatedDiagonal):
            raise NotImplementedError(
                "RetrievalIndex supports last-layer diag and kron posteriors over an nn.Linear "
                "head; use la.predictive_similarity for other posteriors."
            )
        kwargs.setdefault("memory_budget", la._memory_budget)
        with torch.no_grad():
            gallery = gallery_items(provider, la, x_gallery.to(la._device))
        index = cls(provider, gallery, labels, **kwargs)
        index.la = la
        return index

    def _build_faiss(self) -> None:
        faiss = _faiss()
        z = self.gallery.z.detach().cpu().float().numpy()
        index = faiss.index_factory(z.shape[1], self.faiss_factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(z)
        index.add(z)
        if self.faiss_params:
            try:
                faiss.ParameterSpace().set_index_parameters(index, self.faiss_params)
            except RuntimeError as err:
                raise ValueError(
                    f"faiss_params={self.faiss_params!r} do not apply to the faiss index "
                    f"{self.faiss_factory!r} ({err}); e.g. 'efSearch=128' for HNSW."
                ) from None
        self._faiss_index = index

    # ------------------------------------------------------------------ search
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Head inputs of ``x`` through the attached estimator's backbone."""
        if self.la is None:
            raise ValueError(
                "No estimator attached: pass la= to RetrievalIndex.load, or use "
                "search_features with precomputed head features."
            )
        with torch.no_grad():
            return torch.cat(
                [
                    self.la.model.forward_with_features(c)[1]
                    for c in split(x.to(self.la._device), 256)
                ]
            )

    def search(self, x_query: torch.Tensor, k: int = 10) -> SearchResult:
        """Top-``k`` matches of ``x_query`` with their posterior similarity moments."""
        return self.search_features(self.features(x_query), k)

    def _candidates(self, z: torch.Tensor, n: int) -> torch.Tensor:
        if self._faiss_index is not None:
            _, idx = self._faiss_index.search(z.detach().cpu().float().numpy(), n)
            return torch.as_tensor(idx, device=z.device)
        return (z @ self.gallery.z.T).topk(n, dim=1).indices

    def _chunk(self, n_queries: int, n: int) -> int:
        G = len(self.gallery.n)
        W = self.posterior.W
        D, N = W.shape
        per_query = (2 * G + n * (N + 4 * D) + D * N + 16 * n) * dtype_bytes(W.dtype)
        return chunk_size(n_queries, per_query, resolve_budget(self.memory_budget))

    def search_features(self, features: torch.Tensor, k: int = 10) -> SearchResult:
        """:meth:`search` from head features ``(Q, N)``."""
        G = len(self.gallery.n)
        if not 1 <= k <= G:
            raise ValueError(f"k must be between 1 and the gallery size {G}, got {k}.")
        n = min(G, max(self.n_candidates, k, 2))
        parts = [
            self._search_chunk(c, k, n) for c in split(features, self._chunk(len(features), n))
        ]
        merged = [torch.cat(p) if p[0] is not None else None for p in zip(*parts)]
        return SearchResult(*merged)

    def _search_chunk(self, features: torch.Tensor, k: int, n: int):
        post = self.posterior
        q = post.items(features.to(post.W.dtype))
        cand = self._candidates(q.z, n)
        mean, var = pair_moments(
            post, q, self.gallery.take(cand), Pairing(True), SimilarityMetric.COSINE, True
        )
        order = mean.argsort(dim=1, descending=True)
        cand, mean, var = cand.gather(1, order), mean.gather(1, order), var.gather(1, order)
        if self.labels is None:
            return cand[:, :k], mean[:, :k], var[:, :k], None, None
        labels = self.labels.to(cand.device)[cand]
        other = labels != labels[:, :1]
        # the best candidate with another label; the last candidate when all share one
        rival = torch.where(other.any(1), other.int().argmax(1), torch.full_like(cand[:, 0], n - 1))
        rows = torch.arange(len(cand), device=cand.device)
        m = mean[:, 0] - mean[rows, rival]
        v = margin_variance(
            post, q, self.gallery.take(cand[:, 0]), self.gallery.take(cand[rows, rival])
        )
        p = match_probability(m, v, self.tau, self.kappa)
        return cand[:, :k], mean[:, :k], var[:, :k], p, torch.stack([m, v], 1)

    def calibrate(
        self, x_val: torch.Tensor, y_val: torch.Tensor, features: bool = False
    ) -> tuple[float, float]:
        """Fit ``(tau, kappa)`` of the match probability on labelled validation queries
        (``features=True``: ``x_val`` are head features)."""
        if self.labels is None:
            raise ValueError("calibrate needs a labelled gallery (labels= when building).")
        result = self.search_features(x_val if features else self.features(x_val), k=1)
        correct = self.labels.to(result.indices.device)[result.indices[:, 0]] == y_val.to(
            result.indices.device
        )
        self.tau, self.kappa = fit_temperature(result.margin[:, 0], result.margin[:, 1], correct)
        return self.tau, self.kappa

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Save tensors and a plain config (loadable with ``torch.load(weights_only=True)``)."""
        state = {
            "posterior": self.posterior.state(),
            "gallery": {key: getattr(self.gallery, key) for key in _ITEM_KEYS},
            "labels": self.labels,
            "config": {
                "n_candidates": self.n_candidates,
                "candidate_search": self.candidate_search,
                "faiss_factory": self.faiss_factory,
                "faiss_params": self.faiss_params,
                "tau": float(self.tau),
                "kappa": float(self.kappa),
                "format": 1,
            },
        }
        torch.save(state, path)

    @classmethod
    def load(
        cls, path: str | Path, la: Any = None, map_location: Any = None, **overrides: Any
    ) -> RetrievalIndex:
        """Load a saved index; attach ``la`` to :meth:`search` raw inputs (its head must be
        the one indexed). ``overrides`` replace saved options (e.g. ``candidate_search``)."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        config = dict(state["config"])
        tau, kappa = config.pop("tau"), config.pop("kappa")
        config.pop("format")
        config.update(overrides)
        posterior = RotatedDiagonal(*(state["posterior"][key] for key in _POSTERIOR_KEYS))
        index = cls(posterior, Items(**state["gallery"]), state["labels"], **config)
        index.tau, index.kappa, index.la = tau, kappa, la
        return index


__all__ = ["DEFAULT_CANDIDATES", "RetrievalIndex", "SearchResult"]
