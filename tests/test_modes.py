"""Scores, samples and predictions do not depend on the encoder's train/eval mode, and leave
every submodule's mode and buffers (BatchNorm statistics) as they were."""

from __future__ import annotations

import copy

import laplace
import pytest
import torch
from torch import nn

from laplace_metric import UncertaintyScorer
from laplace_metric.baselines import (
    DeepEnsembleBaseline,
    KNNDistanceBaseline,
    MahalanobisBaseline,
    MCDropoutBaseline,
    penultimate,
)
from laplace_metric.encoders import eval_mode
from tests.conftest import labelled_data, loader


def bn_dropout_encoder(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(8, 3),
    ).double()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _state(model: nn.Module) -> tuple[list[bool], dict[str, torch.Tensor]]:
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    return modes, buffers


def _assert_untouched(model: nn.Module, state) -> None:
    modes, buffers = state
    assert [m.training for m in model.modules()] == modes
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


def _mixed_train_mode(model: nn.Module) -> None:
    model.train()
    model[4].eval()  # one submodule in eval: each submodule's own mode must come back


def _outputs(la, x_train, x) -> dict[str, torch.Tensor]:
    scorer = UncertaintyScorer(la, x_train, torch.arange(len(x_train)) % 3, n_samples=5)
    out = scorer.scores(x, ["posterior_knn", "sampled_std", "trace"])
    result = scorer.retrieval(x)
    out["confidence"] = result.confidence
    out["embeddings"] = scorer.embeddings(x)
    out["database"] = scorer.database_embeddings
    gen = torch.Generator().manual_seed(3)
    out["predictive_samples"] = la.predictive_samples(x, "nn", n_samples=4, generator=gen)
    gen = torch.Generator().manual_seed(3)
    out["nn_mean"] = la(x, pred_type="nn", n_samples=4, generator=gen)[0]
    out["glm_var"] = la(x)[1]
    return out


@pytest.mark.parametrize(
    ("subset", "structure"), [("all", "diag"), ("last_layer", "kron"), ("all", "kron")]
)
def test_scores_equal_eval_mode_scores_and_model_untouched(subset, structure):
    x, y = labelled_data(24, (5,))
    model = bn_dropout_encoder()
    model.eval()
    la = laplace.Laplace(
        model, "contrastive", subset_of_weights=subset, hessian_structure=structure
    )
    la.fit(loader(x, y, 12), progress_bar=False)
    expected = _outputs(la, x, x[:6])

    _mixed_train_mode(model)
    state = _state(model)
    got = _outputs(la, x, x[:6])
    _assert_untouched(model, state)
    for name, value in expected.items():
        assert torch.allclose(got[name], value), name

    # a refit from train mode gives the same posterior and leaves the model as it was
    H = la.H.clone() if isinstance(la.H, torch.Tensor) else None
    la.fit(loader(x, y, 12), progress_bar=False)
    _assert_untouched(model, state)
    if H is not None:
        assert torch.allclose(la.H, H)


def test_baselines_ignore_mode_and_restore_it():
    x, y = labelled_data(24, (5,))
    model = bn_dropout_encoder()
    members = [bn_dropout_encoder(seed) for seed in (1, 2)]

    def run() -> dict[str, torch.Tensor]:
        knn = KNNDistanceBaseline(model).fit(x)
        maha = MahalanobisBaseline(penultimate(model)).fit(x, y)
        ens = DeepEnsembleBaseline(members).fit(x)
        mc = MCDropoutBaseline(model, n_samples=3)
        return {
            "knn": knn.score(x[:5]),
            "maha": maha.score(x[:5]),
            "ens": ens.score(x[:5]),
            "ens_embed": ens.embed(x[:5]),
            "mc": mc.score(x[:5]),
        }

    for m in (model, *members):
        m.eval()
    expected = run()
    for m in (model, *members):
        _mixed_train_mode(m)
    states = [_state(m) for m in (model, *members)]
    got = run()
    for m, state in zip((model, *members), states):
        _assert_untouched(m, state)
    for name, value in expected.items():
        assert torch.allclose(got[name], value), name


def test_eval_mode_restores_buffers_changed_inside():
    model = bn_dropout_encoder()
    _mixed_train_mode(model)
    state = _state(model)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
        model.train()
        model(torch.randn(4, 5, dtype=torch.float64))  # updates the running statistics
    _assert_untouched(model, state)
    reference = copy.deepcopy(model)
    assert torch.equal(reference[1].running_mean, model[1].running_mean)
