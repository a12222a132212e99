"""One conformance suite for the pair-graph folds: every backend, structure and Hessian method
against explicit float64 brute force (torch.func ``functional_call`` Jacobians, pair loops).

Every backend folds the signed pair graph with :mod:`laplace_metric.curvature.folds`; the
cases exercise each of its forms: one-sample components and one-sided graphs (``fixed``),
uniform ``a I + b 1 1^T`` classes in the centred closed form (``positives`` over all pairs),
general components in size buckets with padding (mined pairs, ``full`` with hinge negatives),
and, for :class:`~laplace_metric.curvature.HookPairGGN`, the location Gram forms of shared
weights (``gram``, ``split``) besides the per-column form.
"""

from __future__ import annotations

import functools

import pytest
import torch
from laplace.utils import Kron
from torch import nn

from laplace_metric.curvature import AsdlPairGGN, BackPackPairGGN, HookPairGGN, ReferencePairGGN
from laplace_metric.curvature.folds import fold_plan
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.mining import PairBudgetMiner
from tests.bruteforce import embedding_jacobian, kron_factors, pairwise_ggn, rel_error

TOL = 1e-10
MARGIN = 1.5
METHODS = ["positives", "fixed", "full"]
STRUCTURES = ["diag", "kron", "full"]
#: Classes of 1 to 4 samples: singletons, uniform components of several sizes (padded buckets).
LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 4, 5])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def cnn() -> nn.Module:
    """Two convolutions (weights shared over locations) and a Linear head."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(2, 2, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).double()


ARCHS = {"mlp": (mlp, (5,)), "cnn": (cnn, (1, 5, 5))}


def _backend(name: str):
    return {"reference": ReferencePairGGN, "backpack": BackPackPairGGN, "asdl": AsdlPairGGN}.get(
        name, HookPairGGN
    )


BACKENDS = ["reference", "backpack", "asdl", "hooks"]


def likelihood(method: str, mined: bool) -> ContrastiveLikelihood:
    """All pairs, or a seeded subset of them (components that are no longer uniform; the
    miner draws anew on every call, so each fit takes a fresh likelihood)."""
    miner = PairBudgetMiner(max_pairs=30, seed=0) if mined else None
    return ContrastiveLikelihood(margin=MARGIN, hessian_method=method, miner=miner)


@functools.cache
def case(arch: str, method: str, mined: bool):
    """Model, data and the brute-force GGN and Kronecker factors of one case."""
    make, shape = ARCHS[arch]
    model = make()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(len(LABELS), *shape, generator=gen, dtype=torch.float64)
    jac, z = embedding_jacobian(model, x, normalize=True)
    if mined:  # the brute force sums over the mined pairs only (a fresh, seeded miner)
        pairs = likelihood(method, mined).mine(z, LABELS)
        keep = torch.zeros(len(LABELS), len(LABELS), dtype=torch.bool)
        keep[pairs.first, pairs.second] = True
        ggn = _mined_ggn(jac, z, keep, method)
        factors = None
    else:
        ggn = pairwise_ggn(jac, z, LABELS, MARGIN, method)
        factors = kron_factors(model, x, LABELS, MARGIN, method, True)
    return model, x, ggn, factors


def _mined_ggn(jac, z, keep, method):
    """:func:`tests.bruteforce.pairwise_ggn` restricted to the pairs ``keep[a, b]``, ``a < b``."""
    labels = LABELS.clone()
    ggn = torch.zeros(jac.shape[-1], jac.shape[-1], dtype=jac.dtype)
    first, second = torch.nonzero(keep | keep.T, as_tuple=True)
    order = first < second
    for a, b in zip(first[order].tolist(), second[order].tolist()):
        sub = torch.tensor([a, b])
        ggn += pairwise_ggn(jac[sub], z[sub], labels[sub], MARGIN, method)
    return ggn


def hooks_variant(backend: HookPairGGN, form: str) -> HookPairGGN:
    backend.location_gram = {"per_column": False, "gram": "gram", "split": "split"}[form]
    return backend


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mined", [False, True], ids=["all_pairs", "mined"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_diag_and_full_equal_brute_force(backend, method, mined, arch):
    model, x, ggn, _ = case(arch, method, mined)
    for structure, expected in (("full", ggn), ("diag", ggn.diagonal())):
        curv = _backend(backend)(model, likelihood(method, mined))  # a fresh miner each time
        assert curv.use_pair_graph
        assert rel_error(getattr(curv, structure)(x, LABELS).hessian, expected) < TOL


@pytest.mark.parametrize("mined", [False, True], ids=["all_pairs", "mined"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["per_column", "gram", "split"])
def test_hook_location_forms_equal_brute_force(form, method, mined):
    """The hook backend's folds of conv weights through location Gram matrices."""
    model, x, ggn, _ = case("cnn", method, mined)
    curv = hooks_variant(HookPairGGN(model, likelihood(method, mined)), form)
    assert rel_error(curv.diag(x, LABELS).hessian, ggn.diagonal()) < TOL


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_equals_brute_force(backend, method, arch):
    """Linear/Conv weights: the difference-only factors of explicit pair loops; 1-D
    parameters: their exact dense block of the brute-force GGN."""
    model, x, ggn, factors = case(arch, method, False)
    batch = _backend(backend)(model, likelihood(method, False)).kron(x, LABELS)
    kron = batch.hessian
    assert isinstance(kron, Kron)
    offset = 0
    for (name, param), got in zip(model.named_parameters(), kron.kfacs):
        size = param.numel()
        if param.ndim == 1:
            expected = [ggn[offset : offset + size, offset : offset + size]]
            got = list(got)
        else:
            expected = list(factors[name.rsplit(".", 1)[0]])
            got = [got[0], got[1] / batch.n_pairs]  # the estimator normalises the input factor
        assert len(got) == len(expected), name
        for g, e in zip(got, expected):
            assert rel_error(g, e) < TOL, (name, method)
        offset += size


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mined", [False, True], ids=["all_pairs", "mined"])
def test_cases_cover_every_fold_form(method, mined):
    """The graphs above reach the forms they claim: singletons, uniform and bucketed."""
    model, x, _, _ = case("mlp", method, mined)
    graph = likelihood(method, mined).graph_terms(model(x), LABELS).graph
    plan = fold_plan(graph)
    if method == "fixed":
        assert not plan.buckets and bool(plan.weights.any())
    elif method == "positives" and not mined:
        assert plan.n_uniform == 3 and not plan.general and plan.centred
        assert any(bucket.padded for bucket in plan.buckets)
    else:
        assert plan.general and all(bucket.centred for bucket in plan.general)
