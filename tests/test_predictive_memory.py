"""Memory-planned prediction: budgets, chunking, the structured last-layer predictive, and
posterior sampling that runs a frozen backbone once per input."""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from torch import nn

from laplace_metric import posterior_retrieval
from laplace_metric.memory import (
    BUDGET_ENV,
    MemoryBudgetError,
    chunk_size,
    default_budget,
    format_bytes,
    parse_bytes,
)
from laplace_metric.predictive import jacobian_glm
from tests.conftest import labelled_data, loader, make_mlp

STRUCTURES = ("diag", "kron", "full")
COMBOS = [
    (subset, structure)
    for subset in ("all", "last_layer", "subnetwork")
    for structure in STRUCTURES
    if not (subset == "subnetwork" and structure == "kron")
]


def fitted(subset, structure, device, normalize=True, **kwargs):
    model = make_mlp().to(device)
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = torch.arange(0, 60, 3, device=device)
    la = Laplace(
        model,
        "contrastive",
        subset_of_weights=subset,
        hessian_structure=structure,
        normalize=normalize,
        hessian_method="full",
        **kwargs,
    )
    x, y = labelled_data(24, (5,))
    la.fit(loader(x.to(device), y.to(device), 8))
    return la, x.to(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


# ---------------------------------------------------------------------- structured last layer
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("normalize", [True, False])
def test_structured_last_layer_equals_jacobian_path(structure, normalize, device):
    la, x = fitted("last_layer", structure, device, normalize=normalize, temperature=0.7)
    la.prior_precision = 0.3
    mean, cov = la(x[:9])
    ref_mean, ref_cov = jacobian_glm(la, x[:9])
    assert torch.equal(mean, ref_mean) or rel(mean, ref_mean) < 1e-14
    assert rel(cov, ref_cov) < 1e-12
    _, var = la(x[:9], diagonal_output=True)
    assert rel(var, ref_cov.diagonal(dim1=-2, dim2=-1)) < 1e-12
    joint_mean, joint_cov = la(x[:4], joint=True)
    ref_joint_mean, ref_joint = jacobian_glm(la, x[:4], joint=True)
    assert rel(joint_mean, ref_joint_mean) < 1e-14
    assert rel(joint_cov, ref_joint) < 1e-12


def test_structured_kron_with_damping_and_layerwise_prior(device):
    la, x = fitted("last_layer", "kron", device, damping=True)
    la.prior_precision = torch.tensor([0.5, 3.0], dtype=torch.float64, device=device)
    _, cov = la(x[:7])
    _, ref = jacobian_glm(la, x[:7])
    assert rel(cov, ref) < 1e-12


def test_structured_path_skips_the_jacobians(device, monkeypatch):
    la, x = fitted("last_layer", "kron", device)

    def fail(*args, **kwargs):
        raise AssertionError("the Jacobian path was used")

    monkeypatch.setattr(type(la.backend), "jacobians", fail)
    mean, cov = la(x[:5])
    assert cov.shape == (5, 3, 3)


# ---------------------------------------------------------------------- chunked == unchunked
@pytest.mark.parametrize("subset,structure", COMBOS)
def test_chunked_predictions_equal_unchunked(subset, structure, device):
    la, x = fitted(subset, structure, device)
    mean, cov = la(x)
    for batch_size in (1, 5):
        m, c = la(x, batch_size=batch_size)
        assert rel(m, mean) < 1e-14 and rel(c, cov) < 1e-12
    _, var = la(x, diagonal_output=True, batch_size=5)
    assert rel(var, cov.diagonal(dim1=-2, dim2=-1)) < 1e-12
    scores = la.predictive_uncertainty(x)
    assert rel(la.predictive_uncertainty(x, batch_size=4), scores) < 1e-12
    assert rel(scores, cov.diagonal(dim1=-2, dim2=-1).sum(-1)) < 1e-12

    def gen():
        return torch.Generator(device=device).manual_seed(3)

    samples = la.predictive_samples(x, n_samples=6, generator=gen())
    chunked = la.predictive_samples(x, n_samples=6, generator=gen(), batch_size=5)
    assert rel(chunked, samples) < 1e-12
    nn_mean, nn_cov = la(x, pred_type="nn", n_samples=7, generator=gen())
    m, c = la(x, pred_type="nn", n_samples=7, generator=gen(), batch_size=3)
    assert rel(m, nn_mean) < 1e-14 and rel(c, nn_cov) < 1e-12
    nn_scores = la.predictive_uncertainty(x, pred_type="nn", n_samples=7, generator=gen())
    assert rel(nn_scores, nn_cov.diagonal(dim1=-2, dim2=-1).sum(-1)) < 1e-12
    nn_chunked = la.predictive_uncertainty(
        x, pred_type="nn", n_samples=7, generator=gen(), batch_size=2
    )
    assert rel(nn_chunked, nn_scores) < 1e-12


def test_budget_sets_the_chunk_size(device, monkeypatch):
    la, x = fitted("all", "full", device)  # the Jacobian path (diag/kron go layer by layer)
    mean, cov = la(x)
    seen = []
    original = type(la.backend).jacobians

    def spy(self, inputs, *args, **kwargs):
        seen.append(len(inputs))
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(la.backend), "jacobians", spy)
    from laplace_metric.predictive import glm_bytes_per_query

    per_query = glm_bytes_per_query(la, structured=False)
    la.memory_budget = 3 * per_query
    m, c = la(x)
    assert seen and max(seen) == 3 and sum(seen) == len(x)
    assert rel(m, mean) < 1e-14 and rel(c, cov) < 1e-12


