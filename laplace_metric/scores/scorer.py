"""The entry point :class:`UncertaintyScorer`: one fixed set of weight samples, any scores."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from laplace_metric.enums import DatabaseEmbedding, parse_enum
from laplace_metric.predictive import PosteriorEmbedder, knn_and_top1
from laplace_metric.progress import progress as show_progress
from laplace_metric.scores.base import SCORES, PosteriorScore, ProductScore, multiply, parse_score
from laplace_metric.scores.candidates import CandidateDatabase
from laplace_metric.scores.support import (
    PosteriorRetrieval,
    QueryCache,
    check_database_fits,
    check_tensor,
    in_eval_mode,
)


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
    progress_bar : bool, optional
        A tqdm bar over the weight samples; ``None`` (default) shows it when standard error
        is a terminal and the work has run a few seconds (see :mod:`laplace_metric.progress`).
    database_embedding : {'per_sample', 'candidates'}, default='per_sample'
        Embed the whole database under every weight sample, or only each query's
        ``n_candidates`` nearest items at the posterior mean (for large galleries under
        all-layer posteriors); see :class:`~laplace_metric.DatabaseEmbedding`.
    n_candidates : int, default=64
        Candidates per query with ``database_embedding='candidates'`` (at least ``k``).

    Raises
    ------
    laplace_metric.memory.MemoryBudgetError
        When the database embedded under every weight sample (``n_samples x m x D``) does not
        fit ``la.memory_budget``; the message names what fits.

    Notes
    -----
    Scores never depend on the encoder's train/eval mode: every call runs it in eval mode and
    restores each submodule's mode and buffers (BatchNorm statistics) afterwards.

    The embeddings of the last query tensor are cached (at the posterior mean and under the
    weight samples), so ``scorer(x)`` followed by ``scorer(x, "sampled_std")`` or
    :meth:`embeddings` runs the encoder once; an in-place change of ``x`` or a new posterior
    (fit, prior precision) drops the cache. :meth:`scores` computes several scores in one go.

    Examples
    --------
    >>> scorer = UncertaintyScorer(la, database=x_train)            # doctest: +SKIP
    >>> ood_score = scorer(x_test)                                  # doctest: +SKIP
    >>> both = scorer.scores(x_test, ["posterior_knn", "sampled_std"])  # doctest: +SKIP
    >>> z_test = scorer.embeddings(x_test)  # posterior-mean embeddings, e.g. for recall@k
    ...                                                             # doctest: +SKIP
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
        progress_bar: bool | None = None,
        database_embedding: DatabaseEmbedding | str = DatabaseEmbedding.PER_SAMPLE,
        n_candidates: int = 64,
    ) -> None:
        la._check_fitted()
        if n_samples < 2:
            raise ValueError(f"n_samples must be at least 2, got {n_samples}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.la = la
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.database = None if database is None else check_tensor(database, "database", la)
        if database is not None and not 1 <= k <= len(self.database):
            raise ValueError(f"k must be in [1, {len(self.database)}], got {k}.")
        self.k = int(k)
        self.database_embedding = parse_enum(
            DatabaseEmbedding, database_embedding, "database_embedding"
        )
        if n_candidates < self.k:
            raise ValueError(f"n_candidates must be at least k = {self.k}, got {n_candidates}.")
        self.n_candidates = int(n_candidates)
        self._candidates: CandidateDatabase | None = None
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
        self.progress_bar = progress_bar
        self._cache_key: tuple | None = None
        self._db_samples: torch.Tensor | None = None  # (S, m, D)
        self._db_mean: torch.Tensor | None = None  # (m, D)
        self._query_mean: torch.Tensor | None = None  # (n, D) of the last queries
        self._query_cache: QueryCache | None = None
        self._moved: tuple[torch.Tensor, torch.Tensor, int] | None = None

    # ------------------------------------------------------------------ internals
    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device=self._generator_device)
        generator.set_state(self._generator_state)
        return generator

    def _key(self) -> tuple:
        la = self.la
        return (la.mean, la.H, la.prior_precision.detach().clone(), float(la._H_factor))

    def _key_matches(self, key: tuple | None) -> bool:
        """Whether ``key`` (from :meth:`_key`) still describes the estimator's posterior."""
        if key is None:
            return False
        mean, H, prior, factor = key
        la = self.la
        return (
            mean is la.mean
            and H is la.H
            and factor == float(la._H_factor)
            and torch.equal(prior, la.prior_precision.detach())
        )

    def _key_is_current(self) -> bool:
        return self._key_matches(self._cache_key)

    def _sample_embeddings(
        self, embedder: PosteriorEmbedder, features: torch.Tensor, what: str
    ) -> torch.Tensor:
        """Embeddings ``(S, n, D)`` of ``features`` under the scorer's fixed weight samples."""
        samples = embedder.samples(self.n_samples, self._generator())
        bar = show_progress(
            samples, total=self.n_samples, desc=f"Scoring ({what})", progress_bar=self.progress_bar
        )
        return torch.stack([embedder.embed(features, sample) for sample in bar])

    @torch.no_grad()
    def _refresh_database(self) -> None:
        """Embed the database at the mean and under every weight sample, once per posterior."""
        if self.database is None or self._key_is_current():
            return
        embedder = PosteriorEmbedder(self.la, self.batch_size)
        features = embedder.features(self.database)
        self._db_mean = embedder.embed(features)
        if self.database_embedding == DatabaseEmbedding.CANDIDATES:
            self._candidates = CandidateDatabase(
                features,
                self._db_mean,
                self.n_candidates,
                lambda rows: self._sample_embeddings(embedder, rows, "candidates"),
                self.n_samples,
                self.la.memory_budget,
            )
        else:
            check_database_fits(self._db_mean, self.n_samples, self.la.memory_budget)
            self._db_samples = self._sample_embeddings(embedder, features, "database")
        self._cache_key = self._key()

    @torch.no_grad()
    def _queries(self, x: torch.Tensor, samples: bool) -> QueryCache:
        """The (cached) embeddings of the checked queries ``x``: at the mean, and under the
        weight samples when ``samples``. The cache holds the last query tensor; an in-place
        change of it or a new posterior drops it."""
        cache = self._query_cache
        if not (
            cache is not None
            and cache.x is x
            and cache.version == x._version
            and self._key_matches(cache.key)
        ):
            embedder = PosteriorEmbedder(self.la, self.batch_size)
            features = embedder.features(x)
            cache = QueryCache(x, x._version, self._key(), features, embedder.embed(features))
            self._query_cache = cache
        if samples and cache.sampled is None:
            embedder = PosteriorEmbedder(self.la, self.batch_size)
            cache.sampled = self._sample_embeddings(embedder, cache.features, "queries")
        self._query_mean = cache.mean
        return cache

    def _sampled(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Query embeddings ``(S, n, D)`` under the weight samples (refreshing the database
        cache); the queries' embeddings at the posterior mean are kept in ``_query_mean``.

        A last-layer posterior runs the backbone once per input and samples only the head.
        """
        self._refresh_database()
        return None if x is None else self._queries(x, samples=True).sampled

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked and on the estimator's device; the same tensor object for the same
        input, so that the query cache recognises it."""
        checked = check_tensor(x, "x", self.la)
        if checked is not x:
            if self._moved is not None and self._moved[0] is x and self._moved[2] == x._version:
                return self._moved[1]
            self._moved = (x, checked, x._version)
        return checked

    def _knn_top1(self, z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k``-th neighbour distance and top-1 label per sample, ``(S, n)`` each, of the
        sampled queries ``z_q`` among the database under the same samples (the candidates
        or the whole sampled database), with the distance matrices in query chunks that fit
        ``la.memory_budget``."""
        if self._candidates is not None:
            return self._candidates.knn_top1(z_q, self._query_mean, self.k, self.database_labels)
        knn, top1 = [], []
        for q, db in zip(z_q, self._db_samples):
            d, t = knn_and_top1(q, db, self.k, self.database_labels, self.la.memory_budget)
            knn.append(d)
            top1.append(t)
        return torch.stack(knn), (torch.stack(top1) if top1[0] is not None else None)

    # ------------------------------------------------------------------ public
    @in_eval_mode
    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior-mean embeddings ``(n, D)`` of ``x`` (normalised when the likelihood
        normalises), e.g. for recall@k or MAP@R; cached with the scores of ``x``.

        Parameters
        ----------
        x : torch.Tensor
            Inputs ``(n, ...)``.

        Returns
        -------
        embeddings : torch.Tensor
        """
        return self._queries(self._check(x), samples=False).mean

    @in_eval_mode
    def sampled_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(n_samples, n, D)`` of ``x`` under the scorer's fixed weight samples
        (cached with the scores of ``x``).

        Parameters
        ----------
        x : torch.Tensor
            Inputs ``(n, ...)``.

        Returns
        -------
        samples : torch.Tensor
        """
        return self._queries(self._check(x), samples=True).sampled

    @property
    @in_eval_mode
    def database_embeddings(self) -> torch.Tensor:
        """Posterior-mean embeddings ``(m, D)`` of the database (computed once per posterior)."""
        if self.database is None:
            raise ValueError("No database: UncertaintyScorer(la, database=x_train).")
        self._refresh_database()
        return self._db_mean

    @property
    def sampled_database_items(self) -> int:
        """Database items whose embeddings under the weight samples are held now: all of them
        (``database_embedding='per_sample'``, once a score needed them), or the cached
        candidates (``'candidates'``); 0 before the first score."""
        if self._candidates is not None:
            return self._candidates.stored_items
        return 0 if self._db_samples is None else self._db_samples.shape[1]

    @in_eval_mode
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
        x = self._check(x)
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
        values: dict[str, torch.Tensor] = {}

        def value(name: str) -> torch.Tensor:  # each score once, products from their factors
            if name not in values:
                score = chosen.get(name) or SCORES[name]()
                values[name] = (
                    multiply([value(f) for f in score.factors])
                    if isinstance(score, ProductScore)
                    else score(self, x, sampled)
                )
            return values[name]

        return {name: value(name) for name in chosen}

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

    @in_eval_mode
    def retrieval(self, x: torch.Tensor) -> PosteriorRetrieval:
        """Posterior kNN distance, top-1 retrieval confidence and the top-1 label at the mean.

        Needs ``database`` (and ``database_labels`` for ``confidence`` and ``predicted``, else
        they are empty).
        """
        if self.database is None:
            raise ValueError("retrieval needs a database: UncertaintyScorer(la, database=...).")
        sampled = self._sampled(self._check(x))
        knn_all, top1 = self._knn_top1(sampled)
        knn = knn_all.mean(0)
        empty = torch.empty(0, device=self.la._device)
        if self.database_labels is None:
            return PosteriorRetrieval(knn, empty, empty)
        budget = self.la.memory_budget
        _, predicted = knn_and_top1(
            self._query_mean, self._db_mean, 1, self.database_labels, budget
        )
        confidence = (top1 == predicted).to(knn.dtype).mean(0)
        return PosteriorRetrieval(knn, confidence, predicted)


__all__ = ["PosteriorRetrieval", "UncertaintyScorer"]
