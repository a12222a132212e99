"""The evaluation API a user writes a benchmark with: embeddings, caches, consistent
baselines, pooled Mahalanobis features, the training margin, progress bars."""

from __future__ import annotations

import io
import math
import warnings

import laplace
import pytest
import torch
from torch import nn

from laplace_metric import UncertaintyScorer
from laplace_metric.baselines import (
    DeepEnsembleBaseline,
    MahalanobisBaseline,
    MCDropoutBaseline,
    MultiLayerMahalanobisBaseline,
    TrainingHistory,
    train_encoder,
)
from laplace_metric.likelihoods import ContrastiveLikelihood
from laplace_metric.progress import progress, progress_enabled
from tests.conftest import labelled_data, loader, make_cnn, make_mlp


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += x.shape[0]
        return self.inner(x)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_scorer_embeddings_public_and_queries_embedded_once(subset):
    x, y = labelled_data(24, (5,))
    model = make_mlp()
    calls = []
    model[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    la = laplace.Laplace(model, "contrastive", subset_of_weights=subset, hessian_structure="diag")
    la.fit(loader(x, y, 12), progress_bar=False)
    scorer = UncertaintyScorer(la, x, n_samples=4, progress_bar=False)
    z_db = scorer.database_embeddings
    q = x[:5].clone()
    knn = scorer(q)
    n_calls = len(calls)
    std = scorer(q, "sampled_std")
    z = scorer.embeddings(q)
    assert len(calls) == n_calls  # cached: no forward pass for the second score
    both = scorer.scores(q, ["posterior_knn", "sampled_std"])
    assert torch.allclose(both["posterior_knn"], knn) and torch.allclose(both["sampled_std"], std)
    assert torch.allclose(z, la.pair_likelihood.embed(model(q)))
    assert torch.allclose(z_db, la.pair_likelihood.embed(model(x)))
    assert scorer.sampled_embeddings(q).shape == (4, 5, 3)
    q.mul_(2.0)  # an in-place change invalidates the cache
    assert not torch.allclose(scorer.embeddings(q), z)
    fresh = UncertaintyScorer(la, x, n_samples=4, progress_bar=False)
    assert torch.allclose(fresh(q, "sampled_std"), scorer(q, "sampled_std"))


def test_deep_ensemble_train_embeddings_equal_embed():
    x, _ = labelled_data(20, (5,))
    ens = DeepEnsembleBaseline([make_mlp(seed=1), make_mlp(seed=2)]).fit(x)
    assert torch.allclose(ens.train_emb, ens.embed(x))
    member = ens.member_train_emb[0]
    assert torch.allclose(ens.train_emb[:, : member.shape[1]] * math.sqrt(2), member)


def test_mc_dropout_runs_the_layers_before_dropout_once():
    torch.manual_seed(0)
    cnn = make_cnn()
    trunk = _Counting(cnn[:6])
    encoder = nn.Sequential(trunk, nn.Dropout(0.3), nn.Linear(27, 3)).double()
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    mc = MCDropoutBaseline(encoder, n_samples=5, batch_size=3)
    prefix, rest = mc.split()
    assert isinstance(prefix[0], _Counting) and isinstance(rest[0], nn.Dropout)
    samples = mc.samples(x)
    assert trunk.calls == 7  # once per input, not once per sample
    # the same samples as re-running the whole encoder per sample with the same seed
    encoder.eval()
    encoder[1].train()
    torch.manual_seed(0)
    whole = torch.stack(
        [torch.nn.functional.normalize(encoder(x), dim=-1) for _ in range(5)]
    ).detach()
    assert torch.allclose(samples, whole)
    assert samples.std(0).sum() > 0


def test_mahalanobis_pooling_and_rank_warning():
    x, y = labelled_data(12, (1, 8, 8))
    cnn = make_cnn()
    maps = cnn[:5]  # (B, 3, 3, 3) feature maps
    pooled = MahalanobisBaseline(maps, pooling="avg").fit(x, y)
    assert pooled.features(x).shape == (12, 3)
    with pytest.warns(UserWarning, match="rank-deficient.*pooling='avg'"):
        MahalanobisBaseline(maps).fit(x, y)  # 27 flattened features from 12 inputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MahalanobisBaseline(maps, pooling="avg").fit(x, y)
    assert pooled.score(x[:4]).shape == (4,)
    with pytest.raises(ValueError, match="pooling"):
        MahalanobisBaseline(maps, pooling="max")


def test_multi_layer_mahalanobis_z_scored_average():
    x, y = labelled_data(30, (1, 8, 8))
    cnn = make_cnn()
    multi = MultiLayerMahalanobisBaseline(cnn, layers=["1", "4"]).fit(x, y)
    per_layer = multi.layer_scores(x)
    assert per_layer.shape == (30, 2)
    z = (per_layer - per_layer.mean(0)) / per_layer.std(0)
    assert torch.allclose(multi.score(x).double(), z.mean(1), atol=1e-5)
    single = MahalanobisBaseline(cnn[:2], pooling="avg").fit(x, y)
    assert torch.allclose(per_layer[:, 0].float(), single.score(x), rtol=1e-5)
    noise = 5 * torch.rand(10, 1, 8, 8, dtype=torch.float64)
    assert multi.score(noise).mean() > multi.score(x).mean()
    with pytest.raises(ValueError, match="named_modules"):
        MultiLayerMahalanobisBaseline(cnn, layers=["conv9"])


def test_train_encoder_records_its_likelihood_for_the_laplace_step():
    x, y = labelled_data(24, (5,))
    encoder = make_mlp()
    history = train_encoder(encoder, loader(x, y, 12), epochs=2, margin=0.5, progress_bar=False)
    assert isinstance(history, TrainingHistory) and isinstance(history, list)
    assert len(history) == 2 and history.margin == 0.5
    la = laplace.Laplace(encoder, history.likelihood, "all", "diag")
    assert la.pair_likelihood.margin == 0.5
    la.fit(loader(x, y, 12), progress_bar=False)
    with pytest.raises(ValueError, match=r"margin=1.0 \(the instance has 0.5\) would be ignored"):
        laplace.Laplace(encoder, history.likelihood, "all", "diag", margin=1.0)
    assert laplace.Laplace(encoder, "contrastive", "all", "diag").pair_likelihood.margin == 1.0
    likelihood = ContrastiveLikelihood(margin=0.25)
    again = train_encoder(encoder, loader(x, y, 12), likelihood, epochs=1, progress_bar=False)
    assert again.likelihood is likelihood and again.margin == 0.25
    custom = train_encoder(
        encoder,
        loader(x, y, 12),
        lambda g, labels: g.square().mean(),
        epochs=1,
        progress_bar=False,
    )
    assert custom.likelihood is None and custom.margin is None
    with pytest.raises(ValueError, match="custom loss_fn"):
        train_encoder(encoder, loader(x, y, 12), lambda g, labels: g.sum(), epochs=1, margin=0.5)


def test_progress_default_follows_the_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not progress_enabled(None)
    assert progress_enabled(True) and not progress_enabled(False)
    monkeypatch.setattr("sys.stderr", Tty())
    assert progress_enabled(None) and not progress_enabled(False)
    monkeypatch.setenv("LAPLACE_METRIC_PROGRESS", "0")
    assert not progress_enabled(None)
    monkeypatch.delenv("LAPLACE_METRIC_PROGRESS")
    stream = Tty()
    bar = progress(range(3), desc="work", progress_bar=True, file=stream, leave=True)
    assert bar.total == 3
    list(bar)
    assert "work" in stream.getvalue() and "3/3" in stream.getvalue()
    with pytest.raises(TypeError, match="progress_bar"):
        progress_enabled("yes")


def test_fit_progress_bar_shows_the_total(capsys):
    x, y = labelled_data(24, (5,))
    la = laplace.Laplace(make_mlp(), "contrastive", "all", "diag")
    la.fit(loader(x, y, 6), progress_bar=True)
    err = capsys.readouterr().err
    assert "Laplace fit" in err and "/4 " in err  # the total
    la.fit(loader(x, y, 6))  # default: stderr is not a terminal under pytest -> quiet
    assert "Laplace fit" not in capsys.readouterr().err
