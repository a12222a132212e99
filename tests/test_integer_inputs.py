"""Encoders with integer inputs (token ids through ``nn.Embedding``) in the reference backend."""

from __future__ import annotations

import laplace
import pytest
import torch
from torch import nn

import laplace_metric  # noqa: F401
from laplace_metric.curvature import ReferencePairGGN


def token_encoder(freeze_embedding: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3)).double()
    model[0].weight.requires_grad_(not freeze_embedding)
    return model


def test_kron_with_frozen_embedding_and_integer_inputs():
    x = torch.randint(0, 10, (12, 3))
    y = torch.arange(12) % 3
    la = laplace.Laplace(
        token_encoder(freeze_embedding=True),
        "contrastive",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=ReferencePairGGN,
    )
    la.fit([(x, y)])
    mean, cov = la(x[:2])
    assert mean.shape == (2, 3) and bool(torch.isfinite(cov).all())


def test_kron_with_trainable_embedding_names_the_parameter():
    x = torch.randint(0, 10, (12, 3))
    y = torch.arange(12) % 3
    la = laplace.Laplace(
        token_encoder(freeze_embedding=False),
        "contrastive",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=ReferencePairGGN,
    )
    with pytest.raises(ValueError, match="Embedding"):
        la.fit([(x, y)])
    diag = laplace.Laplace(
        token_encoder(freeze_embedding=False),
        "contrastive",
        subset_of_weights="all",
        hessian_structure="diag",
        backend=ReferencePairGGN,
    )
    diag.fit([(x, y)])
    assert bool(torch.isfinite(diag.H).all())
