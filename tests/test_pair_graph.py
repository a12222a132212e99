"""The pair-graph path against brute force: explicit per-pair GGNs (float64, 1e-10 relative).

Covers many classes per batch, a partly active hinge, a pytorch-metric-learning miner, every
backend, structure and ``hessian_method``, and the folds of :mod:`laplace_metric.curvature.folds`
on their own.
"""

from __future__ import annotations

import pytest
import torch
from laplace.utils import Kron
from pytorch_metric_learning import miners
from torch import nn

from laplace_metric.curvature import AsdlPairGGN, BackPackPairGGN, HookPairGGN, ReferencePairGGN
from laplace_metric.curvature.folds import (
    fold_diag,
    fold_gram,
    fold_input_factor,
    fold_linear,
    fold_output_factor,
)
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.mining import PairBudgetMiner
from laplace_metric.pairs import PairGraph
from tests.bruteforce import embedding_jacobian, rel_error

BACKENDS = [ReferencePairGGN, BackPackPairGGN, AsdlPairGGN, HookPairGGN]
METHODS = ["positives", "fixed", "full"]
TOL = 1e-10


def random_graph(n: int, seed: int, one_sided: bool = False, density: float = 0.6):
    gen = torch.Generator().manual_seed(seed)
    first, second = torch.triu_indices(n, n, 1)
    weights = torch.randint(-1, 2, (len(first),), generator=gen).double()
    weights = weights * (torch.rand(len(first), generator=gen) < density)
    return first, second, weights, PairGraph.from_pairs(first, second, weights, n, one_sided)


@pytest.mark.parametrize("one_sided", [False, True])
def test_folds_equal_explicit_pair_sums(one_sided):
    n, rank, out, fan_in = 9, 3, 4, 5
    first, second, weights, graph = random_graph(n, seed=1, one_sided=one_sided)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(rank, n, out, generator=gen, dtype=torch.float64)
    x = torch.randn(n, fan_in, generator=gen, dtype=torch.float64)
    grads = torch.einsum("rbo,bi->rboi", q, x)  # per-sample gradients of a Linear weight
    flat = grads.flatten(start_dim=2)
    expected = torch.zeros(out * fan_in, out * fan_in, dtype=torch.float64)
    for a, b, s in zip(first.tolist(), second.tolist(), weights.tolist()):
        v = -flat[:, b] if one_sided else flat[:, a] - flat[:, b]  # [R, P]
        expected += s * v.T @ v
    assert graph.n_pairs == int((weights != 0).sum())
    assert rel_error(fold_gram(flat, graph), expected) < TOL
    assert rel_error(fold_diag(grads, graph).flatten(), expected.diagonal()) < TOL
    weight, bias = fold_linear(q, x, graph)
    assert rel_error(weight.flatten(), expected.diagonal()) < TOL
    bias_expected = torch.zeros(out, dtype=torch.float64)
    for a, b, s in zip(first.tolist(), second.tolist(), weights.tolist()):
        v = -q[:, b] if one_sided else q[:, a] - q[:, b]
        bias_expected += s * v.square().sum(0)
    assert rel_error(bias, bias_expected) < TOL
    # Kronecker factors with T locations: B = sum s Q Q^T (Q = q_a + q_b), A = sum e e^T / T
    locations = 3
    q_t = torch.randn(rank, n, locations, out, generator=gen, dtype=torch.float64)
    x_t = torch.randn(n, locations, fan_in, generator=gen, dtype=torch.float64)
    b_exp = torch.zeros(out, out, dtype=torch.float64)
    a_exp = torch.zeros(fan_in, fan_in, dtype=torch.float64)
    for a, b, s in zip(first.tolist(), second.tolist(), weights.tolist()):
        if s == 0:
            continue
        big_q = q_t[:, b] if one_sided else q_t[:, a] + q_t[:, b]
        e = x_t[b] if one_sided else (x_t[a] - x_t[b]) / 2
        b_exp += s * torch.einsum("rto,rtp->op", big_q, big_q)
        a_exp += e.T @ e / locations
    assert rel_error(fold_output_factor(q_t, graph), b_exp) < TOL
    assert rel_error(fold_input_factor(x_t, graph), a_exp) < TOL


