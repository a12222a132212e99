"""All-layer diag/kron GLM predictive through HookPairGGN's layer-by-layer products equals the
Jacobian path (float64)."""

from __future__ import annotations

import laplace
import pytest
import torch
from torch import nn

import laplace_metric  # noqa: F401
from laplace_metric.curvature import HookPairGGN
from laplace_metric.predictive import jacobian_glm
from laplace_metric.predictive.layer_path import layer_predictor, uses_layer_path


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)
    ).double()


def fitted(structure: str, backend: type, device: torch.device):
    """An all-layer posterior of the small CNN on 12 inputs, and the inputs."""
    x = torch.randn(12, 1, 4, 4, dtype=torch.float64, device=device)
    y = (torch.arange(12) % 3).to(device)
    la = laplace.Laplace(
        cnn().to(device), "contrastive", "all", structure, backend=backend
    )  # fmt: skip
    la.fit([(x, y)])
    la.prior_precision = 0.5
    return la, x


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_layer_path_equals_jacobian_path(structure, device):
    la, x = fitted(structure, HookPairGGN, device)
    assert uses_layer_path(la)
    mean, cov = la(x[:5])
    ref_mean, ref_cov = jacobian_glm(la, x[:5])
    assert torch.allclose(mean, ref_mean, atol=1e-12)
    assert ((cov - ref_cov).abs().max() / ref_cov.abs().max()) < 1e-10
    _, var = la(x[:5], diagonal_output=True)
    assert torch.allclose(var, torch.diagonal(ref_cov, dim1=-2, dim2=-1), rtol=1e-10)


@pytest.mark.parametrize("backend", ["BackPackPairGGN", "AsdlPairGGN", "ReferencePairGGN"])
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_other_backends_predict_layer_by_layer(backend, structure, device):
    """A posterior fitted with BackPACK, ASDL or the reference predicts through a HookPairGGN
    over the same model (made once): equal to the Jacobian path, no Jacobian formed."""
    import laplace_metric.curvature as curvature

    la, x = fitted(structure, getattr(curvature, backend), device)
    ref_mean, ref_cov = jacobian_glm(la, x[:5])
    calls = []
    jacobians = type(la.backend).jacobians
    type(la.backend).jacobians = lambda *a, **k: calls.append(1) or jacobians(*a, **k)
    try:
        mean, cov = la(x[:5])
        _, var = la(x[:5], diagonal_output=True)
    finally:
        type(la.backend).jacobians = jacobians
    assert calls == [] and isinstance(layer_predictor(la), HookPairGGN)
    assert layer_predictor(la) is layer_predictor(la)
    assert torch.allclose(mean, ref_mean, atol=1e-12)
    assert ((cov - ref_cov).abs().max() / ref_cov.abs().max()) < 1e-10
    assert torch.allclose(var, torch.diagonal(ref_cov, dim1=-2, dim2=-1), rtol=1e-10)


@pytest.mark.filterwarnings("ignore:Falling back to the slower exact ReferencePairGGN")
def test_unsupported_models_keep_the_jacobian_path():
    """BatchNorm without running statistics: the hook backend cannot predict; Jacobians do."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)
    ).double()
    la = laplace.Laplace(model, "contrastive", subset_of_weights="all", hessian_structure="diag")
    assert layer_predictor(la) is None and not uses_layer_path(la)
