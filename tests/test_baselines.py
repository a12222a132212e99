"""Tests of laplace_metric.baselines on tiny synthetic problems."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_metric import baselines as B
from laplace_metric.baselines.train import _contrastive_loss
from laplace_metric.likelihoods import ContrastiveLikelihood

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DEVICE_PARAMS = [pytest.param(d, marks=pytest.mark.gpu) if d == "cuda" else d for d in DEVICES]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> str:
    return request.param


@pytest.fixture
def one_thread():
    """Tiny MLPs train fastest on one thread (and do not fight other processes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(n_per_class: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs in 4-D."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    x = torch.cat([c + 0.3 * torch.randn(n_per_class, 4, generator=gen) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return x, y


def small_mlp(dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(4, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(16, 3))


# ---------------------------------------------------------------------------- training
def test_private_contrastive_loss_matches_likelihood() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    for margin in (0.5, 1.0, 2.5):
        ours = _contrastive_loss(g, y, margin)
        ref = ContrastiveLikelihood(margin=margin).loss(g, y, reduction="mean")
        assert ours.item() == pytest.approx(ref.item(), rel=1e-12)


def test_contrastive_loss_hand_computed() -> None:
    # z = (1,0), (1,0), (0,1): positive pair (0,1) d2 = 0; negatives d2 = 2 < m = 3 -> 1/2 each
    g = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([0, 0, 1])
    assert _contrastive_loss(g, y, margin=3.0).item() == pytest.approx((0 + 0.5 + 0.5) / 3)


def test_train_encoder_reduces_loss_and_is_seeded(device: str, one_thread) -> None:
    x, y = blobs()
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True)

    def run() -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        enc = small_mlp().to(device)
        hist = B.train_encoder(enc, loader, epochs=15, lr=1e-2, seed=3, progress_bar=False)
        return hist, enc[0].weight.detach().cpu()

    hist, w = run()
    hist2, w2 = run()
    assert len(hist) == 15
    assert hist[-1] < 0.5 * hist[0]
    assert hist == hist2 and torch.equal(w, w2)


def test_train_encoder_custom_loss_and_errors() -> None:
    x, y = blobs(5)
    loader = DataLoader(TensorDataset(x, y), batch_size=15)
    calls = []

    def loss_fn(g: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls.append(g.shape)
        return g.square().mean()

    B.train_encoder(small_mlp(), loader, loss_fn=loss_fn, epochs=2, progress_bar=False)
    assert calls == [(15, 3)] * 2
    with pytest.raises(ValueError, match="epochs"):
        B.train_encoder(small_mlp(), loader, epochs=0)
    with pytest.raises(TypeError, match="nn.Module"):
        B.train_encoder(lambda t: t, loader)
    with pytest.raises(ValueError, match="NaN"):
        B.train_encoder(
            small_mlp(), loader, loss_fn=lambda g, _: g.sum() * math.nan, progress_bar=False
        )


def test_embed_batches_and_normalises(device: str) -> None:
    enc = small_mlp().to(device)
    x = torch.randn(10, 4)
    out = B.embed(enc, x, batch_size=3)
    assert out.shape == (10, 3) and out.device == x.device
    assert torch.allclose(out.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        raw = enc(x.to(device)).cpu()
    assert torch.allclose(B.embed(enc, x, normalize=False, batch_size=4), raw, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(batch, D\)"):
        B.embed(lambda t: t.sum(1), x)


# ---------------------------------------------------------------------------- kNN
def test_knn_baseline_scores_far_points_higher(device: str) -> None:
    x, y = blobs()
    enc = nn.Identity()  # the embedding is the input itself: distances are checkable
    base = B.KNNDistanceBaseline(enc, k=1, normalize=False).fit(x.to(device))
    near = x[:3].to(device) + 0.01
    far = torch.full((3, 4), 20.0, device=device)
    assert (base.score(far).min() > base.score(near).max()).item()
    expected = torch.cdist(far, x.to(device)).min(1).values
    assert torch.allclose(base.score(far), expected)
    with pytest.raises(RuntimeError, match="fit"):
        B.KNNDistanceBaseline(enc).score(x)
    with pytest.raises(ValueError, match="k"):
        B.KNNDistanceBaseline(enc, k=0)
    with pytest.raises(ValueError, match="exceeds"):
        B.KNNDistanceBaseline(enc, k=100).fit(x)


# ---------------------------------------------------------------------------- Mahalanobis
def test_mahalanobis_hand_computed(device: str) -> None:
    # class 0 at (+-1, 0), class 1 at (10 +- 1, 0) plus (0, +-2) spreads:
    x = torch.tensor(
        [[-1.0, 0], [1, 0], [0, -2], [0, 2], [9, 0], [11, 0], [10, -2], [10, 2]],
        device=device,
        dtype=torch.float64,
    )
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], device=device)
    maha = B.MahalanobisBaseline(lambda t: t, ridge=0.0).fit(x, y)
    # shared covariance diag(1/2, 2): distance^2 of (0, 1) to class 0 = 0 + 1/2
    assert torch.allclose(maha.means.cpu(), torch.tensor([[0.0, 0], [10, 0]], dtype=torch.float64))
    q = torch.tensor([[0.0, 1.0], [10.0, 0.0], [5.0, 0.0]], device=device, dtype=torch.float64)
    assert maha.score(q).cpu().tolist() == pytest.approx([0.5, 0.0, 50.0])
    assert maha.predict(q[:2]).cpu().tolist() == [0, 1]


def test_mahalanobis_with_penultimate_features() -> None:
    x, y = blobs()
    enc = small_mlp()
    maha = B.MahalanobisBaseline(B.penultimate(enc)).fit(x, y)
    assert maha.means.shape == (3, 16)
    far = torch.full((4, 4), 30.0) * torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert (maha.score(far).min() > maha.score(x).max()).item()
    with pytest.raises(ValueError, match="labels"):
        B.MahalanobisBaseline(B.penultimate(enc)).fit(x)
    with pytest.raises(TypeError, match="Sequential"):
        B.penultimate(nn.Linear(2, 2))


# ---------------------------------------------------------------------------- MC dropout
def test_mc_dropout_samples_vary_and_scores(device: str) -> None:
    torch.manual_seed(0)
    enc = small_mlp(dropout=0.5).to(device).eval()
    x, _ = blobs(4)
    mc = B.MCDropoutBaseline(enc, n_samples=8, seed=1).fit(x)
    samples = mc.samples(x)
    assert samples.shape == (8, 12, 3)
    assert torch.allclose(samples.norm(dim=-1), torch.ones(8, 12, device=samples.device))
    assert samples.std(0).sum() > 0  # dropout was active
    assert not enc.training and not enc[2].training  # modes restored
    assert torch.equal(mc.samples(x), samples)  # seeded
    trace = mc.score(x)
    assert torch.allclose(trace, samples.var(0).sum(-1))
    std_sum = B.MCDropoutBaseline(enc, n_samples=8, score="std_sum", seed=1).score(x)
    assert torch.allclose(std_sum, samples.std(0).sum(-1))
    logdet = B.MCDropoutBaseline(enc, n_samples=8, score="logdet", seed=1).score(x)
    assert logdet.shape == (12,) and torch.isfinite(logdet).all()
    mean = mc.embed(x)
    assert torch.allclose(mean, torch.nn.functional.normalize(samples.mean(0), dim=-1))


def test_mc_dropout_errors() -> None:
    with pytest.raises(ValueError, match="dropout"):
        B.MCDropoutBaseline(small_mlp())
    with pytest.raises(ValueError, match="n_samples"):
        B.MCDropoutBaseline(small_mlp(0.1), n_samples=1)
    with pytest.raises(ValueError, match="score"):
        B.MCDropoutBaseline(small_mlp(0.1), score="entropy")


# ---------------------------------------------------------------------------- ensembles
class Rotated(nn.Module):
    """An encoder followed by a fixed orthogonal map."""

    def __init__(self, base: nn.Module, rotation: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("rotation", rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) @ self.rotation


def test_ensemble_mean_knn_is_rotation_invariant() -> None:
    x, _ = blobs()
    torch.manual_seed(0)
    base = small_mlp()
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    # Two "members" that are the same encoder up to a rotation: the mean-kNN score equals the
    # single encoder's kNN score, while the naive embedding std is large everywhere.
    ens = B.DeepEnsembleBaseline([base, Rotated(base, q)], k=2).fit(x)
    single = B.KNNDistanceBaseline(base, k=2).fit(x)
    queries = torch.randn(7, 4)
    assert torch.allclose(ens.score(queries), single.score(queries), atol=1e-6)
    naive = B.DeepEnsembleBaseline([base, Rotated(base, q)], score="embedding_std")
    assert (naive.score(x) > 0.1).all()
    # concatenated retrieval embeddings are unit-norm
    assert torch.allclose(ens.embed(queries).norm(dim=1), torch.ones(7), atol=1e-6)


def test_ensemble_train_uses_seeds(one_thread) -> None:
    x, y = blobs(5)
    loader = DataLoader(TensorDataset(x, y), batch_size=15, shuffle=True)
    seen = []

    def trainer(enc: nn.Module, seed: int) -> None:
        seen.append(seed)
        B.train_encoder(enc, loader, epochs=2, seed=seed, progress_bar=False)

    ens = B.DeepEnsembleBaseline.train(small_mlp, trainer, seeds=(3, 4, 5), k=1).fit(x)
    assert seen == [3, 4, 5]
    assert len(ens.members) == 3
    assert not torch.equal(ens.members[0][0].weight, ens.members[1][0].weight)
    assert ens.score(x).shape == (15,)
    with pytest.raises(ValueError, match="two members"):
        B.DeepEnsembleBaseline([small_mlp()])
    with pytest.raises(RuntimeError, match="fit"):
        B.DeepEnsembleBaseline([small_mlp(), small_mlp()]).score(x)


# ---------------------------------------------------------------------------- PFE
def test_pfe_mls_loss_hand_computed() -> None:
    mu = torch.tensor([[0.0, 0.0], [1.0, 2.0], [5.0, 5.0]], dtype=torch.float64)
    log_var = torch.zeros(3, 2, dtype=torch.float64)  # sigma^2 = 1, pair variance 2
    labels = torch.tensor([0, 0, 1])
    # one positive pair (0, 1): MLS = -1/2 [(1 / 2 + log 2) + (4 / 2 + log 2)]
    expected = 0.5 * (0.5 + 2.0 + 2 * math.log(2.0))
    assert B.PFEBaseline.mls_loss(mu, log_var, labels).item() == pytest.approx(expected)
    assert B.PFEBaseline.mls_loss(mu, log_var, torch.tensor([0, 1, 2])).item() == 0.0


def test_pfe_fit_and_score(one_thread) -> None:
    x, y = blobs()
    torch.manual_seed(0)
    enc = small_mlp()
    pfe = B.PFEBaseline(enc, hidden=8)
    with pytest.raises(RuntimeError, match="fit"):
        pfe.score(x)
    with pytest.raises(ValueError, match="labels"):
        pfe.fit(x)
    pfe.fit(x, y, epochs=20, lr=1e-2)
    mu = pfe.embed(x)
    log_var = pfe.log_variance(x)
    assert log_var.shape == (60, 3)
    scores = pfe.score(x)
    assert scores.shape == (60,) and (scores > 0).all()
    expected = 1.0 / (1.0 / log_var.exp()).mean(-1)
    assert torch.allclose(scores, expected)
    # training lowered the loss relative to a constant unit variance
    trained = B.PFEBaseline.mls_loss(mu, log_var, y)
    assert trained < B.PFEBaseline.mls_loss(mu, torch.zeros_like(log_var), y)


def test_registry_holds_every_baseline_and_rejects_clashes() -> None:
    assert B.BASELINES == {
        "knn_distance": B.KNNDistanceBaseline,
        "mahalanobis": B.MahalanobisBaseline,
        "mahalanobis_layers": B.MultiLayerMahalanobisBaseline,
        "mc_dropout": B.MCDropoutBaseline,
        "deep_ensemble": B.DeepEnsembleBaseline,
        "pfe": B.PFEBaseline,
        "isotropic_noise": B.IsotropicNoiseBaseline,
    }
    with pytest.raises(ValueError, match="already registered"):
        B.register_baseline("pfe")(B.KNNDistanceBaseline)
    with pytest.raises(TypeError, match="OODBaseline subclass"):
        B.register_baseline("not_a_baseline")(int)
    with pytest.raises(NotImplementedError, match="does not embed"):
        B.MahalanobisBaseline(lambda x: x).embed(torch.zeros(2, 3))
