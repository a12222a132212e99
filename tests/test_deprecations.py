"""Dead code kept as deprecated public API: it still works and warns."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_metric.bregman import BregmanDivergence, SquaredEuclideanPotential
from laplace_metric.bregman.losses import BregmanContrastiveLoss
from laplace_metric.likelihoods import BregmanLikelihood, ContrastiveLikelihood
from laplace_metric.registry import metric_laplace


def test_pair_terms_contributing_warns_and_keeps_nonzero_signs():
    torch.manual_seed(0)
    terms = ContrastiveLikelihood(margin=0.1).pair_terms(torch.randn(6, 3), torch.arange(6) % 2)
    with pytest.warns(DeprecationWarning, match="contributing"):
        kept = terms.contributing()
    assert bool((kept.signs != 0).all()) and len(kept.signs) == terms.n_contributing


def test_bregman_loss_to_likelihood_warns():
    loss = BregmanContrastiveLoss(BregmanDivergence(SquaredEuclideanPotential(3)), margin=0.5)
    with pytest.warns(DeprecationWarning, match="to_likelihood"):
        lik = loss.to_likelihood()
    assert isinstance(lik, BregmanLikelihood) and lik.margin == 0.5


def test_ignored_model_kwargs_warn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(16, 4), torch.arange(16) % 2
    la = metric_laplace(model, ContrastiveLikelihood(), "last_layer", "diag")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=8))
    with pytest.warns(DeprecationWarning, match="foo"):
        mean, _ = la(x, foo=1)
    assert mean.shape == (16, 2)


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("laplace_metric.datasets", "laplace_metric.data.open_set", "open_set_split"),
        ("laplace_metric.idx", "laplace_metric.data.idx", "load_idx_dataset"),
    ],
)
def test_moved_data_modules_warn_and_re_export(old, new, name):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        shim = importlib.import_module(old)
    moved = importlib.import_module(new)
    assert getattr(shim, name) is getattr(moved, name)
    assert set(shim.__all__) == set(moved.__all__)


@pytest.mark.parametrize(
    "old, name, new, new_name",
    [
        ("laplace_metric.curvature.graph", "PairGraph", "laplace_metric.pairs", "PairGraph"),
        ("laplace_metric.curvature.graph", "fold_gram", "laplace_metric.curvature.folds", None),
        ("laplace_metric.curvature.graph", "fold_linear", "laplace_metric.curvature.folds", None),
        (
            "laplace_metric.curvature.graph",
            "component_buckets",
            "laplace_metric.curvature.folds",
            None,
        ),
        (
            "laplace_metric.curvature.hooks.folds",
            "fold_diag",
            "laplace_metric.curvature.folds",
            None,
        ),
        (
            "laplace_metric.curvature.hooks.folds",
            "structure",
            "laplace_metric.curvature.folds",
            "fold_plan",
        ),
    ],
)
def test_moved_fold_names_warn_and_resolve(old, name, new, new_name):
    """The folds of both old modules are the one :mod:`laplace_metric.curvature.folds`."""
    import importlib

    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=new.rsplit(".", 1)[-1]):
        obj = getattr(module, name)
    assert obj is getattr(importlib.import_module(new), new_name or name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