def test_nn_samples_match_a_full_forward_pass(device):
    """The head-only sampling of a last-layer posterior equals pushing each weight sample
    through the whole network."""
    la, x = fitted("last_layer", "full", device)
    gen = torch.Generator(device=device).manual_seed(0)
    samples = la.predictive_samples(x, pred_type="nn", n_samples=4, generator=gen)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = la.sample(4, gen)
    params = list(la.model.last_layer.parameters())
    expected = []
    from torch.nn.utils import vector_to_parameters

    with torch.no_grad():
        for w in weights:
            vector_to_parameters(w, params)
            expected.append(la.pair_likelihood.embed(la.model(x)))
    vector_to_parameters(la.mean, params)
    assert rel(samples, torch.stack(expected)) < 1e-13


# ---------------------------------------------------------------------- backbone once
def count_rows(module: nn.Module) -> list[int]:
    rows: list[int] = []
    module.register_forward_hook(lambda mod, inputs, output: rows.append(len(inputs[0])))
    return rows


@pytest.mark.parametrize("structure", STRUCTURES)
def test_last_layer_retrieval_runs_the_backbone_once_per_input(structure, device):
    la, x = fitted("last_layer", structure, device)
    database, labels = labelled_data(30, (5,), seed=4)
    database, labels = database.to(device), labels.to(device)
    rows = count_rows(la.model.model[0])  # the first layer of the backbone
    result = posterior_retrieval(la, x, database, labels, n_samples=5, batch_size=7)
    assert sum(rows) == len(x) + len(database)
    assert result.knn_distance.shape == (len(x),)
    rows.clear()
    la.predictive_samples(x, pred_type="nn", n_samples=5)
    assert sum(rows) == len(x)


def test_retrieval_equals_reembedding_under_each_sample(device):
    """Backbone-once retrieval equals re-running the whole model under each weight sample,
    and does not depend on the query chunking of the distance computation."""
    la, x = fitted("last_layer", "kron", device)
    database, labels = labelled_data(30, (5,), seed=4)
    database, labels = database.to(device), labels.to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    result = posterior_retrieval(la, x, database, labels, k=2, n_samples=6, generator=gen)
    from torch.nn.utils import vector_to_parameters

    params = list(la.model.last_layer.parameters())
    gen = torch.Generator(device=device).manual_seed(1)
    knn = torch.zeros(len(x), dtype=torch.float64, device=device)
    with torch.no_grad():
        for w in la.sample(6, gen):
            vector_to_parameters(w, params)
            z_q = la.pair_likelihood.embed(la.model(x))
            z_db = la.pair_likelihood.embed(la.model(database))
            knn += torch.cdist(z_q, z_db).topk(2, largest=False).values[:, -1]
    vector_to_parameters(la.mean, params)
    assert rel(result.knn_distance, knn / 6) < 1e-12
    # six queries per distance chunk; the six weight samples still come in one block
    la.memory_budget = 4 * 6 * la.mean.numel() * 8
    assert la.memory_budget // (3 * 8 * len(database)) == 6
    gen = torch.Generator(device=device).manual_seed(1)
    chunked = posterior_retrieval(la, x, database, labels, k=2, n_samples=6, generator=gen)
    assert rel(chunked.knn_distance, result.knn_distance) < 1e-12
    assert torch.equal(chunked.confidence, result.confidence)


