"""How HookPairGGN back-propagates its columns: one forward pass with the graph retained
(against the batch repeated per column chunk), and per-sample gradients of broadcast parameters
(class tokens, positional embeddings) from the sites' own backward pass, with the ``torch.func``
fallback where a parameter is used otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import laplace_metric  # noqa: F401  (registers the likelihoods)
from laplace_metric.curvature import HookPairGGN, ReferencePairGGN
from laplace_metric.curvature.hooks import columns as hook_columns
from laplace_metric.likelihoods import ContrastiveLikelihood
from tests.bruteforce import assert_close
from tests.conftest import labelled_data
from tests.test_hooks import residual_cnn, tiny_vit

TOL = 1e-10


class Offset(nn.Module):
    """``x + p`` with ``p`` of shape ``(1, 5)``, used as ``use`` says."""

    def __init__(self, use: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.use = use
        self.p = nn.Parameter(torch.randn(1, 5, dtype=torch.float64))
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use == "broadcast":
            shift = self.p
        elif self.use == "indexed":  # row 0 only: a per-row expansion would be wrong
            shift = self.p[0]
        else:  # "repeat": an expansion has the wrong shape
            shift = self.p.repeat(x.shape[0], 1)
        return self.lin(torch.tanh(x + shift))


def _spy(monkeypatch) -> list[list[str]]:
    """Record the parameter names each ``functional_grads`` call in the backend takes."""
    calls: list[list[str]] = []
    stock = hook_columns.functional_grads

    def spy(module, inputs, names, *args):
        calls.append(list(names))
        return stock(module, inputs, names, *args)

    monkeypatch.setattr(hook_columns, "functional_grads", spy)
    return calls


@pytest.mark.parametrize(
    "name, shape",
    [("vit", (3, 8, 8)), ("broadcast", (5,)), ("indexed", (5,)), ("repeat", (5,))],
)
def test_row_params_equal_the_reference(name, shape, device, monkeypatch):
    """Exact either way; only a broadcast parameter skips the ``torch.func`` passes."""
    model = (tiny_vit() if name == "vit" else Offset(name)).to(device)
    x, y = labelled_data(10, shape)
    x, y = x.to(device), y.to(device)
    lik = ContrastiveLikelihood(hessian_method="positives")
    calls = _spy(monkeypatch)
    hooks = HookPairGGN(model, lik)
    hooks.max_elements = 2**12  # several column chunks
    got = hooks.diag(x, y).hessian
    assert_close(got, ReferencePairGGN(model, lik).diag(x, y).hessian, TOL)
    probe_calls = 1  # the two-sample check of the candidates
    if name in ("vit", "broadcast"):
        assert len(calls) == probe_calls
    elif name == "indexed":  # the check rejects it: torch.func for every chunk
        assert len(calls) > probe_calls and all(c == ["p"] for c in calls)
    else:  # the expansion fails: no check, torch.func for every chunk
        assert calls and all(c == ["p"] for c in calls)


def test_row_params_off_gives_the_same_diagonal(monkeypatch):
    model = tiny_vit()
    x, y = labelled_data(10, (3, 8, 8))
    lik = ContrastiveLikelihood(hessian_method="positives")
    fast = HookPairGGN(model, lik).diag(x, y).hessian
    slow_backend = HookPairGGN(model, lik)
    slow_backend.row_params = False
    calls = _spy(monkeypatch)
    slow = slow_backend.diag(x, y).hessian
    assert calls and all(set(c) == {"class_token", "encoder.pos_embedding"} for c in calls)
    assert_close(fast, slow, TOL)


@pytest.mark.parametrize(
    "name, build, shape", [("rescnn", residual_cnn, (1, 6, 6)), ("vit", tiny_vit, (3, 8, 8))]
)
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_retained_forward_equals_repeated_batches(name, build, shape, structure, device):
    """Several column chunks either way; the same curvature to rounding."""
    model = build().to(device)
    x, y = labelled_data(10, shape)
    x, y = x.to(device), y.to(device)
    lik = ContrastiveLikelihood(hessian_method="positives")
    results = []
    for retain in (True, False):
        hooks = HookPairGGN(model, lik)
        hooks.max_elements = 2**11
        hooks.retain_forward = retain
        results.append(getattr(hooks, structure)(x, y).hessian)
    if structure == "diag":
        assert_close(results[0], results[1], TOL)
        assert_close(results[0], ReferencePairGGN(model, lik).diag(x, y).hessian, TOL)
    else:
        for got, want in zip(results[0].kfacs, results[1].kfacs):
            for a, b in zip(got, want):
                assert_close(a, b, TOL)


@pytest.mark.parametrize("method", ["positives", "full"])
def test_sample_blocks_give_the_reference_diagonal(method, device, monkeypatch):
    """Per-sample gradients formed a block of whole components at a time (a tiny cache makes
    every component, and the singleton class, a block of its own) are exact."""
    from laplace_metric.curvature.hooks import diag as hook_diag

    monkeypatch.setattr(hook_diag, "CACHE_ELEMENTS", 64)
    model = residual_cnn().to(device)
    x, y = labelled_data(13, (1, 6, 6), n_classes=4)
    y[y == 3] = torch.tensor([3, 0, 1, 2])[: int((y == 3).sum())]  # class 3: one sample
    x, y = x.to(device), y.to(device)
    lik = ContrastiveLikelihood(hessian_method=method, margin=10.0)
    hooks = HookPairGGN(model, lik)
    hooks.location_gram = False  # every shared weight in the per-sample form
    got = hooks.diag(x, y).hessian
    assert_close(got, ReferencePairGGN(model, lik).diag(x, y).hessian, TOL)


def test_sample_blocks_of_scattered_components(monkeypatch):
    """Blocks of components that are not contiguous in the batch are gathered, not sliced."""
    from laplace_metric.curvature.folds import fold_diag
    from laplace_metric.curvature.hooks import diag as hook_diag
    from laplace_metric.curvature.hooks.diag import per_column_diag
    from laplace_metric.curvature.hooks.sites import Site, SiteKind, weight_grads
    from laplace_metric.pairs.graph import PairGraph

    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1])
    i, j = torch.triu_indices(9, 9, 1)
    same = y[i] == y[j]
    graph = PairGraph.from_pairs(i[same], j[same], torch.rand(int(same.sum()), generator=gen), 9)
    site = Site(
        SiteKind.LINEAR, nn.Identity(), "w", None, torch.randn(9, 4, 5, generator=gen), None
    )
    site.inputs = site.inputs.double()
    calls = [(site, torch.randn(2, 9, 4, 3, generator=gen, dtype=torch.float64))]
    monkeypatch.setattr(hook_diag, "CACHE_ELEMENTS", hook_diag.MIN_ROWS * 2 * 5 * 3)  # 3 samples
    chunks = graph.component_chunks(3)
    assert len(chunks) > 1 and any(len(s) > 1 and (s.diff() > 1).any() for s, _ in chunks)
    want = fold_diag(weight_grads(calls), graph)
    assert_close(per_column_diag(calls, graph, max_elements=1 << 20), want, TOL)
