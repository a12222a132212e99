"""Bad input gives clear errors, never a NaN posterior."""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from laplace.curvature import BackPackGGN

from tests.conftest import labelled_data, loader, make_mlp


def fitted(**kwargs):
    la = Laplace(make_mlp(), "contrastive", "all", "diag", **kwargs)
    x, y = labelled_data(12, (5,))
    la.fit(loader(x, y, 6))
    return la


def test_unknown_options():
    model = make_mlp()
    with pytest.raises(ValueError, match="hessian_method 'exact'"):
        Laplace(model, "contrastive", "all", "diag", hessian_method="exact")
    with pytest.raises(ValueError, match="margin"):
        Laplace(model, "contrastive", "all", "diag", margin=-1)
    with pytest.raises(ValueError, match="divergence"):
        Laplace(model, "contrastive", "all", "diag", divergence=torch.nn.Identity())
    with pytest.raises(TypeError, match="pairwise curvature backend"):
        Laplace(model, "contrastive", "all", "diag", backend=BackPackGGN)
    with pytest.raises(ValueError, match="Invalid likelihood"):
        Laplace(model, "contrastiv", "all", "diag")


@pytest.mark.parametrize("structure", ["lowrank", "gp"])
def test_unsupported_structures_name_supported_ones(structure):
    with pytest.raises(ValueError, match=r"supported: .*\('all', 'diag'\)"):
        Laplace(make_mlp(), "contrastive", "all", structure)
    with pytest.raises(ValueError, match="subnetwork"):
        Laplace(make_mlp(), "contrastive", "subnetwork", "kron", subnetwork_indices=torch.arange(3))


def test_no_valid_pair_raises_and_leaves_fit_unchanged():
    la = fitted()
    h_before = la.H.clone()
    x, _ = labelled_data(6, (5,))
    distinct = torch.arange(6)  # no positive pair
    with pytest.raises(ValueError, match="No pair contributed"):
        la.fit(loader(x, distinct, 3))
    assert torch.equal(la.H, h_before)


def test_single_sample_batches_are_skipped_with_warning():
    x, y = labelled_data(13, (5,))
    la = Laplace(make_mlp(), "contrastive", "all", "diag")
    with pytest.warns(UserWarning, match="contributed no pair"):
        la.fit(loader(x, y, 6))  # last batch has one sample


def test_single_class_batches_warn_for_signed_methods():
    x, _ = labelled_data(12, (5,))
    y = torch.tensor([0] * 6 + [1] * 6)
    la = Laplace(make_mlp(), "contrastive", "all", "diag", hessian_method="full")
    with pytest.warns(UserWarning, match="single class"):
        la.fit(loader(x, y, 6))
    assert torch.isfinite(la.H).all()


def test_nan_inputs_and_bad_labels():
    la = Laplace(make_mlp(), "contrastive", "all", "diag")
    x, y = labelled_data(12, (5,))
    x_nan = x.clone()
    x_nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        la.fit(loader(x_nan, y, 6))
    with pytest.raises(TypeError, match="integer class ids"):
        la.fit(loader(x, y.double(), 6))
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        la.fit(loader(x, torch.stack([y, y], 1), 6))
    with pytest.raises(ValueError, match="empty"):
        la.fit([])
    with pytest.raises(AttributeError, match="not fitted"):
        la(x)
    fit = fitted()
    with pytest.raises(ValueError, match="NaN or inf"):
        fit(x_nan)


def test_zero_norm_embedding_and_non_2d_output():
    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 3).double()

        def forward(self, x):
            return self.lin(x) * 0

    x, y = labelled_data(6, (5,))
    with (
        pytest.warns(UserWarning, match="Falling back"),
        pytest.raises(ValueError, match="zero norm"),
    ):
        Laplace(Zero(), "contrastive", "all", "diag").fit(loader(x, y, 6))
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Unflatten(1, (2, 3))).double()
    with pytest.warns(UserWarning, match="Falling back"):
        la = Laplace(model, "contrastive", "all", "diag")
    with pytest.raises(ValueError, match=r"shape \(batch, D\)"):
        la.fit(loader(x, y, 6))


def test_bad_pred_type():
    la = fitted()
    x, _ = labelled_data(3, (5,))
    with pytest.raises(ValueError, match="pred_type"):
        la(x, pred_type="softmax")
    with pytest.raises(ValueError, match="score"):
        la.predictive_uncertainty(x, score="entropy")
