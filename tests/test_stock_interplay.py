"""Stock laplace-torch with BackPACK in the same process never disturbs the plugin's fits."""

from __future__ import annotations

import laplace
import pytest
import torch
from laplace.curvature import BackPackGGN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace_metric  # noqa: F401

# stock BackPACK's own backward passes on inputs without grad: expected, not ours
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


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


def _data():
    torch.manual_seed(0)
    x, y = torch.randn(20, 4), torch.arange(20) % 3
    metric = DataLoader(TensorDataset(x, y), batch_size=10)
    regression = DataLoader(TensorDataset(x, torch.randn(20, 3)), batch_size=10)
    return x, metric, regression


def _stock_fit_and_predict(model, regression, x, subset, structure):
    stock = laplace.Laplace(
        model,
        "regression",
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=BackPackGGN,
    )
    stock.fit(regression)
    stock(x[:2])  # GLM: BackPACK Jacobians, then BackPACK's global hook removal
    stock(x[:2], pred_type="nn", link_approx="mc", n_samples=3)
    return stock


def _plugin_outputs(la, x):
    scorer = laplace_metric.UncertaintyScorer(la, x, n_samples=4)
    scores = scorer.scores(x[:3], ["posterior_knn", "sampled_std"])
    return la.H, la(x[:2]), scores


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_same_estimator_refits_predicts_and_scores_after_stock_backpack(subset, structure):
    """Plugin first, stock BackPACK all-layer fits and predictions, then the SAME plugin
    estimator refits (it failed: 'BackPACK computed nothing for parameter 0.weight')."""
    x, metric, regression = _data()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    la = laplace.Laplace(
        model, "contrastive", subset_of_weights=subset, hessian_structure=structure
    )
    la.fit(metric, progress_bar=False)
    H, (mean, var), scores = _plugin_outputs(la, x)
    H = H.clone() if isinstance(H, torch.Tensor) else [f.clone() for f in la.H_facs.kfacs[0]]
    _stock_fit_and_predict(model, regression, x, "all", structure)
    la.fit(metric, progress_bar=False)
    H2, (mean2, var2), scores2 = _plugin_outputs(la, x)
    if isinstance(H, torch.Tensor):
        assert torch.allclose(H2, H)
    assert torch.allclose(mean2, mean) and torch.allclose(var2, var)
    for name in scores:
        assert torch.allclose(scores2[name], scores[name]), name
    # and stock still works after the plugin's refit
    stock = _stock_fit_and_predict(model, regression, x, "all", structure)
    assert torch.isfinite(stock(x[:2])[1]).all()


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_stock_backpack_first_then_plugin_then_stock_again(structure):
    x, metric, regression = _data()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    stock = _stock_fit_and_predict(model, regression, x, "all", structure)
    reference = stock(x[:2])[1].clone()
    la = laplace.Laplace(model, "contrastive", subset_of_weights="all", hessian_structure=structure)
    la.fit(metric, progress_bar=False)
    first = _plugin_outputs(la, x)
    fresh = _stock_fit_and_predict(model, regression, x, "all", structure)
    assert torch.allclose(fresh(x[:2])[1], reference)  # the plugin left stock unchanged
    la.fit(metric, progress_bar=False)
    again = _plugin_outputs(la, x)
    assert torch.allclose(again[1][1], first[1][1])
    for name in first[2]:
        assert torch.allclose(again[2][name], first[2][name]), name
