"""Fitting, prediction, sampling and serialisation of every plugin estimator."""

from __future__ import annotations

import io

import pytest
import torch
from laplace import Laplace
from pytorch_metric_learning.miners import BatchHardMiner, MultiSimilarityMiner, TripletMarginMiner

from laplace_metric import ContrastiveLikelihood, PositivePairGaussianNLL
from laplace_metric.mining import all_pairs, mine_pairs, pairs_from_miner_output
from tests.conftest import labelled_data, loader, make_mlp

COMBOS = [
    (subset, structure)
    for subset in ("all", "last_layer", "subnetwork")
    for structure in ("diag", "kron", "full")
    if not (subset == "subnetwork" and structure == "kron")
]


def build(subset, structure, device, **kwargs):
    model = make_mlp().to(device)
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = torch.arange(0, 60, 3, device=device)
    return model, Laplace(
        model, "contrastive", subset_of_weights=subset, hessian_structure=structure, **kwargs
    )


@pytest.mark.parametrize("subset,structure", COMBOS)
def test_fit_predict_sample_roundtrip(subset, structure, device):
    model, la = build(subset, structure, device, margin=0.8, hessian_method="full")
    x, y = labelled_data(24, (5,))
    x, y = x.to(device), y.to(device)
    la.fit(loader(x, y, 8))
    la.optimize_prior_precision(method="marglik", n_steps=10)
    mean, cov = la(x[:5])
    assert mean.shape == (5, 3) and cov.shape == (5, 3, 3)
    assert torch.allclose(mean.norm(dim=-1), torch.ones(5, dtype=mean.dtype, device=device))
    # the covariance of a normalised embedding has no radial component
    assert torch.einsum("bd,bde->be", mean, cov).abs().max() < 1e-10
    assert torch.isfinite(cov).all() and (torch.linalg.eigvalsh(cov) > -1e-12).all()
    nn_mean, nn_cov = la(x[:5], pred_type="nn", n_samples=30)
    assert nn_mean.shape == (5, 3) and nn_cov.shape == (5, 3, 3)
    samples = la.predictive_samples(x[:5], n_samples=11)
    assert samples.shape == (11, 5, 3)
    assert torch.allclose(
        samples.norm(dim=-1), torch.ones(11, 5, dtype=samples.dtype, device=device)
    )
    nn_samples = la.predictive_samples(x[:5], pred_type="nn", n_samples=4)
    assert torch.allclose(
        nn_samples.norm(dim=-1), torch.ones(4, 5, dtype=samples.dtype, device=device)
    )
    scores = la.predictive_uncertainty(x[:5])
    assert torch.allclose(scores, cov.diagonal(dim1=1, dim2=2).sum(-1))
    # weights are restored after sampling
    assert torch.equal(la(x[:5])[0], mean)

    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["likelihood"] == "contrastive" and type(state["likelihood"]) is str
    _, fresh = build(subset, structure, device, margin=0.8, hessian_method="full")
    fresh.load_state_dict(state)
    mean2, cov2 = fresh(x[:5])
    assert torch.allclose(mean2, mean) and torch.allclose(cov2, cov, rtol=1e-10, atol=1e-14)


def test_load_state_dict_rejects_other_configuration():
    model, la = build("all", "diag", "cpu", margin=0.8)
    x, y = labelled_data(12, (5,))
    la.fit(loader(x, y, 6))
    other = Laplace(model, "contrastive", "all", "diag", margin=0.5)
    with pytest.raises(ValueError, match="margin"):
        other.load_state_dict(la.state_dict())


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("method", ["positives", "full"])
def test_override_false_equals_one_fit_on_union(structure, method):
    x, y = labelled_data(24, (5,))
    _, one = build("all", structure, "cpu", hessian_method=method)
    one.fit(loader(x, y, 6))
    _, two = build("all", structure, "cpu", hessian_method=method)
    two.fit(loader(x[:12], y[:12], 6))
    two.fit(loader(x[12:], y[12:], 6), override=False)
    if structure == "kron":
        for f1, f2 in zip(one.H_facs.kfacs, two.H_facs.kfacs):
            for a, b in zip(f1, f2):
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    else:
        assert torch.allclose(one.H, two.H, rtol=1e-12, atol=1e-14)
    assert torch.allclose(one.loss, two.loss) and one.n_data == two.n_data == 24


def test_gridsearch_default_and_custom_objective():
    _, la = build("all", "diag", "cpu")
    x, y = labelled_data(24, (5,))
    la.fit(loader(x, y, 8))
    la.optimize_prior_precision(method="gridsearch", val_loader=loader(x, y, 8), grid_size=7)
    assert la.prior_precision.numel() == 1
    calls = []

    def prefer_largest_trace(means, covs, labels):
        calls.append(covs.shape)
        return -covs.diagonal(dim1=1, dim2=2).sum()

    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=loader(x, y, 8),
        loss=prefer_largest_trace,
        grid_size=5,
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
    )
    assert len(calls) == 5 and float(la.prior_precision) == pytest.approx(1e-2)


