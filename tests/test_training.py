"""Online LAM."""

from __future__ import annotations

import io

import pytest
import torch
from laplace import Laplace

from laplace_metric.training import PriorUpdate, fit_online_lam
from tests.conftest import labelled_data, loader, make_mlp


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_decay_zero_single_batch_equals_posthoc_fit(structure):
    """With no averaging and one batch per epoch, the curvature is the post-hoc one."""
    x, y = labelled_data(12, (5,))
    data = loader(x, y, 12)
    model = make_mlp()
    la = fit_online_lam(
        model,
        data,
        hessian_structure=structure,
        epochs=2,
        decay=0.0,
        prior_update="fixed",
        lr=1e-2,
        hessian_method="full",
        margin=1.5,
    )
    posthoc = Laplace(model, "contrastive", "all", structure, hessian_method="full", margin=1.5)
    posthoc.fit(data)
    if structure == "kron":
        for f1, f2 in zip(la.H_facs.kfacs, posthoc.H_facs.kfacs):
            for a, b in zip(f1, f2):
                assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    else:
        assert torch.allclose(la.H, posthoc.H, rtol=1e-9, atol=1e-12)
    assert torch.equal(la.mean, posthoc.mean)


@pytest.mark.parametrize("subset,structure", [("all", "diag"), ("last_layer", "kron")])
def test_online_lam_trains_and_returns_fitted_estimator(subset, structure, device):
    x, y = labelled_data(48, (5,))
    data = loader(x.to(device), y.to(device), 12)
    model = make_mlp().to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    la = fit_online_lam(
        model,
        data,
        subset_of_weights=subset,
        hessian_structure=structure,
        epochs=4,
        lr=1e-2,
        generator=gen,
    )
    history = la.training_history
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"]
    mean, cov = la(x[:3].to(device))
    assert mean.shape == (3, 3) and torch.isfinite(cov).all()
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["n_data"] == 48


def test_online_lam_bad_options():
    x, y = labelled_data(12, (5,))
    with pytest.raises(ValueError, match="prior_update"):
        fit_online_lam(make_mlp(), loader(x, y, 6), prior_update="always")
    with pytest.raises(ValueError, match="decay"):
        fit_online_lam(make_mlp(), loader(x, y, 6), decay=1.0)
    with pytest.raises(ValueError, match="empty"):
        fit_online_lam(make_mlp(), [])


def test_online_lam_final_prior_update_trains_fixed_then_tunes_once():
    x, y = labelled_data(24, (5,))
    la = fit_online_lam(
        make_mlp(), loader(x, y, 8), epochs=2, prior_update="final", prior_precision=1e3
    )
    assert all(float(h["prior_precision"]) == 1e3 for h in la.training_history)
    tuned = float(la.prior_precision)
    assert tuned != pytest.approx(1e3)
    lml_tuned = float(la.log_marginal_likelihood())
    lml_fixed = float(la.log_marginal_likelihood(prior_precision=torch.tensor([1e3])))
    assert lml_tuned > lml_fixed


def test_online_lam_prior_update_enum():
    assert PriorUpdate("final") is PriorUpdate.FINAL
    x, y = labelled_data(12, (5,))
    with pytest.raises(ValueError, match="'fixed', 'marglik', 'final'"):
        fit_online_lam(make_mlp(), loader(x, y, 6), prior_update="sometimes")


def test_online_lam_update_every_samples_from_the_first_curvature():
    """With ``update_every > 1`` the second step already samples from the first curvature
    (it used to fail with 'not fitted' because the posterior was only set every k steps)."""
    x, y = labelled_data(24, (5,))
    la = fit_online_lam(make_mlp(), loader(x, y, 6), epochs=2, update_every=3)
    assert len(la.training_history) == 2
    assert torch.isfinite(la.posterior_precision).all()