# ---------------------------------------------------------------------- memory errors
def test_full_posterior_too_large_raises_before_allocating(monkeypatch):
    model = make_mlp()
    allocated = []
    real_zeros = torch.zeros

    def zeros(*size, **kwargs):
        allocated.append(size)
        return real_zeros(*size, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(MemoryBudgetError) as info:
        Laplace(model, "contrastive", "all", "full", memory_budget=3 * n * n * 8 - 1)
    message = str(info.value)
    assert f"{n:,} parameters" in message and "needs" in message
    assert "hessian_structure='diag'" in message and "hessian_structure='kron'" in message
    assert "subset_of_weights='last_layer'" in message
    assert not any(s in ((n, n),) for s in allocated)
    monkeypatch.setattr(torch, "zeros", real_zeros)
    Laplace(model, "contrastive", "all", "full", memory_budget=3 * n * n * 8)  # fits


@pytest.mark.filterwarnings("ignore:Falling back to HookPairGGN")
def test_kron_error_names_a_dominant_token_factor():
    """A ``(1, T, C)`` position embedding's Kronecker factor is its dense ``TC x TC`` block: when
    it is most of the size, the error names it and offers to leave it out, which then fits."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=2, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16,
        num_classes=4,
    ).double().eval()  # fmt: skip
    width = model.encoder.pos_embedding.numel()  # 65 x 16 = 1040
    with pytest.raises(MemoryBudgetError) as info:
        Laplace(model, "contrastive", "all", "kron", memory_budget=4 * width**2 * 8)
    message = str(info.value)
    assert f"dense {width:,} x {width:,} factor of 'encoder.pos_embedding'" in message
    assert "without 'encoder.pos_embedding'" in message and "requires_grad_(False)" in message
    model.encoder.pos_embedding.requires_grad_(False)
    la = Laplace(model, "contrastive", "all", "kron", memory_budget=4 * width**2 * 8)
    assert la.n_params == sum(p.numel() for p in model.parameters()) - width


def test_last_layer_full_checked_in_fit_before_the_backend(monkeypatch):
    model = make_mlp()
    la = Laplace(model, "contrastive", "last_layer", "full", memory_budget=5000)
    calls = []
    monkeypatch.setattr(type(la.backend), "full", lambda *a, **k: calls.append(1))
    x, y = labelled_data(12, (5,))
    with pytest.raises(MemoryBudgetError, match=r"24 parameters.*hessian_structure='diag'"):
        la.fit(loader(x, y, 6))
    assert calls == []


def test_jacobian_predictive_too_large_names_the_alternatives(device):
    la, x = fitted("all", "diag", device)
    la.memory_budget = 100
    with pytest.raises(MemoryBudgetError, match=r"one query.*pred_type='nn'.*last_layer"):
        la(x[:2])
    la(x[:2], batch_size=1)  # an explicit batch size is the user's decision
    with pytest.raises(MemoryBudgetError, match="joint GLM predictive"):
        la(x[:2], joint=True)


def test_weight_samples_are_drawn_in_blocks_that_fit(device):
    la, x = fitted("all", "diag", device)
    n = la.mean.numel()
    la.memory_budget = 4 * 8 * n * 2  # two weight samples per block
    blocks = []
    original = la.sample

    def spy(n_samples, generator=None):
        blocks.append(n_samples)
        return original(n_samples, generator)

    la.sample = spy
    out = la.predictive_samples(x[:3], pred_type="nn", n_samples=5, batch_size=3)
    assert blocks == [2, 2, 1] and out.shape == (5, 3, 3)


# ---------------------------------------------------------------------- helpers
def test_sizes_parse_and_format(monkeypatch):
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes(2.5e9) == 2_500_000_000
    assert format_bytes(502e12) == "502 TB" and format_bytes(17.2e9) == "17.2 GB"
    for bad in ("4 parsecs", "-1GB", 0):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    monkeypatch.setenv(BUDGET_ENV, "3GB")
    assert default_budget() == 3 * 10**9
    la = Laplace(make_mlp(), "contrastive", "all", "diag")
    assert la.memory_budget == 3 * 10**9
    la.memory_budget = "1MB"
    assert la.memory_budget == 10**6
    with pytest.raises(ValueError, match="memory size"):
        la.memory_budget = "lots"
    assert chunk_size(10, 100, 350) == 3 and chunk_size(10, 100, 50) == 1
    assert chunk_size(10, 100, 350, batch_size=4) == 4
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            chunk_size(10, 100, 350, batch_size=bad)


def test_named_module_subnetwork_equals_last_layer(device):
    """A subnetwork over a named head module (laplace-torch's ``ModuleNameSubnetMask``) is the
    same posterior as last-layer Laplace when the head is the last layer."""
    from laplace.utils.subnetmask import ModuleNameSubnetMask

    model = make_mlp().to(device)
    indices = ModuleNameSubnetMask(model, ["4"]).select()
    x, y = labelled_data(24, (5,))
    x, y = x.to(device), y.to(device)
    estimators = [
        Laplace(model, "contrastive", "subnetwork", "full", subnetwork_indices=indices),
        Laplace(model, "contrastive", "last_layer", "full"),
    ]
    for la in estimators:
        la.fit(loader(x, y, 8))
    (m_sub, c_sub), (m_ll, c_ll) = (la(x[:6]) for la in estimators)
    assert rel(m_sub, m_ll) < 1e-14 and rel(c_sub, c_ll) < 1e-12