def test_graph_blocks_split_positive_pairs_by_class():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3])  # class 3 has one sample
    first, second = torch.triu_indices(7, 7, 1)
    weights = (labels[first] == labels[second]).double()
    singletons, _, components = PairGraph.from_pairs(first, second, weights, 7).blocks()
    assert singletons.tolist() == [6]
    assert sorted(c.tolist() for c in components) == [[0, 3], [1, 4], [2, 5]]


# ---------------------------------------------------------------------- brute force
def explicit_pairs_ggn(model, x, lik, pairs_first, pairs_second, signs):
    """``sum_m s_m [J_a; J_b]^T H [J_a; J_b]`` with the explicit 2D x 2D Hessian."""
    jac, _ = embedding_jacobian(model, x, normalize=True)
    dim = jac.shape[1]
    eye = torch.eye(dim, dtype=jac.dtype)
    if lik.hessian_method.value == "fixed":
        hess = torch.block_diag(torch.zeros(dim, dim, dtype=jac.dtype), eye)
    else:
        hess = torch.cat([torch.cat([eye, -eye], 1), torch.cat([-eye, eye], 1)], 0)
    ggn = torch.zeros(jac.shape[-1], jac.shape[-1], dtype=jac.dtype)
    for a, b, s in zip(pairs_first.tolist(), pairs_second.tolist(), signs.tolist()):
        stacked = torch.cat([jac[a], jac[b]], 0)
        ggn += s * stacked.T @ hess @ stacked
    return ggn


def cnn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 5),
    ).double()


def mlp() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 5))


CASES = {
    # many classes per batch: 7 classes over 16 samples, some with one sample
    "many_classes": dict(labels=torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 0, 1, 0, 4, 2])),
    # two classes, margin chosen so that the hinge is active for some negatives only
    "partial_hinge": dict(labels=torch.arange(14) % 2, margin="median"),
    # a pytorch-metric-learning miner
    "pml_miner": dict(labels=torch.arange(14) % 3, miner=True),
}


def case_data(name: str, model: nn.Module, shape: tuple[int, ...]):
    spec = CASES[name]
    labels = spec["labels"]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(len(labels), *shape, generator=gen, dtype=torch.float64)
    margin = 1.0
    if spec.get("margin") == "median":
        with torch.no_grad():
            z = nn.functional.normalize(model.double()(x), dim=-1)
        first, second = torch.triu_indices(len(labels), len(labels), 1)
        negative = labels[first] != labels[second]
        dist = (z[first] - z[second]).square().sum(-1)[negative]
        margin = float(dist.median())
    miner = miners.PairMarginMiner(pos_margin=0.0, neg_margin=1.5) if spec.get("miner") else None
    return x, labels, margin, miner


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_graph_path_matches_brute_force(backend, method, case, arch):
    model = (mlp() if arch == "mlp" else cnn()).double()
    shape = (6,) if arch == "mlp" else (1, 4, 4)
    x, labels, margin, miner = case_data(case, model, shape)
    lik = ContrastiveLikelihood(margin=margin, hessian_method=method, miner=miner)
    with torch.no_grad():
        z, pairs, _, signs = lik.pair_signs(model(x), labels)
    if case == "partial_hinge":
        negative = ~pairs.positive
        active = (signs[negative] != 0).float().mean()
        if method != "positives":
            assert 0.2 < float(active) < 0.8
    expected = explicit_pairs_ggn(model, x, lik, pairs.first, pairs.second, signs)
    curv = backend(model, lik)
    assert curv.use_pair_graph
    full = curv.full(x, labels)
    diag = curv.diag(x, labels)
    assert full.n_pairs == int((signs != 0).sum()) == diag.n_pairs
    assert rel_error(full.hessian, expected) < TOL
    assert rel_error(diag.hessian, expected.diagonal()) < TOL
    # Kronecker factors: the graph fold equals the per-pair factorisation
    per_pair = backend(model, lik)
    per_pair.use_pair_graph = False
    kron, kron_pairs = curv.kron(x, labels).hessian, per_pair.kron(x, labels).hessian
    assert isinstance(kron, Kron)
    for fa, fb in zip(kron.kfacs, kron_pairs.kfacs):
        for ta, tb in zip(fa, fb):
            assert rel_error(ta, tb) < TOL


