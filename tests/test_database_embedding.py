"""``UncertaintyScorer(database_embedding=...)``: the whole database under every weight sample,
or only each query's nearest items at the mean ('candidates'), brute-force checked, and the
memory plan of the per-sample database."""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace

from laplace_metric import (
    DatabaseEmbedding,
    MemoryBudgetError,
    UncertaintyScorer,
    posterior_retrieval,
)
from tests.conftest import labelled_data, loader, make_mlp
from tests.test_scores import brute_force_embeddings


def _fitted(device, structure="diag", subset="all"):
    x, y = labelled_data(40, (5,), n_classes=3)
    x, y = x.to(device), y.to(device)
    la = Laplace(make_mlp().to(device), "contrastive", subset, structure)
    la.fit(loader(x, y, 20))
    return la, x, y


def _per_sample_knn_top1(la, queries, database, labels, n_samples, k=1):
    """Brute force: the whole database under every weight sample."""
    z_q = brute_force_embeddings(la, queries, n_samples)
    z_db = brute_force_embeddings(la, database, n_samples)
    dist = torch.cdist(z_q, z_db)
    return dist.topk(k, largest=False).values[..., -1], labels[dist.argmin(-1)]


@pytest.mark.parametrize("subset,structure", [("all", "diag"), ("last_layer", "kron")])
def test_candidates_covering_the_database_are_exact(device, subset, structure):
    la, x, y = _fitted(device, structure, subset)
    queries, database, labels = x[:7], x[7:], y[7:]
    scorer = UncertaintyScorer(
        la,
        database,
        labels,
        n_samples=6,
        k=2,
        database_embedding="candidates",
        n_candidates=len(database),
    )
    knn, top1 = _per_sample_knn_top1(la, queries, database, labels, 6, k=2)
    torch.testing.assert_close(scorer(queries), knn.mean(0))
    result = scorer.retrieval(queries)
    predicted = labels[
        torch.cdist(scorer.embeddings(queries), scorer.database_embeddings).argmin(1)
    ]
    torch.testing.assert_close(result.predicted, predicted)
    torch.testing.assert_close(result.confidence, (top1 == predicted).to(knn.dtype).mean(0))


def test_few_candidates_bound_the_distance_and_match_the_brute_force_restriction(device):
    la, x, y = _fitted(device)
    queries, database, labels = x[:9], x[9:], y[9:]
    scorer = UncertaintyScorer(
        la, database, labels, n_samples=5, database_embedding="candidates", n_candidates=4
    )
    z_q = brute_force_embeddings(la, queries, 5)
    z_db = brute_force_embeddings(la, database, 5)
    with torch.no_grad():
        mean_q = torch.nn.functional.normalize(la.model(queries), dim=-1)
        mean_db = torch.nn.functional.normalize(la.model(database), dim=-1)
    candidates = torch.cdist(mean_q, mean_db).topk(4, largest=False).indices  # (n, 4)
    restricted = torch.stack(
        [torch.cdist(z_q[:, i : i + 1], z_db[:, candidates[i]]).amin((-1, -2)) for i in range(9)],
        1,
    )  # (S, n): each query's nearest candidate under each sample
    score = scorer(queries)
    torch.testing.assert_close(score, restricted.mean(0))
    exact = torch.cdist(z_q, z_db).amin(-1).mean(0)
    assert (score >= exact - 1e-12).all()  # an upper bound of the per-sample score


def test_candidates_embed_only_what_queries_need_and_are_reused(device):
    la, x, y = _fitted(device)
    database = x[5:]
    scorer = UncertaintyScorer(
        la, database, n_samples=3, database_embedding="candidates", n_candidates=2
    )
    calls = []
    handle = la.model.register_forward_pre_hook(lambda mod, args: calls.append(len(args[0])))
    try:
        assert scorer.sampled_database_items == 0
        first = scorer(x[:2])
        store = scorer.sampled_database_items
        assert 2 <= store <= 4  # two candidates per query, nothing else
        assert calls.count(len(database)) == 1  # the database at the mean, once
        assert sum(calls) == len(database) + 3 * store + 3 * 2 + 2  # + queries (mean + samples)
        calls.clear()
        torch.testing.assert_close(scorer(x[:2].clone()), first)
        assert sum(calls) == 3 * 2 + 2  # candidates reused: only the new query tensor runs
    finally:
        handle.remove()


def test_one_shot_retrieval_takes_the_option():
    la, x, y = _fitted("cpu")
    gen = torch.Generator().manual_seed(2)
    one_shot = posterior_retrieval(
        la,
        x[:6],
        x[6:],
        y[6:],
        n_samples=4,
        generator=gen,
        database_embedding="candidates",
        n_candidates=3,
    )
    scorer = UncertaintyScorer(
        la,
        x[6:],
        y[6:],
        n_samples=4,
        generator=torch.Generator().manual_seed(2),
        database_embedding=DatabaseEmbedding.CANDIDATES,
        n_candidates=3,
    )
    expected = scorer.retrieval(x[:6])
    torch.testing.assert_close(one_shot.knn_distance, expected.knn_distance)
    torch.testing.assert_close(one_shot.confidence, expected.confidence)


def test_unknown_option_and_too_few_candidates_are_named():
    la, x, _ = _fitted("cpu")
    with pytest.raises(ValueError, match="database_embedding"):
        UncertaintyScorer(la, x, database_embedding="median")
    with pytest.raises(ValueError, match="n_candidates must be at least k = 3"):
        UncertaintyScorer(la, x, k=3, database_embedding="candidates", n_candidates=2)


def test_per_sample_database_over_the_budget_is_a_named_error():
    la, x, _ = _fitted("cpu")
    database = x[7:]
    one_embedding = len(database) * 3 * 8  # (m, D) in float64
    saved = la.memory_budget
    la.memory_budget = 4 * one_embedding  # the distances of a few queries fit, 10 samples do not
    try:
        scorer = UncertaintyScorer(la, database, n_samples=10)
        with pytest.raises(
            MemoryBudgetError, match=r"database_embedding='candidates'.*n_samples=4"
        ):
            scorer(x[:2])
        # two queries' three candidates under 10 samples fit
        cheap = UncertaintyScorer(
            la, database, n_samples=10, database_embedding="candidates", n_candidates=3
        )
        assert torch.isfinite(cheap(x[:2])).all()
    finally:
        la.memory_budget = saved


def test_sampled_database_items_of_the_per_sample_database(device):
    la, x, _ = _fitted(device)
    scorer = UncertaintyScorer(la, x[5:], n_samples=3)
    assert scorer.sampled_database_items == 0
    scorer(x[:2])
    assert scorer.sampled_database_items == len(x) - 5