def test_positive_pair_gaussian_nll_hand_computed():
    means = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    covs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    nll = PositivePairGaussianNLL(eps=0.0)(means, covs, labels)
    # one positive pair, d = (-1, 0), var = (1, 1): 1/2 * 1 + 0 + log(2 pi)
    assert float(nll) == pytest.approx(0.5 + torch.log(torch.tensor(2 * torch.pi)).item())
    full = PositivePairGaussianNLL(eps=0.0)(means, torch.diag_embed(covs), labels)
    assert float(full) == pytest.approx(float(nll))


def test_all_pairs_and_pml_miners():
    labels = torch.tensor([0, 0, 1, 1, 2])
    pairs = all_pairs(labels)
    assert len(pairs) == 10 and pairs.n_positive == 2
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    for miner in (MultiSimilarityMiner(epsilon=0.5), TripletMarginMiner(margin=2.0)):
        mined = mine_pairs(labels, emb, miner)
        assert torch.equal(mined.positive, labels[mined.first] == labels[mined.second])
    lik = ContrastiveLikelihood(miner=TripletMarginMiner(margin=2.0))
    assert lik.loss(torch.randn(5, 3), labels) >= 0


def test_miner_pairs_are_unordered_and_unique():
    """pml pair miners list each pair in both orders; each unordered pair must count once."""
    labels = torch.tensor([0, 0, 1, 1, 2])
    both_orders = (
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([1, 0, 3, 2]),
        torch.tensor([0, 4, 4]),
        torch.tensor([4, 0, 0]),
    )
    pairs = pairs_from_miner_output(both_orders, labels)
    got = sorted(zip(pairs.first.tolist(), pairs.second.tolist(), pairs.positive.tolist()))
    assert got == [(0, 1, True), (0, 4, False), (2, 3, True)]
    # A miner that returns every pair agrees with ``all_pairs`` exactly.
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    mined = mine_pairs(labels, emb, MultiSimilarityMiner(epsilon=10.0))
    reference = all_pairs(labels)
    assert len(mined) == len(reference) == 10
    assert torch.equal(mined.positive.sum(), reference.positive.sum())


def test_miner_is_used_in_fit():
    x, y = labelled_data(24, (5,))
    # The hardest positive and negative per anchor: a strict subset of all pairs.
    _, la = build("all", "diag", "cpu", miner=BatchHardMiner())
    la.fit(loader(x, y, 8))
    _, la_all = build("all", "diag", "cpu")
    la_all.fit(loader(x, y, 8))
    assert 0 < la.n_pairs < la_all.n_pairs


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_full_logdet_from_cached_eigenvalues(subset):
    _, la = build(subset, "full", "cpu", hessian_method="full")
    x, y = labelled_data(24, (5,))
    la.fit(loader(x, y, 8))
    prior = torch.tensor([0.37], dtype=torch.float64, requires_grad=True)
    la.prior_precision = prior
    c = la.likelihood_factor  # the default 'dataset' scale
    eye = torch.eye(la.H.shape[0], dtype=torch.float64)
    expected = torch.logdet(c * la.H + 0.37 * eye)
    got = la.log_det_posterior_precision
    assert torch.allclose(got, expected, rtol=1e-10)
    (grad,) = torch.autograd.grad(got, prior)
    expected_grad = torch.linalg.inv(c * la.H + 0.37 * eye).trace()
    assert torch.allclose(grad, expected_grad.reshape(1), rtol=1e-8)
    la.prior_precision = torch.full(
        (la.n_params,), 0.5, dtype=torch.float64
    )  # diagonal prior: stock path
    assert torch.allclose(la.log_det_posterior_precision, torch.logdet(la.posterior_precision))


@pytest.mark.parametrize(
    "subset,structure,prior_structure,size",
    [
        ("all", "diag", "layerwise", 6),
        ("all", "diag", "diag", None),
        ("all", "kron", "layerwise", 6),
        ("last_layer", "diag", "diag", None),
        ("last_layer", "kron", "layerwise", "last-layer"),
        ("last_layer", "full", "layerwise", "last-layer"),
        ("last_layer", "kron", "diag", "Kronecker"),
        ("all", "kron", "diag", "Kronecker"),
    ],
)
def test_prior_structures_allowed_or_named(subset, structure, prior_structure, size):
    _, la = build(subset, structure, "cpu")
    x, y = labelled_data(24, (5,))
    la.fit(loader(x, y, 8))
    if isinstance(size, str):  # refused before any optimisation step, naming why
        with pytest.raises(ValueError, match=f"prior_structure='{prior_structure}'.*{size}"):
            la.optimize_prior_precision(method="marglik", prior_structure=prior_structure)
        return
    la.optimize_prior_precision(method="marglik", prior_structure=prior_structure, n_steps=5)
    expected = la.n_params if size is None else size
    assert la.prior_precision.numel() == expected
    assert torch.isfinite(la.log_marginal_likelihood())


def test_prior_structure_typo_is_named():
    _, la = build("all", "diag", "cpu")
    x, y = labelled_data(24, (5,))
    la.fit(loader(x, y, 8))
    with pytest.raises(ValueError, match="prior_structure"):
        la.optimize_prior_precision(prior_structure="per-layer")