def test_backpack_follows_the_memory_budget():
    """The estimator's ``memory_budget`` lowers ``max_column_elements`` (never raises it) like
    ``HookPairGGN.max_elements``: more passes, the same fit."""
    import laplace

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 4096), nn.Tanh(), nn.Linear(4096, 5)).double()
    x, labels = torch.randn(12, 6, dtype=torch.float64), torch.arange(12) % 3
    small = 2**16 * 8 * BackPackPairGGN.MEMORY_PER_ELEMENT_BOUND  # the smallest bound, 2**16
    fits, chunks = {}, {}
    for budget in ("100GB", small):
        la = laplace.Laplace(
            model, "contrastive", "all", "diag", backend=BackPackPairGGN, memory_budget=budget
        )
        la.fit([(x, labels)])
        terms = la.backend.likelihood.graph_terms(model(x), labels)
        fits[budget] = (la.H.clone(), la.backend.max_column_elements)
        chunks[budget] = len(la.backend._column_chunks(model, x, terms))
    (big, big_bound), (tight, tight_bound) = fits.values()
    assert big_bound == BackPackPairGGN.DEFAULT_MAX_COLUMN_ELEMENTS and tight_bound == 2**16
    assert chunks["100GB"] == 1 < chunks[small]
    assert rel_error(tight, big) < TOL
    backend = BackPackPairGGN(model, ContrastiveLikelihood())
    backend.max_column_elements = 100
    backend.memory_budget = 10**12
    assert backend.max_column_elements == 100  # a budget never raises the bound that was set


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_backpack_column_chunks_add_up(structure):
    model, labels = mlp().double(), torch.arange(12) % 3
    x = torch.randn(12, 6, dtype=torch.float64)
    lik = ContrastiveLikelihood(hessian_method="full")
    whole = getattr(BackPackPairGGN(model, lik), structure)(x, labels).hessian
    chunked = BackPackPairGGN(model, lik)
    chunked.max_column_elements = 12 * 8  # one column per pass
    assert len(chunked._column_chunks(model, x, lik.graph_terms(model(x), labels))) == 5
    parts = getattr(chunked, structure)(x, labels).hessian
    if structure == "kron":
        for fa, fb in zip(parts.kfacs, whole.kfacs):
            for ta, tb in zip(fa, fb):
                assert rel_error(ta, tb) < TOL
    else:
        assert rel_error(parts, whole) < TOL


def test_zero_weight_pairs_form_no_factors():
    """With ``positives`` the negatives never reach the per-pair factors."""
    lik = ContrastiveLikelihood(hessian_method="positives")
    g = torch.randn(10, 4, dtype=torch.float64)
    labels = torch.arange(10) % 5
    loss, n_pairs, chunks = lik.pair_term_chunks(g, labels, max_pairs=2)
    chunks = list(chunks)
    assert n_pairs == 5 and [len(c.signs) for c in chunks] == [2, 2, 1]
    assert all(bool((c.signs == 1).all()) for c in chunks)
    assert torch.allclose(loss, lik.loss(g, labels))


def test_pair_budget_miner_caps_and_is_reproducible():
    labels = torch.arange(40) % 4
    z = torch.nn.functional.normalize(torch.randn(40, 3), dim=-1)
    miner = PairBudgetMiner(max_pairs=50, seed=0)
    a1, p, a2, n = miner(z, labels)
    assert len(a1) + len(a2) == 50
    assert bool((labels[a1] == labels[p]).all()) and bool((labels[a2] != labels[n]).all())
    again = PairBudgetMiner(max_pairs=50, seed=0)(z, labels)
    assert all(torch.equal(u, v) for u, v in zip((a1, p, a2, n), again))
    small = PairBudgetMiner(max_pairs=10_000)(z, labels)
    assert len(small[0]) + len(small[2]) == 40 * 39 // 2  # under budget: every pair
    lik = ContrastiveLikelihood(miner=PairBudgetMiner(max_pairs=50, seed=1))
    assert len(lik.mine(z, labels)) == 50
    with pytest.raises(ValueError, match="max_pairs"):
        PairBudgetMiner(max_pairs=0)


