"""Using one's own model: tuple/dict outputs, the last-layer rule, modes, dtypes, saving."""

from __future__ import annotations

import io

import pytest
import torch
from laplace import Laplace
from torch import nn

from laplace_metric import ReferencePairGGN, SelectOutput
from tests.conftest import labelled_data, loader, make_mlp


class TwoHeads(nn.Module):
    """Returns (embedding, logits), the logits head run after the embedding layer."""

    def __init__(self):
        super().__init__()
        self.body = make_mlp()
        self.head = nn.Linear(3, 4).double()

    def forward(self, x):
        emb = self.body(x)
        return emb, self.head(emb)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_mlp()

    def forward(self, x):
        return {"embedding": self.body(x), "aux": x.sum(-1)}


def data(n=24):
    x, y = labelled_data(n, (5,))
    return x, y, loader(x, y, 12)


@pytest.mark.filterwarnings("ignore:Using HookPairGGN")
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_tuple_output_is_a_clear_error_before_any_fit(subset):
    x, y, train = data()
    la = Laplace(TwoHeads(), "contrastive", subset, "diag")
    with pytest.raises(
        TypeError, match=r"returned a tuple \(Tensor\(1, 3\), Tensor\(1, 4\)\).*SelectOutput"
    ):
        la.fit(train)
    assert la.H_signed is None


def test_select_output_gives_the_plain_encoders_posterior():
    x, y, train = data()
    plain = Laplace(make_mlp(), "contrastive", "all", "diag", backend=ReferencePairGGN)
    plain.fit(train)
    for wrapped in (
        SelectOutput(TwoHeads(), key=0),
        SelectOutput(DictOut(), key="embedding"),
        SelectOutput(DictOut(), fn=lambda out: out["embedding"]),
    ):
        # freeze the heads outside the embedding so that the parameter sets agree
        for name, p in wrapped.named_parameters():
            p.requires_grad_("body" in name)
        la = Laplace(wrapped, "contrastive", "all", "diag", backend=ReferencePairGGN)
        la.fit(train)
        torch.testing.assert_close(la.H, plain.H)
        torch.testing.assert_close(la(x[:3])[0], plain(x[:3])[0])
    with pytest.raises(KeyError, match="no key 'emb'"):
        SelectOutput(DictOut(), key="emb")(x)
    with pytest.raises(ValueError, match="exactly one"):
        SelectOutput(DictOut())


def test_last_layer_rule_is_explained():
    x, y, train = data()
    ends_in_tanh = nn.Sequential(make_mlp(), nn.Tanh())
    with pytest.raises(
        ValueError, match=r"last module run is Tanh \('1'\).*subset_of_weights='all'"
    ):
        Laplace(ends_in_tanh, "contrastive", "last_layer", "diag").fit(train)
    # the embedding is selected, but the logits head runs after it: last-layer Laplace would
    # fit the wrong layer
    with pytest.raises(ValueError, match="would fit 'model.head'"):
        Laplace(SelectOutput(TwoHeads(), key=0), "contrastive", "last_layer", "diag").fit(train)
    # all-weights Laplace does not depend on the order
    Laplace(nn.Sequential(make_mlp(), nn.Tanh()), "contrastive", "all", "diag").fit(train)


def test_train_mode_is_restored_after_fit_and_prediction():
    x, y, train = data()
    model = nn.Sequential(make_mlp(), nn.Dropout(0.5))
    model.train()
    model[0].eval()  # a mixed state is restored exactly
    la = Laplace(model, "contrastive", "all", "diag")
    la.fit(train)
    modes = [m.training for m in model.modules()]
    assert modes[0] and not modes[1]
    mean_a, _ = la(x[:4])
    mean_b, _ = la(x[:4])
    torch.testing.assert_close(mean_a, mean_b)  # dropout off during prediction
    la.predictive_samples(x[:4], n_samples=2)
    la.predictive_uncertainty(x[:4])
    assert [m.training for m in model.modules()] == modes


def test_dtype_mismatch_at_prediction_is_clear():
    x, y, train = data()
    la = Laplace(make_mlp(), "contrastive", "all", "diag")
    la.fit(train)
    for call in (la, la.predictive_samples, la.predictive_uncertainty):
        with pytest.raises(
            TypeError,
            match="x has dtype torch.float32 but the model's parameters have dtype torch.float64",
        ):
            call(x.float())


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_load_into_a_fresh_encoder_is_an_error(subset):
    x, y, train = data()
    encoder = make_mlp(seed=0)
    la = Laplace(encoder, "contrastive", subset, "kron")
    la.fit(train)
    buffer, weights = io.BytesIO(), io.BytesIO()
    torch.save(la.state_dict(), buffer)
    torch.save(encoder.state_dict(), weights)
    state = lambda b: torch.load(io.BytesIO(b.getvalue()), weights_only=True)  # noqa: E731

    fresh = Laplace(make_mlp(seed=1), "contrastive", subset, "kron")
    with pytest.raises(ValueError, match="load the encoder's weights first"):
        fresh.load_state_dict(state(buffer))
    assert fresh.H_signed is None  # nothing was loaded

    restored_encoder = make_mlp(seed=1)
    restored_encoder.load_state_dict(state(weights))
    restored = Laplace(restored_encoder, "contrastive", subset, "kron")
    restored.load_state_dict(state(buffer))
    for a, b in zip(restored(x[:3]), la(x[:3])):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:Using HookPairGGN")
def test_online_lam_checks_the_encoder_output_first():
    from laplace_metric import fit_online_lam

    x, y, train = data()
    encoder = TwoHeads()
    before = [p.detach().clone() for p in encoder.parameters()]
    with pytest.raises(TypeError, match="SelectOutput"):
        fit_online_lam(encoder, train, "contrastive", "all", "diag", epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
