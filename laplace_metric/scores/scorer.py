"""The entry point :class:`UncertaintyScorer`: one fixed set of weight samples, any scores."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from laplace_metric.predictive import PosteriorEmbedder, knn_and_top1
from laplace_metric.scores.base import SCORES, PosteriorScore, parse_score


@dataclass
class PosteriorRetrieval:
    """Per-query results of :func:`posterior_retrieval` / :meth:`UncertaintyScorer.retrieval`.

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


def _check_tensor(x: Any, name: str, la) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty batch (n, ...), got shape {tuple(x.shape)}.")
    param = next(la.model.parameters())
    if x.is_floating_point() and x.dtype != param.dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the model's parameters have dtype {param.dtype}; "
            f"cast one of them, e.g. {name}.to({param.dtype})."
        )
    return x.to(la._device)


class UncertaintyScorer:
    """Uncertainty scores of a fitted laplace-metric estimator, from one set of weight samples.

    Parameters
    ----------
    la : MetricLaplaceMixin
        A fitted laplace-metric estimator.
    database : torch.Tensor, optional
        Database inputs ``(m, ...)``, e.g. the training inputs; needed for ``'posterior_knn'``
        and :meth:`retrieval`. Embedded once per weight sample and cached.
    database_labels : torch.Tensor, optional
        Labels ``(m,)``; needed for the confidence of :meth:`retrieval`.
    k : int, default=1
        Neighbour whose distance ``'posterior_knn'`` reports.
    n_samples : int, default=30
        Weight samples (the same ones for every query and every score).
    generator : torch.Generator, optional
        Draws the weight samples; its state at construction is replayed on every call, so
        every query sees the same samples. Default: a generator seeded with 0.
    batch_size : int, default=1024
        Inputs per forward pass.

    Examples
    --------
    >>> scorer = UncertaintyScorer(la, database=x_train)            # doctest: +SKIP
    >>> ood_score = scorer(x_test)                                  # doctest: +SKIP
    >>> both = scorer.scores(x_test, ["posterior_knn", "sampled_std"])  # doctest: +SKIP
    """

    def __init__(
        self,
        la,
        database: torch.Tensor | None = None,
        database_labels: torch.Tensor | None = None,
        *,
        k: int = 1,
        n_samples: int = 30,
        generator: torch.Generator | None = None,
        batch_size: int = 1024,
    ) -> None:
        la._check_fitted()
        if n_samples < 2:
            raise ValueError(f"n_samples must be at least 2, got {n_samples}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.la = la
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.database = None if database is None else _check_tensor(database, "database", la)
        if database is not None and not 1 <= k <= len(self.database):
            raise ValueError(f"k must be in [1, {len(self.database)}], got {k}.")
        self.k = int(k)
        self.database_labels = None
        if database_labels is not None:
            if self.database is None:
                raise ValueError("database_labels needs a database.")
            if database_labels.shape != (len(self.database),):
                raise ValueError(
                    f"database_labels must have shape ({len(self.database)},), got "
                    f"{tuple(database_labels.shape)}."
                )
            self.database_labels = database_labels.to(la._device)
        if generator is None:
            generator = torch.Generator(device=la._device).manual_seed(0)
        elif not isinstance(generator, torch.Generator) or generator.device != la._device:
            raise ValueError("Invalid random generator (check type and device).")
        self._generator_device = generator.device
        self._generator_state = generator.get_state()
        self._cache_key: tuple | None = None
        self._db_samples: torch.Tensor | None = None  # (S, m, D)
        self._db_mean: torch.Tensor | None = None  # (m, D)
        self._query_mean: torch.Tensor | None = None  # (n, D) of the last queries

    # ------------------------------------------------------------------ internals
    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device=self._generator_device)
        generator.set_state(self._generator_state)
        return generator

    def _key(self) -> tuple:
        la = self.la
        return (la.mean, la.H, la.prior_precision.detach().clone(), float(la._H_factor))

    def _key_is_current(self) -> bool:
        if self._cache_key is None:
            return False
        mean, H, prior, factor = self._cache_key
        la = self.la
        return (
            mean is la.mean
            and H is la.H
            and factor == float(la._H_factor)
            and torch.equal(prior, la.prior_precision.detach())
        )

    @torch.no_grad()
    def _sampled(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Query embeddings ``(S, n, D)`` under the weight samples (refreshing the cache);
        the queries' embeddings at the posterior mean are kept in ``_query_mean``.

        A last-layer posterior runs the backbone once per input and samples only the head.
        """
        refresh = self.database is not None and not self._key_is_current()
        if x is None and not refresh:
            return None
        la = self.la
        embedder = PosteriorEmbedder(la, self.batch_size)
        f_x = None if x is None else embedder.features(x)
        self._query_mean = None if f_x is None else embedder.embed(f_x)
        f_db = embedder.features(self.database) if refresh else None
        queries, database = [], []
        training = la.model.training
        la.model.eval()
        try:
            for sample in embedder.samples(self.n_samples, self._generator()):
                if f_x is not None:
                    queries.append(embedder.embed(f_x, sample))
                if refresh:
                    database.append(embedder.embed(f_db, sample))
            if refresh:
                self._db_mean = embedder.embed(f_db)
        finally:
            la.model.train(training)
        if refresh:
            self._db_samples = torch.stack(database)
            self._cache_key = self._key()
        return torch.stack(queries) if x is not None else None

    def _knn_top1(
        self, z_q: torch.Tensor, z_db: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k``-th neighbour distance and top-1 label per sample, ``(S, n)`` each, with the
        distance matrices in query chunks that fit ``la.memory_budget``."""
        knn, top1 = [], []
        for q, db in zip(z_q, z_db):
            d, t = knn_and_top1(q, db, self.k, self.database_labels, self.la.memory_budget)
            knn.append(d)
            top1.append(t)
        return torch.stack(knn), (torch.stack(top1) if top1[0] is not None else None)

    # ------------------------------------------------------------------ public
    def scores(
        self, x: torch.Tensor, scores: Iterable[PosteriorScore | str] = tuple(PosteriorScore)
    ) -> dict[str, torch.Tensor]:
        """Several scores of ``x`` from one pass of the weight samples.

        Parameters
        ----------
        x : torch.Tensor
            Queries ``(n, ...)``.
        scores : iterable of PosteriorScore or str, default=all of them
            Names of registered scores (:data:`~laplace_metric.scores.base.SCORES`);
            ``'posterior_knn'`` needs a database; see :class:`PosteriorScore`.

        Returns
        -------
        scores : dict of str to torch.Tensor
            Score name -> ``(n,)`` scores, higher = less certain.
        """
        chosen = {name: SCORES[name]() for name in map(parse_score, scores)}
        x = _check_tensor(x, "x", self.la)
        if self.database is None:
            for name, score in chosen.items():
                if score.needs_database:
                    others = " or ".join(repr(n) for n, c in SCORES.items() if not c.needs_database)
                    raise ValueError(
                        f"score={name!r} needs a database: UncertaintyScorer(la, database=x_train)"
                        f", or choose score={others}, which need none."
                    )
        needs_samples = any(score.needs_samples for score in chosen.values())
        sampled = self._sampled(x) if needs_samples else None
        return {name: score(self, x, sampled) for name, score in chosen.items()}

    def __call__(
        self, x: torch.Tensor, score: PosteriorScore | str = PosteriorScore.POSTERIOR_KNN
    ) -> torch.Tensor:
        """One score per query, ``(n,)``, higher = less certain (default: ``'posterior_knn'``).

        Parameters
        ----------
        x : torch.Tensor
            Queries ``(n, ...)``.
        score : PosteriorScore or str, default='posterior_knn'
            One of :class:`PosteriorScore`, or the name of another registered score.

        Returns
        -------
        scores : torch.Tensor
        """
        name = parse_score(score)
        return self.scores(x, [name])[name]

    def retrieval(self, x: torch.Tensor) -> PosteriorRetrieval:
        """Posterior kNN distance, top-1 retrieval confidence and the top-1 label at the mean.

        Needs ``database`` (and ``database_labels`` for ``confidence`` and ``predicted``, else
        they are empty).
        """
        if self.database is None:
            raise ValueError("retrieval needs a database: UncertaintyScorer(la, database=...).")
        x = _check_tensor(x, "x", self.la)
        sampled = self._sampled(x)
        knn_all, _ = self._knn_top1(sampled, self._db_samples)
        knn = knn_all.mean(0)
        empty = torch.empty(0, device=self.la._device)
        if self.database_labels is None:
            return PosteriorRetrieval(knn, empty, empty)
        budget = self.la.memory_budget
        _, predicted = knn_and_top1(
            self._query_mean, self._db_mean, 1, self.database_labels, budget
        )
        _, top1 = self._knn_top1(sampled, self._db_samples)  # (S, n)
        confidence = (top1 == predicted).to(knn.dtype).mean(0)
        return PosteriorRetrieval(knn, confidence, predicted)


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
    )
    return scorer.retrieval(x)


__all__ = ["PosteriorRetrieval", "UncertaintyScorer", "posterior_retrieval"]
