"""Errors a new user meets name the problem and the fix (first-contact round 2)."""

from __future__ import annotations

import laplace
import pytest
import torch
from pytorch_metric_learning.miners import MultiSimilarityMiner
from torch import nn

from laplace_metric import SelectOutput
from tests.conftest import labelled_data, loader


class _Pair(nn.Module):
    def forward(self, x):
        return x, 2 * x


def test_select_output_index_out_of_range_names_the_valid_keys():
    with pytest.raises(IndexError, match=r"key=5\) is out of range.*key=0 to key=1"):
        SelectOutput(_Pair(), key=5)(torch.randn(2, 3))
    assert torch.equal(SelectOutput(_Pair(), key=-1)(torch.ones(1, 2)), 2 * torch.ones(1, 2))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_string_miner_resolves_by_name_and_unknown_names_list_the_options():
    x, y = labelled_data(12, (5,))
    for name in ("multisimilarity", "MultiSimilarityMiner", "multi_similarity"):
        la = laplace.Laplace(_mlp(), "contrastive", miner=name)
        assert isinstance(la.pair_likelihood.miner, MultiSimilarityMiner)
    la.fit(loader(x, y, 12), progress_bar=False)
    with pytest.raises(ValueError, match="Did you mean miner='MultiSimilarityMiner'.*instance"):
        laplace.Laplace(_mlp(), "contrastive", miner="multisimilarty")
    with pytest.raises(TypeError, match="pytorch-metric-learning miner"):
        laplace.Laplace(_mlp(), "contrastive", miner=3)


def test_likelihood_typo_lists_every_option_and_stock_names_still_work():
    with pytest.raises(ValueError, match="Did you mean likelihood='contrastive'") as err:
        laplace.Laplace(_mlp(), "contrastiv")
    for option in ("contrastive", "bregman", "regression", "classification"):
        assert option in str(err.value)
    with pytest.raises(ValueError, match="Did you mean likelihood='regression'"):
        laplace.Laplace(_mlp(), "regresion")
    stock = laplace.Laplace(_mlp(), "regression", subset_of_weights="all", hessian_structure="diag")
    assert type(stock).__name__ == "DiagLaplace"


class _Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.aux = nn.Linear(3, 2)  # another head, run after the embedding layer

    def forward(self, x):
        z = self.fc(x)
        self.aux(z)
        return z


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = _Trunk()

    def forward(self, x):
        return self.trunk(x)


def test_last_layer_hint_names_a_layer_that_works():
    x, y = labelled_data(12, (5,))
    torch.manual_seed(0)
    model = _Model().double()
    with pytest.raises(ValueError, match="last_layer_name='trunk.fc'"):
        laplace.Laplace(model, "contrastive").fit(loader(x, y, 12), progress_bar=False)
    means = []
    for name in ("trunk.fc", "model.trunk.fc"):
        la = laplace.Laplace(model, "contrastive", last_layer_name=name)
        la.fit(loader(x, y, 12), progress_bar=False)
        assert la.model.last_layer is la.model.model.trunk.fc
        means.append(la(x[:3])[0])
    assert torch.allclose(means[0], means[1])
    with pytest.raises(ValueError, match=r"one of \['trunk.fc', 'trunk.aux'\]"):
        laplace.Laplace(model, "contrastive", last_layer_name="fc")
    la = laplace.Laplace(model, "contrastive", last_layer_name="trunk.aux")
    with pytest.raises(ValueError, match="last_layer_name='trunk.fc'"):
        la.fit(loader(x, y, 12), progress_bar=False)


def test_config_mismatch_on_load_says_saved_and_given():
    x, y = labelled_data(12, (5,))
    la = laplace.Laplace(_mlp(), "contrastive", margin=1.0)
    la.fit(loader(x, y, 12), progress_bar=False)
    other = laplace.Laplace(la.model.model, "contrastive", margin=0.5)
    with pytest.raises(ValueError, match=r"margin: saved 1.0, given 0.5.*\(margin=1.0\)"):
        other.load_state_dict(la.state_dict())
