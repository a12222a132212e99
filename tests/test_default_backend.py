"""``default_backend``: BackPACK when it supports the model, else HookPairGGN, else the reference,
with a warning naming the backend and the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from laplace_metric.curvature import (
    BackPackPairGGN,
    HookPairGGN,
    ReferencePairGGN,
    default_backend,
)

torch.set_num_threads(1)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.nn.functional.softplus(self.fc(x))


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten()),
    ],
)
@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_backpack_when_supported(model, structure):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_backend(model, structure) is BackPackPairGGN


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_hooks_for_a_custom_forward(structure):
    """BackPACK supports a residual model only through its (slow) converter: hooks are used."""
    model = nn.Sequential(nn.Linear(4, 4), Residual(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="custom forward") as record:
        assert default_backend(model, structure) is HookPairGGN
    assert len(record) == 1 and "HookPairGGN" in str(record[0].message)


@pytest.mark.parametrize(
    "model, layer",
    [
        (nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 3)), "Softplus"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()), "groups=2"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), "LayerNorm"),
        (Functional(), "softplus"),
    ],
)
def test_hooks_with_warning_naming_the_layer(model, layer):
    with pytest.warns(UserWarning, match=layer) as record:
        assert default_backend(model, "diag") is HookPairGGN
    assert "HookPairGGN" in str(record[0].message)


@pytest.mark.parametrize(
    "model, structure, reason",
    [
        (
            nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)),
            "diag",
            "track_running_stats",
        ),
        (nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 2)), "kron", "'0.weight'"),
    ],
)
def test_reference_when_hooks_cannot(model, structure, reason):
    with pytest.warns(UserWarning, match=reason) as record:
        assert default_backend(model, structure) is ReferencePairGGN
    assert "ReferencePairGGN" in str(record[0].message)


def test_last_layer_only_checks_the_last_layer():
    model = nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_backend(model, "diag", last_layer=True) is BackPackPairGGN


def test_user_model_not_extended():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    default_backend(model, "diag")
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
