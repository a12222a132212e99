"""The uncertainty entry point: named scores, the database cache, and brute-force checks."""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from torch.nn.utils import vector_to_parameters

from laplace_metric import PosteriorScore, UncertaintyScorer, posterior_retrieval
from tests.conftest import labelled_data, loader, make_mlp


@pytest.fixture(scope="module")
def fitted():
    x, y = labelled_data(40, (5,), n_classes=3)
    la = Laplace(make_mlp(), "contrastive", "all", "diag")
    la.fit(loader(x, y, 20))
    return la, x, y


def brute_force_embeddings(la, x, n_samples, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    params = la._posterior_parameters()
    with torch.no_grad():
        for sample in la.sample(n_samples, gen):
            vector_to_parameters(sample, params)
            out.append(torch.nn.functional.normalize(la.model(x), dim=-1))
    vector_to_parameters(la.mean, params)
    return torch.stack(out)


def test_default_is_posterior_knn_and_matches_brute_force(fitted):
    la, x, y = fitted
    queries, database = x[:7], x[7:]
    scorer = UncertaintyScorer(la, database=database, n_samples=6)
    z_q = brute_force_embeddings(la, queries, 6)
    z_db = brute_force_embeddings(la, database, 6)
    expected_knn = torch.cdist(z_q, z_db).min(-1).values.mean(0)
    torch.testing.assert_close(scorer(queries), expected_knn)
    torch.testing.assert_close(scorer(queries, "posterior_knn"), expected_knn)
    # LAM's score: sum over dimensions of the per-dimension std of the normalised samples
    torch.testing.assert_close(scorer(queries, "sampled_std"), z_q.std(0).sum(-1))
    torch.testing.assert_close(scorer(queries, "trace"), la.predictive_uncertainty(queries))
    both = scorer.scores(queries)
    assert set(both) == {s.value for s in PosteriorScore}


def test_database_is_embedded_once_per_posterior(fitted, monkeypatch):
    la, x, y = fitted
    scorer = UncertaintyScorer(la, database=x[7:], n_samples=4)
    calls = []
    handle = la.model.register_forward_pre_hook(lambda mod, args: calls.append(len(args[0])))
    first = scorer(x[:5])
    n_db = len(x) - 7
    assert calls.count(n_db) == 4 + 1  # one per weight sample, plus the posterior mean
    calls.clear()
    again = scorer(x[:5])
    scorer(x[5:7])
    assert n_db not in calls  # cached: repeated queries do not re-embed the database
    torch.testing.assert_close(first, again)  # the same weight samples every call
    # a new posterior (prior precision) invalidates the cache
    la.prior_precision = 3.0
    try:
        changed = scorer(x[:5])
        assert calls.count(n_db) == 4 + 1
        assert not torch.allclose(changed, first)
    finally:
        la.prior_precision = 1.0
        handle.remove()


def test_retrieval_matches_posterior_retrieval(fitted):
    la, x, y = fitted
    gen = torch.Generator().manual_seed(3)
    one_shot = posterior_retrieval(la, x[:8], x[8:], y[8:], n_samples=5, generator=gen)
    scorer = UncertaintyScorer(
        la, x[8:], y[8:], n_samples=5, generator=torch.Generator().manual_seed(3)
    )
    result = scorer.retrieval(x[:8])
    torch.testing.assert_close(result.knn_distance, one_shot.knn_distance)
    torch.testing.assert_close(result.confidence, one_shot.confidence)
    assert ((result.confidence >= 0) & (result.confidence <= 1)).all()
    # the top-1 label at the mean
    with torch.no_grad():
        z = torch.nn.functional.normalize(la.model(x), dim=-1)
    expected = y[8:][torch.cdist(z[:8], z[8:]).argmin(-1)]
    assert torch.equal(result.predicted, expected)


def test_scorer_errors(fitted):
    la, x, y = fitted
    with pytest.raises(ValueError, match="needs a database"):
        UncertaintyScorer(la)(x)
    assert UncertaintyScorer(la, n_samples=3)(x, "sampled_std").shape == (len(x),)
    with pytest.raises(ValueError, match="Unknown score 'entropy'"):
        UncertaintyScorer(la, x)(x, "entropy")
    with pytest.raises(TypeError, match="dtype torch.float32"):
        UncertaintyScorer(la, x)(x.float())
    with pytest.raises(ValueError, match="k must be in"):
        UncertaintyScorer(la, x, k=0)
    with pytest.raises(ValueError, match="n_samples"):
        UncertaintyScorer(la, x, n_samples=1)
    with pytest.raises(AttributeError, match="not fitted"):
        UncertaintyScorer(Laplace(make_mlp(), "contrastive", "all", "diag"), x)


def test_a_registered_score_is_accepted_by_name(fitted):
    from laplace_metric.scores import SCORES, Score, register_score

    la, x, y = fitted

    @register_score("max_std")
    class MaxStd(Score):
        needs_samples = True

        def __call__(self, scorer, x, sampled):
            return sampled.std(0).max(-1).values

    try:
        scorer = UncertaintyScorer(la, n_samples=4)
        both = scorer.scores(x[:6], ["sampled_std", "max_std"])
        assert both["max_std"].shape == (6,)
        assert bool((both["max_std"] <= both["sampled_std"] + 1e-12).all())
        with pytest.raises(ValueError, match="already registered"):
            register_score("trace")(MaxStd)
    finally:
        del SCORES["max_std"]
    with pytest.raises(ValueError, match="Unknown score 'max_std'"):
        UncertaintyScorer(la, n_samples=4)(x, "max_std")


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_weight_noise_that_overflows_the_network_is_named(subset):
    """Weight samples so wide that the float32 encoder returns inf: the error names the
    prior precision and the fix, not the inputs."""
    x, y = labelled_data(12, (5,), n_classes=3)
    model = make_mlp(5, 7, 3).float()
    la = Laplace(model, "contrastive", subset_of_weights=subset, hessian_structure="diag")
    la.fit(loader(x.float(), y, 6))
    la.prior_precision = 1e-90  # weight standard deviation 1e45: beyond float32
    scorer = UncertaintyScorer(la, database=x.float(), n_samples=2)
    with pytest.raises(ValueError, match=r"under a posterior weight sample.*prior precision"):
        scorer(x.float())


@pytest.mark.parametrize(
    ("subset", "structure"), [("all", "diag"), ("all", "kron"), ("last_layer", "kron")]
)
def test_variance_ratio_is_fitted_over_prior_predictive_trace(subset, structure, device):
    """Against float64 torch.func Jacobians of the normalised embedding: the fitted posterior's
    GLM trace over the prior's ``tr(J J^T) / prior_precision``; 1 with the curvature off.
    All-layer posteriors take both traces from one set of backward passes."""
    from torch.func import functional_call, jacrev

    from laplace_metric.controls import curvature_off
    from laplace_metric.predictive.layer_path import uses_layer_path

    x, y = labelled_data(30, (5,), n_classes=3)
    model = make_mlp().double().to(device)
    x, y = x.double().to(device), y.to(device)
    la = Laplace(model, "contrastive", subset, structure)
    la.fit(loader(x, y, 15))
    la.prior_precision = 2.0
    queries = torch.cat([x[:4], 5 * torch.randn(3, 5, dtype=x.dtype, device=device)])
    scorer = UncertaintyScorer(la, n_samples=3, generator=torch.Generator(device).manual_seed(0))
    ratio = scorer(queries, "variance_ratio")

    names = [n for n, _ in model.named_parameters()]
    if subset == "last_layer":
        names = names[-2:]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def embed(theta, q):
        return torch.nn.functional.normalize(functional_call(model, {**params, **theta}, (q,)))

    jac = jacrev(embed)({n: params[n] for n in names}, queries)
    J = torch.cat([jac[n].flatten(start_dim=2) for n in names], dim=2)  # (n, D, P)
    prior_trace = J.square().sum((1, 2)) / 2.0
    cov = torch.linalg.inv(
        la.posterior_precision.to_matrix()
        if structure == "kron"
        else torch.diag(la.posterior_precision)
    )
    fitted_trace = torch.einsum("ndp,pq,ndq->n", J, cov, J)
    torch.testing.assert_close(ratio, fitted_trace / prior_trace, rtol=1e-8, atol=1e-12)
    assert ((ratio > 0) & (ratio <= 1 + 1e-12)).all()  # the curvature only removes variance
    assert uses_layer_path(la.predictive_view(), queries) == (subset == "all")
    small = UncertaintyScorer(la, n_samples=3, batch_size=2)  # queries in chunks of two
    torch.testing.assert_close(small(queries, "variance_ratio"), ratio, rtol=1e-10, atol=0)
    with curvature_off(la):
        torch.testing.assert_close(scorer(queries, "variance_ratio"), torch.ones_like(ratio))
    # the estimator is left as it was
    assert la.temperature == 1.0
    torch.testing.assert_close(scorer(queries, "variance_ratio"), ratio)


@pytest.mark.parametrize(("subset", "structure"), [("all", "diag"), ("last_layer", "kron")])
def test_knn_variance_ratio_is_knn_times_ratio_and_its_control_is_knn(subset, structure, device):
    """The product of the two registered scores from the same weight samples; with the curvature
    off the ratio is exactly 1, so the control is the default score."""
    from laplace_metric.controls import curvature_off

    x, y = labelled_data(30, (5,), n_classes=3)
    x, y = x.to(device), y.to(device)
    la = Laplace(make_mlp().to(device), "contrastive", subset, structure)
    la.fit(loader(x, y, 15))
    la.prior_precision = 2.0
    queries = torch.cat([x[:4], 5 * torch.randn(3, 5, device=device)])
    scorer = UncertaintyScorer(la, database=x[10:], n_samples=4)
    combined = scorer(queries, "knn_variance_ratio")
    knn, ratio = scorer(queries), scorer(queries, "variance_ratio")
    torch.testing.assert_close(combined, knn * ratio)
    assert (ratio < 1).all() and combined.shape == (7,)
    with curvature_off(la):
        torch.testing.assert_close(scorer(queries, "variance_ratio"), torch.ones_like(ratio))
        torch.testing.assert_close(scorer(queries, "knn_variance_ratio"), scorer(queries))
    with pytest.raises(ValueError, match="needs a database"):
        UncertaintyScorer(la, n_samples=2)(queries, "knn_variance_ratio")


def test_scores_computes_each_factor_of_a_product_once(fitted, monkeypatch):
    """Asked beside its factors, ``'knn_variance_ratio'`` reuses them: one variance ratio."""
    from laplace_metric.scores.variance_ratio import VarianceRatioScore

    la, x, y = fitted
    scorer = UncertaintyScorer(la, database=x[7:], n_samples=3)
    calls = []
    original = VarianceRatioScore.__call__

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(VarianceRatioScore, "__call__", counted)
    both = scorer.scores(x[:5], ["variance_ratio", "knn_variance_ratio", "posterior_knn"])
    assert len(calls) == 1
    torch.testing.assert_close(
        both["knn_variance_ratio"], both["posterior_knn"] * both["variance_ratio"]
    )
    assert set(both) == {"variance_ratio", "knn_variance_ratio", "posterior_knn"}
