"""The Bregman likelihood through ``laplace.Laplace``: curvature against a brute-force float64
reference built from explicit ``torch.func`` Jacobians of the (normalised) embedding and the
likelihood's embedding-space pair factors, independently of ``pair_terms``' pull-back and of the
curvature backends."""

from __future__ import annotations

import warnings

import laplace
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import laplace_metric  # noqa: F401  (registers the pairwise likelihoods)
from laplace_metric.bregman import BregmanDivergence, ICNNPotential
from laplace_metric.likelihoods import BregmanLikelihood

F64 = torch.float64
DEVICES = ["cpu"] + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []
)
METHODS = ["positives", "fixed", "full"]


def setup(device: str = "cpu", normalize: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(device, F64)
    phi = ICNNPotential(3, hidden=(8,), alpha=0.5).to(device, F64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=gen, dtype=F64).to(device)
    y = torch.tensor([0, 0, 1, 1, 2, 0, 1, 2, 2, 0], device=device)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    # a margin between the negative pairs' divergences, so some hinges are active and some not
    lik = BregmanLikelihood(phi, normalize=normalize)
    deltas = []
    for xb, yb in batches:
        with torch.no_grad():
            z = lik.embed(model(xb))
        pairs = lik.mine(z, yb)
        neg = ~pairs.positive
        deltas.append(lik.divergence(z[pairs.first[neg]], z[pairs.second[neg]]))
    # midway between two neighbouring divergences, so no hinge sits at round-off distance
    ordered = torch.cat(deltas).detach().sort().values
    mid = len(ordered) // 2
    margin = float(ordered[mid - 1 : mid + 1].mean())
    return model, phi, batches, margin


def embedding_jacobians(model: nn.Module, x: torch.Tensor, normalize: bool):
    """Per-sample Jacobians of the embedding w.r.t. all weights, ``(N, D, P)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def embed(p, xi):
        g = functional_call(model, p, (xi[None],))[0]
        return g / g.norm() if normalize else g

    jac = torch.func.vmap(jacrev(embed), in_dims=(None, 0))(params, x)
    return torch.cat([j.flatten(start_dim=2) for j in jac.values()], dim=2)


def brute_force_pairs(model, lik: BregmanLikelihood, x, y, method: str):
    """Signs and per-pair factors ``V_m`` ``(M, P, R)`` and layer data, by brute force."""
    with torch.no_grad():
        g = model(x)
    z = g / g.norm(dim=1, keepdim=True) if lik.normalize else g
    # every ordered pair i != j (the Bregman likelihood's default: D is asymmetric)
    first, second = (~torch.eye(len(y), dtype=torch.bool)).nonzero(as_tuple=True)
    first, second = first.to(y.device), second.to(y.device)
    positive = y[first] == y[second]
    with torch.no_grad():
        delta = lik.divergence(z[first], z[second])
    sign = torch.where(positive, 1.0, -1.0).to(F64) * (positive | (delta < lik.margin))
    if method == "positives":
        sign = sign * positive
    w_a, w_b = lik.pair_factors(z[first], z[second])  # embedding space
    if method == "fixed":
        w_a = torch.zeros_like(w_a)
    jac = embedding_jacobians(model, x, lik.normalize)
    v = torch.einsum("mdp,mdr->mpr", jac[first], w_a) + torch.einsum(
        "mdp,mdr->mpr", jac[second], w_b
    )
    keep = sign != 0
    return sign[keep], v[keep], first[keep], second[keep], w_a[keep], w_b[keep], jac


def brute_force_kron(model, lik, x, y, method):
    """Difference-only Kronecker factors ``[B, A]`` (A unnormalised) and exact bias blocks."""
    sign, v, first, second, w_a, w_b, jac = brute_force_pairs(model, lik, x, y, method)
    h0 = x
    h2 = torch.tanh(model[0](x)).detach()
    # d z / d (layer output) per sample = Jacobian w.r.t. the layer's bias
    sizes = [p.numel() for p in model.parameters()]
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    kfacs = []
    for k, (layer_in, wi, bi) in enumerate([(h0, 0, 1), (h2, 2, 3)]):
        sens = jac[:, :, offsets[bi] : offsets[bi + 1]]  # (N, D, out)
        q_b = torch.einsum("mdo,mdr->mor", sens[second], w_b)
        if method == "fixed":
            q, e = q_b, layer_in[second]
        else:
            q = torch.einsum("mdo,mdr->mor", sens[first], w_a) - q_b
            e = (layer_in[first] - layer_in[second]) / 2
        kfacs.append([torch.einsum("m,mor,mpr->op", sign, q, q), torch.einsum("mi,mj->ij", e, e)])
        vb = v[:, offsets[bi] : offsets[bi + 1]]
        kfacs.append([torch.einsum("m,mpr,mqr->pq", sign, vb, vb)])
        del k, wi
    return kfacs, len(sign)


def fit(model, phi, batches, margin, structure, method, subset="all", normalize=True):
    la = laplace.Laplace(  # looked up at call time: laplace_metric wraps it on import
        model,
        likelihood="bregman",
        divergence=phi,
        subset_of_weights=subset,
        hessian_structure=structure,
        hessian_method=method,
        margin=margin,
        normalize=normalize,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(batches)
    return la


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-10):
    scale = float(expected.abs().max())
    assert scale > 0
    err = float((actual - expected).abs().max())
    assert err <= rel * scale, f"relative error {err / scale:.3g}"


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("device", DEVICES)
def test_diag_full_match_brute_force(structure, method, normalize, device):
    model, phi, batches, margin = setup(device, normalize)
    la = fit(model, phi, batches, margin, structure, method, normalize=normalize)
    assert type(la).__name__ == f"Metric{structure.capitalize()}Laplace"
    lik = la.pair_likelihood
    assert isinstance(lik, BregmanLikelihood) and lik.divergence.potential is phi
    expected, n_pairs = 0.0, 0
    for xb, yb in batches:
        sign, v, *_ = brute_force_pairs(model, lik, xb, yb, method)
        n_pairs += len(sign)
        if structure == "diag":
            expected = expected + torch.einsum("m,mpr->p", sign, v.square())
        else:
            expected = expected + torch.einsum("m,mpr,mqr->pq", sign, v, v)
    assert la.n_pairs == n_pairs
    if method != "positives":
        assert bool((expected < 0).any()), "test data should produce negative curvature"
    assert_rel_close(la.H_signed, expected)


@pytest.mark.parametrize("method", METHODS)
def test_kron_matches_brute_force(method):
    model, phi, batches, margin = setup()
    la = fit(model, phi, batches, margin, "kron", method)
    expected, n_pairs = None, 0
    for xb, yb in batches:
        kfacs, n = brute_force_kron(model, la.pair_likelihood, xb, yb, method)
        n_pairs += n
        expected = (
            kfacs
            if expected is None
            else [[a + b for a, b in zip(fa, fb)] for fa, fb in zip(expected, kfacs)]
        )
    assert la.n_pairs == n_pairs
    for got, want in zip(la.H_signed.kfacs, expected):
        assert len(got) == len(want)
        for g_fac, w_fac in zip(got, want):
            assert_rel_close(g_fac, w_fac)
    if method == "positives":  # no projection: the posterior factors are A / n_pairs
        assert_rel_close(la.H_facs.kfacs[0][1], expected[0][1] / n_pairs)


def test_last_layer_full_matches_brute_force():
    model, phi, batches, margin = setup()
    la = fit(model, phi, batches, margin, "full", "full", subset="last_layer")
    lik = la.pair_likelihood
    expected = 0.0
    n_last = sum(p.numel() for p in model[2].parameters())
    for xb, yb in batches:
        sign, v, *_ = brute_force_pairs(model, lik, xb, yb, "full")
        v = v[:, -n_last:]
        expected = expected + torch.einsum("m,mpr,mqr->pq", sign, v, v)
    assert_rel_close(la.H_signed, expected)


def test_predictive_and_state_dict_round_trip(tmp_path):
    model, phi, batches, margin = setup()
    la = fit(model, phi, batches, margin, "diag", "positives")
    x = batches[0][0]
    mean, cov = la(x)
    assert mean.shape == (5, 3) and cov.shape == (5, 3, 3)
    torch.testing.assert_close(mean.norm(dim=1), torch.ones(5, dtype=F64))
    scores = la.predictive_uncertainty(x)
    assert scores.shape == (5,) and bool((scores > 0).all())
    path = tmp_path / "la.pt"
    torch.save(la.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["likelihood"] == "bregman"
    assert state["likelihood_config"]["divergence"]["potential"]["name"] == "ICNNPotential"
    # a fresh potential gets the saved parameters back
    torch.manual_seed(123)
    phi2 = ICNNPotential(3, hidden=(8,), alpha=0.5).to(F64)
    la2 = laplace.Laplace(
        model,
        likelihood="bregman",
        divergence=BregmanDivergence(phi2),
        subset_of_weights="all",
        hessian_structure="diag",
        margin=margin,
    )
    la2.load_state_dict(state)
    for p, q in zip(phi.parameters(), phi2.parameters()):
        assert torch.equal(p, q)
    torch.testing.assert_close(la2(x)[1], cov)


def test_missing_divergence_is_a_clear_error():
    model, *_ = setup()
    with pytest.raises(ValueError, match="divergence"):
        laplace.Laplace(
            model, likelihood="bregman", subset_of_weights="all", hessian_structure="diag"
        )


def test_likelihood_kwargs_reach_the_bregman_likelihood():
    from laplace import Laplace

    from laplace_metric.bregman import BregmanDivergence, SquaredEuclideanPotential

    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    la = Laplace(
        model,
        "bregman",
        "all",
        "diag",
        divergence=BregmanDivergence(SquaredEuclideanPotential(3)),
        likelihood_kwargs={"ordered_pairs": False, "hessian_point": "first"},
    )
    assert la.pair_likelihood.ordered_pairs is False
    assert la.pair_likelihood.hessian_point.value == "first"
