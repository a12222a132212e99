"""The hook backend counts the forward graph it keeps against the memory budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import laplace_metric  # noqa: F401  (registers the likelihoods)
from laplace_metric.curvature import HookPairGGN, ReferencePairGGN
from laplace_metric.curvature.budget import MIN_ELEMENTS, budget_elements
from laplace_metric.curvature.hooks.graph_memory import saved_bytes
from laplace_metric.memory import MemoryBudgetError
from tests.bruteforce import assert_close
from tests.test_hooks import TOL, setup


def test_saved_bytes_counts_activations_once_and_no_parameters(device):
    """Linear -> ReLU -> Linear saves the input and the ReLU output (which the second Linear
    saves again: one storage); the weights are parameters and are not counted; what the run
    returns is kept too."""
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).double().to(device)
    x = torch.randn(7, 10, dtype=torch.float64, device=device)
    assert saved_bytes(model, lambda: None if model(x) is None else None) == 7 * (10 + 20) * 8
    assert saved_bytes(model, lambda: [model(x)]) == 7 * (10 + 20 + 5) * 8  # and the output kept
    with torch.no_grad():
        assert saved_bytes(model, lambda: [model(x)]) == 7 * 5 * 8


#: Working memory of the passes at their smallest chunking (float64).
SMALLEST = MIN_ELEMENTS * 8 * HookPairGGN.MEMORY_PER_ELEMENT_BOUND


def _spy_bounds(backend: HookPairGGN, monkeypatch) -> list[int]:
    """The ``max_elements`` that each pass sees (recorded when the Gram policy is built)."""
    seen, policy = [], backend._gram_policy

    def spy():
        seen.append(backend.max_elements)
        return policy()

    monkeypatch.setattr(backend, "_gram_policy", spy)
    return seen


@pytest.mark.parametrize("name", ["rescnn", "vit"])
def test_fit_bound_leaves_room_for_the_kept_graph(name, device, monkeypatch):
    """Under a budget the columns get the budget less the batch's forward graph; the
    curvature is unchanged (exact against the reference)."""
    model, x, y, lik = setup(name, "positives", device)
    backend = HookPairGGN(model, lik)
    per_row = backend._probe(model, x).kept_bytes
    assert per_row > 0
    budget = SMALLEST + len(x) * per_row + 4 * 2**16 * 8 * HookPairGGN.MEMORY_PER_ELEMENT_BOUND
    backend.memory_budget = budget
    seen = _spy_bounds(backend, monkeypatch)
    got = backend.diag(x, y).hessian
    want = budget_elements(
        HookPairGGN.DEFAULT_MAX_ELEMENTS,
        budget - len(x) * per_row,
        8,
        backend.MEMORY_PER_ELEMENT_BOUND,
    )
    assert seen and set(seen) == {want}
    assert want < budget_elements(
        HookPairGGN.DEFAULT_MAX_ELEMENTS, budget, 8, backend.MEMORY_PER_ELEMENT_BOUND
    )
    assert backend.max_elements > want  # released after the fit
    assert_close(got, ReferencePairGGN(model, lik).diag(x, y).hessian, TOL)


def test_a_graph_over_the_budget_names_the_batch_that_fits(device):
    model, x, y, lik = setup("vit", "positives", device)
    backend = HookPairGGN(model, lik)
    per_row = backend._probe(model, x).kept_bytes
    fits = 3
    backend.memory_budget = fits * per_row + per_row // 2
    for structure in ("diag", "kron", "full"):
        with pytest.raises(
            MemoryBudgetError, match=r"forward graph of a batch of 10 samples"
        ) as err:
            getattr(backend, structure)(x, y)
        assert f"batches of at most {fits} samples" in str(err.value)
    backend.memory_budget = len(x) * per_row
    backend.diag(x, y)  # the graph fits; the passes take their smallest chunks


def _pretend_graph(backend: HookPairGGN, monkeypatch, per_row: int) -> None:
    """Let the (tiny) test model's forward graph weigh ``per_row`` bytes per row."""
    probe = backend._probe
    monkeypatch.setattr(
        backend, "_probe", lambda module, inputs: probe(module, inputs)._replace(kept_bytes=per_row)
    )


