"""Stock laplace-torch with BackPACK in the same process never disturbs the plugin's fits."""

from __future__ import annotations

import laplace
import torch
from laplace.curvature import BackPackGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace_metric  # noqa: F401


def test_stock_backpack_before_and_after_plugin_fits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(20, 4), torch.arange(20) % 3
    metric = DataLoader(TensorDataset(x, y), batch_size=10)
    regression = DataLoader(TensorDataset(x, torch.randn(20, 3)), batch_size=10)
    stock = laplace.Laplace(model, "regression", hessian_structure="diag", backend=BackPackGGN)
    stock.fit(regression)  # extends the user's model with BackPACK's hooks
    la = laplace.Laplace(model, "contrastive", hessian_structure="diag")
    la.fit(metric)
    first = la.H.clone()
    mean, var = la(x[:2])
    for structure in ("diag", "kron"):
        other = laplace.Laplace(
            model, "regression", hessian_structure=structure, backend=BackPackGGN
        )
        other.fit(regression)
        other(x[:2])  # a stock GLM prediction
        la.fit(metric)
        assert torch.allclose(la.H, first)
        again_mean, again_var = la(x[:2])
        assert torch.allclose(again_mean, mean) and torch.allclose(again_var, var)
