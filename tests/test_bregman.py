"""Tests of the learned Bregman divergences: potentials, divergence, pml adapters, losses and
the Bregman likelihood's curvature factors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from laplace_metric.bregman import (
    BregmanDistance,
    BregmanDivergence,
    BregmanKNN,
    ICNNPotential,
    MahalanobisPotential,
    NegativeEntropyPotential,
    SquaredEuclideanPotential,
    bregman_knn,
    divergence_from_config,
)
from laplace_metric.bregman.losses import (
    BregmanContrastiveLoss,
    BregmanTripletLoss,
    all_triplets,
    fit_bregman,
)
from laplace_metric.likelihoods import BregmanLikelihood
from laplace_metric.likelihoods.bregman import robust_cholesky

DEVICES = ["cpu"] + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []
)
F64 = torch.float64


def icnn(dim: int = 4, alpha: float = 0.5, seed: int = 0, device: str = "cpu") -> ICNNPotential:
    torch.manual_seed(seed)
    return ICNNPotential(dim, hidden=(16, 16), alpha=alpha).to(device=device, dtype=F64)


def randn(*shape: int, seed: int = 0, device: str = "cpu", scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=F64)).to(device)


def spd(dim: int, seed: int = 0) -> torch.Tensor:
    a = randn(dim, dim, seed=seed)
    return a @ a.T + 0.5 * torch.eye(dim, dtype=F64)


# ---------------------------------------------------------------------- divergence axioms
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 10.0), alpha=st.floats(0.01, 5.0))
def test_icnn_divergence_nonnegative_zero_diagonal_strongly_convex(seed, scale, alpha):
    phi = icnn(alpha=alpha, seed=seed % 7)
    div = BregmanDivergence(phi, clamp=False)
    x, y = randn(8, 4, seed=seed, scale=scale), randn(8, 4, seed=seed + 1, scale=scale)
    with torch.no_grad():
        d = div(x, y)
        lower = alpha / 2 * (x - y).square().sum(-1)
        assert bool((d >= lower - 1e-9 * (1 + d.abs())).all())
        assert bool((d > 0).all())
        assert torch.equal(div(x, x), torch.zeros(8, dtype=F64))
        diag = torch.diagonal(div.pairwise(x))
        assert diag.abs().max() < 1e-10 * (1 + phi(x).abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_squared_euclidean_and_mahalanobis_closed_forms(device):
    x, y = randn(6, 3, seed=1, device=device), randn(6, 3, seed=2, device=device)
    d_euc = BregmanDivergence(SquaredEuclideanPotential(3))(x, y)
    torch.testing.assert_close(d_euc, 0.5 * (x - y).square().sum(-1))
    m = spd(3).to(device)
    expected = 0.5 * torch.einsum("bi,ij,bj->b", x - y, m, x - y)
    for learnable in (False, True):
        pot = MahalanobisPotential(m, learnable=learnable).to(device)
        torch.testing.assert_close(pot.matrix, m)
        torch.testing.assert_close(BregmanDivergence(pot)(x, y), expected)
        torch.testing.assert_close(BregmanDivergence(pot).pairwise(x, y).diagonal(), expected)


def test_learnable_mahalanobis_stays_spd_and_trains():
    pot = MahalanobisPotential(torch.eye(3, dtype=F64), learnable=True)
    opt = torch.optim.Adam(pot.parameters(), lr=0.05)
    x, y = randn(10, 3, seed=3), randn(10, 3, seed=4)
    for _ in range(20):
        opt.zero_grad()
        BregmanDivergence(pot)(x, y).sum().backward()
        opt.step()
    evals = torch.linalg.eigvalsh(pot.matrix.detach())
    assert bool((evals > 0).all())
    assert not torch.allclose(pot.matrix.detach(), torch.eye(3, dtype=F64))


def test_negative_entropy_is_generalised_kl():
    x, y = randn(5, 4, seed=5).exp(), randn(5, 4, seed=6).exp()
    div = BregmanDivergence(NegativeEntropyPotential(4))
    gkl = (x * (x / y).log() - x + y).sum(-1)
    torch.testing.assert_close(div(x, y), gkl)
    torch.testing.assert_close(div.pairwise(x, y).diagonal(), gkl)
    p, q = x / x.sum(-1, keepdim=True), y / y.sum(-1, keepdim=True)
    torch.testing.assert_close(div(p, q), (p * (p / q).log()).sum(-1))
    with pytest.raises(ValueError, match="positive orthant"):
        div(x - 10.0, y)


@pytest.mark.parametrize("device", DEVICES)
def test_pairwise_matrix_matches_per_pair_definition(device):
    phi = icnn(seed=1, device=device)
    div = BregmanDivergence(phi, clamp=False)
    x, y = randn(5, 4, seed=7, device=device), randn(7, 4, seed=8, device=device)
    mat = div.pairwise(x, y)
    assert mat.shape == (5, 7)
    for i in range(5):
        for j in range(7):
            xi, yj = x[i : i + 1], y[j : j + 1]
            yj_req = yj.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(phi(yj_req).sum(), yj_req)
            ref = phi(xi) - phi(yj) - (g * (xi - yj)).sum()
            torch.testing.assert_close(mat[i, j], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div.pairwise(x, y, grad_y=phi.gradient(y)), mat)
    # asymmetric in general
    assert not torch.allclose(div.pairwise(x, x), div.pairwise(x, x).T)


POTENTIALS = {
    "icnn": lambda: icnn(seed=2),
    "euclid": lambda: SquaredEuclideanPotential(4),
    "mahalanobis": lambda: MahalanobisPotential(spd(4, seed=3)),
    "mahalanobis_learn": lambda: MahalanobisPotential(spd(4, seed=3), learnable=True),
    "negentropy": lambda: NegativeEntropyPotential(4),
}


@pytest.mark.parametrize("name", sorted(POTENTIALS))
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_and_hessian_match_autograd(name, device):
    pot = POTENTIALS[name]().to(device)
    x = randn(6, 4, seed=9, device=device)
    if name == "negentropy":
        x = x.exp()

    def single(v):
        return pot(v[None])[0]

    grads = torch.stack([torch.autograd.functional.jacobian(single, v) for v in x])
    hessians = torch.stack([torch.autograd.functional.hessian(single, v) for v in x])
    torch.testing.assert_close(pot.gradient(x), grads, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pot.hessian(x), hessians, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(pot.gradient(x), grads, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pot.hessian(x), hessians, rtol=1e-12, atol=1e-12)


def test_icnn_hessian_is_at_least_alpha():
    phi = icnn(alpha=0.3, seed=4)
    evals = torch.linalg.eigvalsh(phi.hessian(randn(20, 4, seed=10, scale=3.0)))
    assert bool((evals >= 0.3 - 1e-10).all())


# ---------------------------------------------------------------------- differentiability
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_flow_to_phi_and_both_arguments(device):
    phi = icnn(seed=5, device=device)
    div = BregmanDivergence(phi)
    x = randn(4, 4, seed=11, device=device).requires_grad_(True)
    y = randn(6, 4, seed=12, device=device).requires_grad_(True)
    (div.pairwise(x, y).sum() + div(x, y[:4]).sum()).backward()
    for name, p in phi.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    assert bool(x.grad.abs().sum() > 0) and bool(y.grad.abs().sum() > 0)


def test_pairwise_gradient_wrt_reference_matches_finite_differences():
    div = BregmanDivergence(icnn(seed=6), clamp=False)
    x, y = randn(3, 4, seed=13), randn(2, 4, seed=14)
    torch.autograd.gradcheck(
        lambda a, b: div.pairwise(a, b), (x.requires_grad_(), y.requires_grad_())
    )


# ---------------------------------------------------------------------- pml adapters
@pytest.mark.parametrize("device", DEVICES)
def test_pml_distance_matrix_and_no_grad(device):
    div = BregmanDivergence(icnn(seed=7, device=device))
    q, r = randn(5, 4, seed=15, device=device), randn(8, 4, seed=16, device=device)
    dist = BregmanDistance(div)
    nq, nr = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(r, dim=1)
    torch.testing.assert_close(dist(q, r), div.pairwise(nq, nr))
    torch.testing.assert_close(dist(q), div.pairwise(nq, nq))
    torch.testing.assert_close(dist.pairwise_distance(nq, nr[:5]), div(nq, nr[:5]))
    raw = BregmanDistance(div, normalize_embeddings=False)
    with torch.no_grad():
        torch.testing.assert_close(raw(q, r), div.pairwise(q, r))
    with pytest.raises(ValueError, match="is_inverted"):
        BregmanDistance(div, is_inverted=True)


def _blobs(n_per: int = 12, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(3, dim, generator=gen)
    labels = torch.arange(3).repeat_interleave(n_per)
    return centers[labels] + 0.7 * torch.randn(len(labels), dim, generator=gen), labels


def test_pml_loss_and_miner_train_encoder_and_phi():
    torch.manual_seed(0)
    x, labels = _blobs()
    encoder = torch.nn.Linear(6, 4)
    phi = ICNNPotential(4, hidden=(16,), alpha=0.5)
    distance = BregmanDistance(phi)
    miner = pml_miners.TripletMarginMiner(margin=0.2, distance=distance, type_of_triplets="all")
    loss_fn = pml_losses.TripletMarginLoss(margin=0.2, distance=distance)
    params = list(encoder.parameters()) + list(loss_fn.parameters())
    assert any(p is next(iter(phi.parameters())) for p in params)
    opt = torch.optim.Adam(params, lr=1e-2)
    before = [p.detach().clone() for p in phi.parameters()]
    values = []
    for _ in range(30):
        opt.zero_grad()
        emb = encoder(x)
        loss = loss_fn(emb, labels, miner(emb, labels))
        loss.backward()
        opt.step()
        values.append(float(loss.detach()))
    assert values[-1] < values[0]
    assert any(not torch.equal(b, p) for b, p in zip(before, phi.parameters()))


@pytest.mark.parametrize("device", DEVICES)
def test_bregman_knn_matches_brute_force(device):
    div = BregmanDivergence(icnn(seed=8, device=device))
    q, db = randn(7, 4, seed=17, device=device), randn(20, 4, seed=18, device=device)
    d, i = bregman_knn(q, db, 3, div, batch_size=3)
    ref_d, ref_i = torch.topk(div.pairwise(q, db), 3, largest=False)
    torch.testing.assert_close(d, ref_d.detach())
    assert torch.equal(i, ref_i)
    with pytest.raises(ValueError, match="k must be"):
        bregman_knn(q, db, 21, div)


def test_accuracy_calculator_with_bregman_knn():
    div = BregmanDivergence(icnn(seed=9))
    x, labels = _blobs(dim=4, seed=1)
    x = x.to(F64)
    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), knn_func=BregmanKNN(div)
    )
    acc = calc.get_accuracy(x, labels, x, labels, ref_includes_query=True)
    mat = div.pairwise(x).detach()
    mat.fill_diagonal_(float("inf"))
    expected_p1 = (labels[mat.argmin(1)] == labels).double().mean()
    assert acc["precision_at_1"] == pytest.approx(float(expected_p1))
    assert 0 < acc["mean_average_precision_at_r"] <= 1
    # separate query and reference sets
    acc2 = calc.get_accuracy(x[:10], labels[:10], x[10:], labels[10:])
    expected2 = (labels[10:][div.pairwise(x[:10], x[10:]).argmin(1)] == labels[:10]).double().mean()
    assert acc2["precision_at_1"] == pytest.approx(float(expected2))


# ---------------------------------------------------------------------- losses and training
def test_contrastive_loss_matches_manual_pairs():
    div = BregmanDivergence(icnn(seed=10))
    g, labels = randn(6, 4, seed=19), torch.tensor([0, 0, 1, 1, 2, 2])
    loss = BregmanContrastiveLoss(div, margin=0.8, reduction="sum")(g, labels)
    z = torch.nn.functional.normalize(g, dim=1)
    manual = 0.0
    for i in range(6):
        for j in range(6):  # both directions of the asymmetric divergence
            if i != j:
                d = div(z[i : i + 1], z[j : j + 1])[0]
                manual = manual + (d / 2 if labels[i] == labels[j] else (0.8 - d).clamp(min=0) / 2)
    torch.testing.assert_close(loss, manual)
    # the loss does not depend on the order of the samples in the batch
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    loss_perm = BregmanContrastiveLoss(div, margin=0.8, reduction="sum")(g[perm], labels[perm])
    torch.testing.assert_close(loss_perm, loss)
    unordered = BregmanContrastiveLoss(div, margin=0.8, reduction="sum", ordered_pairs=False)
    assert len(unordered.likelihood.mine(z, labels)) == 15
    # the likelihood's element-wise path (few pairs) agrees with the matrix path (many pairs)
    lik = BregmanLikelihood(div, margin=0.8)
    pairs = lik.mine(z, labels)
    matrix_path, _ = lik.pair_losses(z, pairs)
    elementwise = [lik.pair_losses(z, p)[0] for p in _split(pairs)]
    torch.testing.assert_close(matrix_path, torch.cat(elementwise))


def _split(pairs):
    from laplace_metric.mining import Pairs

    return [
        Pairs(pairs.first[k : k + 1], pairs.second[k : k + 1], pairs.positive[k : k + 1])
        for k in range(len(pairs))
    ]


def test_triplet_loss_matches_loop():
    div = BregmanDivergence(icnn(seed=11))
    g, labels = randn(7, 4, seed=20), torch.tensor([0, 0, 0, 1, 1, 2, 2])
    loss = BregmanTripletLoss(div, margin=0.3, reduction="sum")(g, labels)
    z = torch.nn.functional.normalize(g, dim=1)
    manual, count = 0.0, 0
    for a in range(7):
        for p in range(7):
            for n in range(7):
                if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
                    dap = div(z[a : a + 1], z[p : p + 1])[0]
                    dan = div(z[a : a + 1], z[n : n + 1])[0]
                    manual = manual + (dap - dan + 0.3).clamp(min=0)
                    count += 1
    assert len(all_triplets(labels)[0]) == count
    torch.testing.assert_close(loss, manual)


@pytest.mark.parametrize("loss", ["contrastive", "triplet"])
def test_fit_bregman_reduces_loss_and_trains_phi(loss):
    torch.manual_seed(1)
    x, labels = _blobs(n_per=10, seed=2)
    loader = [(x[k::3], labels[k::3]) for k in range(3)]
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    phi = ICNNPotential(4, hidden=(8,), alpha=0.5)
    before = [p.detach().clone() for p in phi.parameters()]
    history = fit_bregman(encoder, phi, loader, epochs=15, lr=1e-2, loss=loss, progress_bar=False)
    assert len(history) == 15 and history[-1] < history[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, phi.parameters()))
    with pytest.raises(ValueError, match="loss"):
        fit_bregman(encoder, phi, loader, epochs=1, loss="hinge", progress_bar=False)


# ---------------------------------------------------------------------- likelihood curvature
def _pair_hessian(lik: BregmanLikelihood, g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    """Float64 autograd Hessian of ``delta / 2`` w.r.t. the raw outputs ``(g_a, g_b)``."""
    dim = g_a.shape[0]

    def half_delta(v):
        z = lik.embed(v.view(2, dim))
        return lik.dissimilarity(z[:1], z[1:])[0] / 2

    return torch.func.hessian(half_delta)(torch.cat([g_a, g_b]))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("point", ["second", "first", "midpoint"])
@pytest.mark.parametrize("device", DEVICES)
def test_pair_terms_factors_match_autograd_hessian_at_coincident_points(normalize, point, device):
    div = BregmanDivergence(icnn(seed=12, device=device), clamp=False)
    lik = BregmanLikelihood(div, normalize=normalize, hessian_point=point)
    g = randn(1, 4, seed=21, device=device, scale=2.0).expand(2, 4).contiguous()
    terms = lik.pair_terms(g, torch.tensor([3, 3], device=device))
    assert len(terms.pairs) == 2 and terms.signs.tolist() == [1.0, 1.0]  # (0, 1) and (1, 0)
    s_a, s_b = terms.first_factor[0], terms.second_factor[0]
    hess = _pair_hessian(lik, g[0], g[1])
    torch.testing.assert_close(s_a @ s_a.T, hess[:4, :4], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_a @ s_b.T, hess[:4, 4:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_b @ s_a.T, hess[4:, :4], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_b @ s_b.T, hess[4:, 4:], rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_rank(hess) == (3 if normalize else 4)


def test_cross_block_exact_for_distinct_pairs_at_second_point():
    div = BregmanDivergence(icnn(seed=13), clamp=False)
    lik = BregmanLikelihood(
        div, normalize=False, margin=100.0, hessian_method="full", ordered_pairs=False
    )
    g = randn(2, 4, seed=22)
    terms = lik.pair_terms(g, torch.tensor([0, 1]))
    assert terms.signs.tolist() == [-1.0]  # active negative
    hess = _pair_hessian(lik, g[0], g[1])
    s_a, s_b = terms.first_factor[0], terms.second_factor[0]
    torch.testing.assert_close(s_a @ s_b.T, hess[:4, 4:], rtol=1e-10, atol=1e-12)
    # the diagonal block w.r.t. the second embedding is approximated (third derivative dropped)
    torch.testing.assert_close(s_b @ s_b.T, div.potential.hessian(g[1:])[0] / 2)


def test_pair_terms_methods_signs_and_fixed():
    lik = BregmanLikelihood(icnn(seed=14), margin=50.0, hessian_method="fixed")
    g, labels = randn(4, 4, seed=23), torch.tensor([0, 0, 1, 1])
    terms = lik.pair_terms(g, labels)
    assert terms.one_sided and torch.equal(terms.first_factor, torch.zeros_like(terms.first_factor))
    assert sorted(terms.signs.tolist()) == [-1.0] * 8 + [1.0] * 4
    terms_pos = BregmanLikelihood(icnn(seed=14), margin=50.0).pair_terms(g, labels)
    assert sorted(terms_pos.signs.tolist()) == [0.0] * 8 + [1.0] * 4
    torch.testing.assert_close(terms_pos.loss, lik.loss(g, labels))


def test_robust_cholesky_fallback_and_error():
    a = randn(3, 2, seed=24)
    singular = (a @ a.T)[None]  # rank 2 of 3
    root = robust_cholesky(singular)
    torch.testing.assert_close(root @ root.mT, singular)
    spd_batch = torch.stack([spd(3, seed=1), singular[0]])
    root = robust_cholesky(spd_batch)
    torch.testing.assert_close(root @ root.mT, spd_batch)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        robust_cholesky(torch.diag(torch.tensor([1.0, -1.0], dtype=F64))[None])


# ---------------------------------------------------------------------- configuration and errors
def test_config_and_state_round_trip(tmp_path):
    div = BregmanDivergence(icnn(seed=15))
    lik = BregmanLikelihood(div, margin=0.7, hessian_method="full")
    path = tmp_path / "lik.pt"
    torch.save({"config": lik.config(), "state": lik.divergence_state()}, path)
    saved = torch.load(path, weights_only=True)
    rebuilt = divergence_from_config(saved["config"]["divergence"], saved["state"]).to(F64)
    x, y = randn(5, 4, seed=25), randn(5, 4, seed=26)
    torch.testing.assert_close(rebuilt(x, y), div(x, y))
    assert saved["config"]["name"] == "bregman" and saved["config"]["margin"] == 0.7
    maha = BregmanDivergence(MahalanobisPotential(spd(4), learnable=True))
    rebuilt = divergence_from_config(maha.config(), maha.potential.state_dict())
    # float32 parameters: the rebuilt factor may round differently (1.3e-7 seen on one CPU)
    torch.testing.assert_close(rebuilt(x, y), maha(x, y), rtol=1e-6, atol=1e-6)


def test_clear_errors():
    with pytest.raises(ValueError, match="alpha"):
        ICNNPotential(3, alpha=0.0)
    with pytest.raises(ValueError, match="hidden"):
        ICNNPotential(3, hidden=())
    with pytest.raises(ValueError, match="positive definite"):
        MahalanobisPotential(torch.diag(torch.tensor([1.0, -1.0])))
    with pytest.raises(ValueError, match="symmetric"):
        MahalanobisPotential(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="ConvexPotential"):
        BregmanLikelihood(torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="hessian_point"):
        BregmanLikelihood(icnn(), hessian_point="middle")
    lik = BregmanLikelihood(icnn(dim=4))
    with pytest.raises(ValueError, match="R\\^4"):
        lik.loss(randn(3, 5), torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError, match="dtype"):
        lik.loss(randn(3, 4).float(), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        BregmanDivergence(icnn())(randn(3, 4), randn(2, 4))
    with pytest.raises(ValueError, match="columns"):
        BregmanDivergence(icnn()).pairwise(randn(3, 3))