def test_predictive_chunks_by_its_repeated_graph(device, monkeypatch):
    """The linearised predictive repeats each sample once per output dimension: its chunks
    of samples follow the budget (down to one sample: the estimator plans the queries and
    names what does not fit), and the covariance does not depend on the chunking."""
    model, x, y, lik = setup("vit", "positives", device)
    backend = HookPairGGN(model, lik)
    n_params = sum(p.numel() for p in model.parameters())
    variances = torch.rand(n_params, dtype=torch.float64, device=device)
    z, want = backend.predictive_covariance(x, variances)
    dim, per_row = z.shape[1], 2 * 10**6
    _pretend_graph(backend, monkeypatch, per_row)
    rows, passes = [], backend._passes

    def spy(module, inputs, columns, all_columns=False):
        rows.append(inputs.shape[0])
        return passes(module, inputs, columns, all_columns)

    monkeypatch.setattr(backend, "_passes", spy)
    backend.memory_budget = 3 * dim * per_row + 2 * SMALLEST
    _, got = backend.predictive_covariance(x, variances)
    assert_close(got, want, TOL)
    assert 1 < max(rows) < len(x) and sum(rows) == len(x)
    assert max(rows) * dim * per_row <= backend.memory_budget
    backend.memory_budget = dim * per_row // 2  # one sample at a time, never an error here:
    _, got = backend.predictive_covariance(x, variances)  # the estimator plans the queries
    assert_close(got, want, TOL)
    assert rows[-1] == 1


def test_repeated_passes_bound_their_graph_copies(device, monkeypatch):
    """Without the retained graph (``retain_forward = False``) a pass of ``c`` columns runs
    the batch ``c`` times: ``c`` is bounded by the copies of the graph that fit."""
    model, x, y, lik = setup("rescnn", "positives", device)
    backend = HookPairGGN(model, lik)
    backend.retain_forward = False
    steps, passes = [], backend._repeated_passes

    def spy(module, inputs, columns, step, by_row):
        steps.append(step)
        return passes(module, inputs, columns, step, by_row)

    monkeypatch.setattr(backend, "_repeated_passes", spy)
    want = ReferencePairGGN(model, lik).diag(x, y).hessian
    assert_close(backend.diag(x, y).hessian, want, TOL)
    assert steps[-1] == 3  # all columns in one pass without a budget
    per_row = 10**6
    _pretend_graph(backend, monkeypatch, per_row)
    backend.memory_budget = SMALLEST + 2 * len(x) * per_row
    assert_close(backend.diag(x, y).hessian, want, TOL)
    assert steps[-1] == 2


def test_jacobians_count_the_kept_graph(device):
    model, x, y, lik = setup("vit", "positives", device)
    backend = HookPairGGN(model, lik)
    want, _ = ReferencePairGGN(model, lik).jacobians(x)
    per_row = backend._probe(model, x).kept_bytes
    backend.memory_budget = len(x) * per_row
    assert_close(backend.jacobians(x)[0], want, TOL)
    backend.memory_budget = 4 * per_row
    with pytest.raises(MemoryBudgetError, match="batches of at most 4 samples"):
        backend.jacobians(x)


def test_one_probe_pass_serves_the_fit_and_the_predictive(device, monkeypatch):
    """The column sizes, the covered parameters and the kept bytes come from one recorded pass
    of one sample per module and input shape (a fit and a predictive call reuse it); a
    parameter frozen after the probe is still left out (the cache keeps names, not flags)."""
    model, x, y, lik = setup("rescnn", "positives", device)
    backend = HookPairGGN(model, lik)
    record, probes = backend._record, []

    def spy(module, inputs, *args, **kwargs):
        if inputs.shape[0] == 1 and not args and not kwargs:
            probes.append(inputs.shape)
        return record(module, inputs, *args, **kwargs)

    monkeypatch.setattr(backend, "_record", spy)
    want = ReferencePairGGN(model, lik).diag(x, y).hessian
    assert_close(backend.diag(x, y).hessian, want, TOL)
    backend.diag(x[:6], y[:6])
    backend.predictive_covariance(x[:3], torch.ones_like(want))
    assert len(probes) == 1
    first = next(model.parameters())
    first.requires_grad_(False)
    try:
        frozen = HookPairGGN(model, lik)
        frozen._probes = backend._probes  # the cached probe of the unfrozen model
        reference = ReferencePairGGN(model, lik).diag(x, y).hessian
        assert_close(frozen.diag(x, y).hessian, reference, TOL)
    finally:
        first.requires_grad_(True)