@pytest.mark.parametrize("one_sided", [False, True])
def test_pair_batch_graph_reproduces_per_pair_sums(one_sided):
    """``PairGraph.of_pair_batch``: on the rows ``cat([x_a, x_b])`` the folds give
    ``sum_m s_m V_m V_m^T`` with ``V_m = u_a + u_b`` (different factors per side, as for a
    likelihood that does not factor per sample) and the per-pair Kronecker factors."""
    m, rank, out, fan_in, locations = 5, 2, 3, 4, 2
    gen = torch.Generator().manual_seed(7)
    signs = torch.tensor([1.0, -1.0, 0.5, 1.0, -2.0], dtype=torch.float64)
    graph = PairGraph.of_pair_batch(signs, one_sided)
    sides = 1 if one_sided else 2
    q = torch.randn(rank, sides * m, locations, out, generator=gen, dtype=torch.float64)
    x = torch.randn(sides * m, locations, fan_in, generator=gen, dtype=torch.float64)
    grads = torch.einsum("rbto,bti->rboi", q, x).flatten(start_dim=2)
    pair = grads if one_sided else grads[:, :m] + grads[:, m:]  # V_m per column
    expected = torch.einsum("m,rmp,rmq->pq", signs, pair, pair)
    assert graph.n_pairs == m
    assert rel_error(fold_gram(grads, graph), expected) < TOL
    assert rel_error(fold_diag(grads, graph), expected.diagonal()) < TOL
    big_q = q if one_sided else q[:, :m] - q[:, m:]
    e = x if one_sided else (x[:m] - x[m:]) / 2
    b_exp = torch.einsum("m,rmto,rmtp->op", signs, big_q, big_q)
    a_exp = torch.einsum("mti,mtj->ij", e, e) / locations
    assert rel_error(fold_output_factor(q, graph), b_exp) < TOL
    assert rel_error(fold_input_factor(x, graph), a_exp) < TOL


@pytest.mark.parametrize("shuffled", [False, True])
def test_fold_linear_of_pairs_matches_pair_sums_as_views_or_gathers(shuffled):
    """Disjoint pairs fold edge by edge; in batch order their samples are strided views."""
    from laplace_metric.curvature.fold_plan import fold_plan

    n, rank, out, fan_in = 12, 3, 4, 5
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(n, generator=gen) if shuffled else torch.arange(n)
    first, second = order[0::2], order[1::2]  # pairs (0, 1), (2, 3), ... before shuffling
    weights = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    graph = PairGraph.from_pairs(first, second, weights, n)
    q = torch.randn(rank, n, out, generator=gen, dtype=torch.float64)
    x = torch.randn(n, fan_in, generator=gen, dtype=torch.float64)
    weight, bias = fold_linear(q, x, graph)
    expected_w = torch.zeros(out, fan_in, dtype=torch.float64)
    expected_b = torch.zeros(out, dtype=torch.float64)
    for a, b, s in zip(first.tolist(), second.tolist(), weights.tolist()):
        v = q[:, a, :, None] * x[a] - q[:, b, :, None] * x[b]  # [R, out, in]
        expected_w += s * v.square().sum(0)
        expected_b += s * (q[:, a] - q[:, b]).square().sum(0)
    assert rel_error(weight, expected_w) < TOL
    assert rel_error(bias, expected_b) < TOL
    (bucket,) = fold_plan(graph).buckets
    slices = bucket.edge_slices()
    if shuffled:
        assert slices == (None, None) or None in slices
    else:
        assert slices == (slice(0, 12, 2), slice(1, 13, 2))


@pytest.mark.parametrize("density", [0.0, 0.02, 0.05, 0.2, 1.0])
def test_component_labels_match_scipy(density):
    """Labels numbered by smallest member, as scipy's breadth-first search numbers them."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    from laplace_metric.pairs.graph import component_labels

    gen = torch.Generator().manual_seed(int(100 * density))
    n = 60
    upper = torch.rand(n, n, generator=gen).triu(1) < density
    graphs = [upper | upper.T]
    chain = torch.zeros(n, n, dtype=torch.bool)  # a path through a shuffled order: diameter n-1
    perm = torch.randperm(n, generator=gen)
    chain[perm[:-1], perm[1:]] = True
    graphs.append(chain | chain.T)
    for adjacency in graphs:
        _, expected = connected_components(csr_matrix(adjacency.numpy()), directed=False)
        assert torch.equal(component_labels(adjacency), torch.as_tensor(expected).long())
