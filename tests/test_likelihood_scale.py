"""The likelihood scale (how many pairs the fit stands for), the curvature-off control, and
likelihood options given beside a likelihood instance."""

from __future__ import annotations

import math

import pytest
import torch

from laplace_metric import ContrastiveLikelihood
from laplace_metric.controls import curvature_off, without_curvature
from laplace_metric.registry import metric_laplace
from laplace_metric.scores import UncertaintyScorer
from tests.conftest import labelled_data, loader, make_mlp

COMBOS = [(s, h) for s in ("all", "last_layer") for h in ("diag", "kron", "full")]


def fitted(subset, structure, device, batch_size=10, **kwargs):
    x, y = labelled_data(40, (5,), n_classes=4)
    la = metric_laplace(make_mlp().to(device), "contrastive", subset, structure, **kwargs)
    la.fit(loader(x.to(device), y.to(device), batch_size))
    return la, x.to(device)


@pytest.mark.parametrize("subset,structure", COMBOS)
def test_dataset_scale_equals_curvature_and_loss_times_pair_ratio(subset, structure, device):
    """'dataset' multiplies curvature and loss by N(N-1) / sum_b B_b(B_b-1), consistently in
    the marginal likelihood and the predictive (checked against an equivalent temperature)."""
    la, x = fitted(subset, structure, device, likelihood_scale="dataset")
    # 40 samples in batches of 10: 780 pairs stand for 4 * 45 offered ones
    assert la.n_candidate_pairs == 4 * 45
    assert la.likelihood_factor == pytest.approx(780 / 180)
    ref, _ = fitted(subset, structure, device, likelihood_scale="batch", temperature=180 / 780)
    for prior in (0.5, 3.0):
        la.prior_precision = ref.prior_precision = prior
        assert torch.allclose(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
        torch.testing.assert_close(la(x[:4])[1], ref(x[:4])[1])
    batch, _ = fitted(subset, structure, device, likelihood_scale="batch")
    assert batch.likelihood_factor == 1.0
    assert torch.allclose(batch.log_likelihood * 780 / 180, la.log_likelihood)


def test_dataset_scale_does_not_depend_on_the_batch_size():
    """Doubling the batch size doubles the summed curvature; 'dataset' undoes it (to the
    extent that the pairs of the two batchings carry the same curvature on average)."""
    la_small, _ = fitted("last_layer", "full", "cpu", batch_size=10, likelihood_scale="dataset")
    la_large, _ = fitted("last_layer", "full", "cpu", batch_size=20, likelihood_scale="dataset")
    ratio_batch = la_large.H.trace() / la_small.H.trace()
    ratio_scaled = (la_large.likelihood_factor * la_large.H.trace()) / (
        la_small.likelihood_factor * la_small.H.trace()
    )
    assert ratio_batch > 1.6  # about 190/45 offered pairs per batch, 2 vs 4 batches
    assert abs(float(ratio_scaled) - 1) < abs(float(ratio_batch) - 1) / 3


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_composite_scale_counts_each_sample_once(structure, device):
    """'composite' stands for N / 2 pairs (all pairs times 1 / (N - 1)): the same posterior and
    marginal likelihood as the number N / 2, and 1 / (N - 1) of 'dataset'."""
    la, x = fitted("last_layer", structure, device, likelihood_scale="composite")
    assert la.likelihood_factor == pytest.approx(20 / 180)
    as_number, _ = fitted("last_layer", structure, device, likelihood_scale=20.0)
    dataset, _ = fitted("last_layer", structure, device, likelihood_scale="dataset")
    assert la.likelihood_factor == pytest.approx(dataset.likelihood_factor / 39)
    for prior in (0.5, 3.0):
        la.prior_precision = as_number.prior_precision = prior
        assert torch.allclose(la.log_marginal_likelihood(), as_number.log_marginal_likelihood())
        torch.testing.assert_close(la(x[:4])[1], as_number(x[:4])[1])


def test_number_scale_and_bad_values():
    la, _ = fitted("last_layer", "diag", "cpu", likelihood_scale=1800.0)
    assert la.likelihood_factor == pytest.approx(10.0)
    for bad in (0, -1.0, math.inf, "pairs"):
        with pytest.raises(ValueError, match="likelihood_scale"):
            metric_laplace(make_mlp(), "contrastive", "last_layer", "diag", likelihood_scale=bad)


def test_scale_is_saved_and_checked_on_load():
    la, x = fitted("all", "diag", "cpu", likelihood_scale="dataset")
    state = la.state_dict()
    other = metric_laplace(la.model, "contrastive", "all", "diag", likelihood_scale="dataset")
    other.load_state_dict(state)
    assert other.likelihood_factor == la.likelihood_factor
    torch.testing.assert_close(other(x[:3])[1], la(x[:3])[1])
    wrong = metric_laplace(la.model, "contrastive", "all", "diag", likelihood_scale="batch")
    with pytest.raises(ValueError, match="saved with likelihood_scale='dataset'"):
        wrong.load_state_dict(state)


@pytest.mark.parametrize("subset,structure", COMBOS)
def test_curvature_off_is_the_prior_and_is_restored(subset, structure, device):
    la, x = fitted(subset, structure, device, prior_precision=2.0)
    _, cov = la(x[:3])
    with curvature_off(la) as off:
        assert off is la
        _, cov_off = la(x[:3])
        if structure == "diag":
            torch.testing.assert_close(la.posterior_variance, torch.full_like(la.mean, 0.5))
        elif structure == "full":
            eye = torch.eye(len(la.mean), dtype=la.mean.dtype, device=device)
            torch.testing.assert_close(la.posterior_covariance, 0.5 * eye)
    assert not torch.allclose(cov, cov_off)
    torch.testing.assert_close(la(x[:3])[1], cov)  # restored, no stale cached scale
    control = without_curvature(la)
    torch.testing.assert_close(control(x[:3])[1], cov_off)
    torch.testing.assert_close(la(x[:3])[1], cov)


def test_one_scorer_serves_fitted_and_control():
    la, x = fitted("all", "diag", "cpu")
    scorer = UncertaintyScorer(la, database=x[6:], n_samples=5)
    fit = scorer(x[:6])
    with curvature_off(la):
        off = scorer(x[:6])
        off_fresh = UncertaintyScorer(la, database=x[6:], n_samples=5)(x[:6])
    torch.testing.assert_close(off, off_fresh)
    assert not torch.allclose(fit, off)
    torch.testing.assert_close(scorer(x[:6]), fit)


def test_curvature_off_rejects_other_objects():
    with pytest.raises(TypeError, match="laplace-metric estimator"):
        with curvature_off(torch.nn.Linear(2, 2)):
            pass


def test_options_beside_a_likelihood_instance_are_checked():
    lik = ContrastiveLikelihood(margin=0.5, hessian_method="full")
    la = metric_laplace(make_mlp(), lik, "last_layer", "diag", margin=0.5)
    assert la.hessian_method.value == "full"
    with pytest.raises(ValueError, match="hessian_method='fixed'.*would be ignored"):
        metric_laplace(make_mlp(), lik, "last_layer", "diag", hessian_method="fixed")
    with pytest.raises(ValueError, match="margin=1.0"):
        metric_laplace(make_mlp(), lik, "last_layer", "diag", margin=1.0)


def test_isotropic_noise_baseline_picks_sigma_on_validation_and_restores_modes():
    from laplace_metric.baselines import IsotropicNoiseBaseline

    x, _ = labelled_data(40, (5,), n_classes=4)
    encoder = torch.nn.Sequential(make_mlp(), torch.nn.Dropout(0.5)).train()
    noise = 6 * torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    base = IsotropicNoiseBaseline(encoder, sigmas=[0.01, 0.3], n_samples=4)
    base.fit(x[:30], x_val=x[30:], x_val_ood=noise)
    assert base.sigma in (0.01, 0.3) and set(base.validation) == {0.01, 0.3}
    assert encoder.training and encoder[1].training  # modes restored
    score = base.score(x[30:35])
    assert score.shape == (5,) and bool((score > 0).all())
    torch.testing.assert_close(base.score(x[30:35]), score)  # same draws every call
    # sigma -> 0 is the deterministic kNN distance
    tiny = IsotropicNoiseBaseline(encoder, sigmas=1e-12, n_samples=2).fit(x[:30])
    with torch.no_grad():
        z = torch.nn.functional.normalize(encoder.eval()(x), dim=-1)
    torch.testing.assert_close(tiny.score(x[30:]), torch.cdist(z[30:], z[:30]).min(1).values)
    with pytest.raises(ValueError, match="validation data"):
        IsotropicNoiseBaseline(encoder, sigmas=[0.1, 0.2]).fit(x)
    with pytest.raises(ValueError, match="positive"):
        IsotropicNoiseBaseline(encoder, sigmas=[0.0])


def test_isotropic_last_layer_runs_the_backbone_once_and_matches_the_full_path():
    from laplace_metric.baselines import IsotropicNoiseBaseline

    x, _ = labelled_data(30, (5,), n_classes=3)
    encoder = make_mlp()
    fast = IsotropicNoiseBaseline(encoder, sigmas=0.2, parameters="last_layer", n_samples=3)
    slow = IsotropicNoiseBaseline(
        torch.nn.Sequential(encoder, torch.nn.Identity()), 0.2, "last_layer", n_samples=3
    )
    assert fast._split() is not None and slow._split() is None
    fast.fit(x[:20])
    slow.fit(x[:20])
    torch.testing.assert_close(fast.score(x[20:]), slow.score(x[20:]))


def test_online_lam_keeps_its_epoch_scaling():
    from laplace_metric import fit_online_lam

    x, y = labelled_data(24, (5,), n_classes=3)
    la = fit_online_lam(make_mlp(), loader(x, y, 8), "contrastive", "all", "diag", epochs=1)
    assert la.likelihood_scale.value == "batch" and la.likelihood_factor == 1.0
    with pytest.raises(ValueError, match="likelihood_scale='batch' only"):
        fit_online_lam(make_mlp(), loader(x, y, 8), epochs=1, likelihood_scale="dataset")


def test_isotropic_noise_retrieval_confidence_matches_its_definition():
    from laplace_metric.baselines import IsotropicNoiseBaseline

    x, y = labelled_data(40, (5,), n_classes=4)
    encoder = make_mlp().eval()
    base = IsotropicNoiseBaseline(encoder, sigmas=0.3, n_samples=5).fit(x[:30], y[:30])
    result = base.retrieval(x[30:])
    with torch.no_grad():
        z = torch.nn.functional.normalize(encoder(x), dim=-1)
    torch.testing.assert_close(result.predicted, y[:30][torch.cdist(z[30:], z[:30]).argmin(1)])
    sampled = base.samples(x[30:])
    train = base.samples(x[:30])
    top1 = torch.stack([y[:30][torch.cdist(q, t).argmin(1)] for q, t in zip(sampled, train)])
    expected = (top1 == result.predicted).double().mean(0)
    torch.testing.assert_close(result.confidence, expected)
    torch.testing.assert_close(result.knn_distance, base.score(x[30:]))
    # no noise: every draw agrees with the noise-free top-1
    exact = IsotropicNoiseBaseline(encoder, sigmas=1e-12, n_samples=3).fit(x[:30], y[:30])
    assert bool((exact.retrieval(x[30:]).confidence == 1).all())
    with pytest.raises(ValueError, match="training labels"):
        IsotropicNoiseBaseline(encoder, sigmas=0.3).fit(x[:30]).retrieval(x[30:])
    with pytest.raises(ValueError, match="y_train must have shape"):
        IsotropicNoiseBaseline(encoder, sigmas=0.3).fit(x[:30], y[:10])
