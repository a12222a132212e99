"""BackPackPairGGN against the exact torch.func reference (float64, 1e-10 relative)."""

from __future__ import annotations

import warnings

import laplace
import pytest
import torch
from laplace.utils import Kron
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace_metric  # noqa: F401  (registers the likelihoods)
from laplace_metric.curvature import BackPackPairGGN, ReferencePairGGN
from laplace_metric.curvature.backpack import unsupported_layers
from laplace_metric.likelihoods import ContrastiveLikelihood
from tests.bruteforce import assert_close, rel_error

# one thread: on a shared 2-core machine oversubscribed threads make tiny ops ~30x slower
torch.set_num_threads(1)

DEVICES = ["cpu"] + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []
)
METHODS = ["positives", "fixed", "full"]
STRUCTURES = ["diag", "kron", "full"]
LABELS = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2, 0])


class Residual(nn.Module):
    """``x + f(x)``: needs BackPACK's converter."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.block = nn.Linear(5, 6), Residual(6)
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.inp(x)))


def mlp(act: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 6), nn.Dropout(0.3), nn.Linear(6, 4))


def randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters for BatchNorm layers."""
    with torch.no_grad():
        for sub in model.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.running_mean.normal_()
                sub.running_var.uniform_(0.5, 2.0)
                sub.weight.normal_()
                sub.bias.normal_()
    return model


ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": lambda: nn.ELU(0.7),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU("tanh"),
}


def activation_chain(names: list[str]) -> nn.Module:
    """The named activations between Linear layers, with Dropout (eval) and Identity."""
    layers: list[nn.Module] = [nn.Linear(5, 6)]
    for name in names:
        layers += [ACTIVATIONS[name](), nn.Linear(6, 6)]
    return nn.Sequential(*layers, nn.Dropout(0.3), nn.Identity(), nn.Linear(6, 4))


MODELS = {
    # two shallow chains cover every activation (a deep chain cancels 'full' diagonals badly)
    "activations_a": (lambda: activation_chain(["relu", "leaky_relu", "tanh", "elu"]), (5,)),
    "activations_b": (lambda: activation_chain(["sigmoid", "gelu", "gelu_tanh"]), (5,)),
    "batchnorm1d": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)),
        (5,),
    ),
    "cnn2d": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 2, stride=2, bias=False),
            nn.BatchNorm2d(4),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Identity(),
            nn.Linear(4, 4),
        ),
        (2, 8, 8),
    ),
    "cnn2d_adaptive": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, dilation=2),
            nn.Sigmoid(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 4),
        ),
        (1, 7, 7),
    ),
    "cnn1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 3, 3, stride=2, padding=1),
            nn.BatchNorm1d(3),
            nn.ELU(),
            nn.MaxPool1d(2),
            nn.Conv1d(3, 3, 2),
            nn.AvgPool1d(2),
            nn.AdaptiveAvgPool1d(2),
            nn.Flatten(),
            nn.Linear(6, 4),
        ),
        (2, 12),
    ),
    "residual": (ResNet, (5,)),
}


for _act, _make in ACTIVATIONS.items():
    MODELS[f"mlp_{_act}"] = (lambda make=_make: mlp(make()), (5,))
#: The reference comparison of every structure and method runs on these (each covers layers).
CURVATURE_MODELS = [
    "activations_a",
    "activations_b",
    "batchnorm1d",
    "cnn2d",
    "cnn2d_adaptive",
    "cnn1d",
    "residual",
]


def build(name: str, device: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = MODELS[name]
    model = randomise_norms(factory()).to(device=device, dtype=dtype).eval()
    x = torch.randn(len(LABELS), *shape, device=device, dtype=dtype)
    return model, x, LABELS.to(device)


def likelihood(method: str, normalize: bool = True) -> ContrastiveLikelihood:
    # a margin of 2 keeps some negatives active, so 'full' has both signs
    return ContrastiveLikelihood(margin=2.0, normalize=normalize, hessian_method=method)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("name", CURVATURE_MODELS)
def test_matches_reference(name, structure, method, device):
    model, x, y = build(name, device)
    lik = likelihood(method)
    ours = getattr(BackPackPairGGN(model, lik), structure)(x, y)
    ref = getattr(ReferencePairGGN(model, lik), structure)(x, y)
    assert ours.n_pairs == ref.n_pairs > 0
    assert torch.allclose(ours.loss, ref.loss)
    assert_close(ours.hessian, ref.hessian, 1e-10)


def test_full_method_has_both_signs():
    model, x, y = build("mlp_relu", "cpu")
    terms = likelihood("full").pair_terms(model(x), y)
    assert (terms.signs > 0).any() and (terms.signs < 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_jacobians_match_reference(name, device):
    model, x, _ = build(name, device)
    lik = likelihood("positives")
    jac, z = BackPackPairGGN(model, lik).jacobians(x)
    ref_jac, ref_z = ReferencePairGGN(model, lik).jacobians(x)
    assert rel_error(jac, ref_jac) < 1e-10
    assert rel_error(z, ref_z) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("method", METHODS)
def test_unnormalised_embeddings(structure, method, device):
    model, x, y = build("cnn2d", device)
    lik = likelihood(method, normalize=False)
    ours = getattr(BackPackPairGGN(model, lik), structure)(x, y).hessian
    ref = getattr(ReferencePairGGN(model, lik), structure)(x, y).hessian
    assert_close(ours, ref, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_float32_tolerance(structure, device):
    model, x, y = build("cnn2d", device, dtype=torch.float64)
    lik = likelihood("full")
    ref = getattr(ReferencePairGGN(model, lik), structure)(x, y).hessian
    ours = getattr(BackPackPairGGN(model.float(), lik), structure)(x.float(), y).hessian
    if isinstance(ref, Kron):
        ours = Kron([[t.double() for t in f] for f in ours.kfacs])
    else:
        ours = ours.double()
    assert_close(ours, ref, 1e-4)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_chunked_pairs_equal_one_pass(structure):
    model, x, y = build("mlp_tanh", "cpu")
    lik = likelihood("full")
    whole = getattr(BackPackPairGGN(model, lik), structure)(x, y).hessian
    chunked = BackPackPairGGN(model, lik)
    chunked.max_pairs_per_pass = 4
    assert_close(getattr(chunked, structure)(x, y).hessian, whole, 1e-12)


def test_user_model_stays_hook_free_and_weights_are_tracked():
    model, x, y = build("residual", "cpu")
    lik = likelihood("positives")
    backend = BackPackPairGGN(model, lik)
    backend.diag(x, y)
    for sub in model.modules():
        assert not sub._forward_hooks and not sub._backward_hooks
        assert not hasattr(sub, "input0") and not hasattr(sub, "output")
    assert all(p.grad is None for p in model.parameters())
    # torch.func still works on the user's model, and new weights are picked up
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert_close(backend.diag(x, y).hessian, ReferencePairGGN(model, lik).diag(x, y).hessian, 1e-10)


@pytest.mark.parametrize(
    "layer, expected",
    [
        (nn.Softplus(), "Softplus"),
        (nn.Conv1d(4, 4, 1, groups=2), "groups=2"),
        (nn.LayerNorm(4), "LayerNorm"),
    ],
)
def test_unsupported_layer_error(layer, expected):
    model = nn.Sequential(nn.Linear(5, 4), layer, nn.Linear(4, 3))
    if isinstance(layer, nn.Conv1d):
        model = nn.Sequential(nn.Conv1d(2, 4, 1), layer, nn.Flatten(), nn.Linear(12, 3))
        x = torch.randn(6, 2, 3)
    else:
        x = torch.randn(6, 5)
    assert any(expected in s for s in unsupported_layers(model))
    with pytest.raises(ValueError, match=expected) as info:
        BackPackPairGGN(model, likelihood("positives")).diag(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert "ReferencePairGGN" in str(info.value)


def test_functional_operation_error():
    class Sine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return torch.sin(self.fc(x))

    with pytest.raises(ValueError, match="sin"):
        BackPackPairGGN(Sine(), likelihood("positives")).diag(
            torch.randn(4, 5), torch.tensor([0, 0, 1, 1])
        )


def test_training_mode_batchnorm_error():
    model, x, y = build("batchnorm1d", "cpu")
    model.train()
    with pytest.raises(NotImplementedError, match="evaluation mode"):
        BackPackPairGGN(model, likelihood("positives")).diag(x, y)


# ---------------------------------------------------------------------- estimators
def loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=5)


@pytest.mark.parametrize(
    "subset, structure",
    [
        ("all", "diag"),
        ("all", "kron"),
        ("all", "full"),
        ("last_layer", "diag"),
        ("last_layer", "kron"),
        ("last_layer", "full"),
        ("subnetwork", "diag"),
        ("subnetwork", "full"),
    ],
)
def test_laplace_fits_and_predicts(subset, structure):
    model, x, y = build("cnn2d", "cpu")
    x, y = torch.cat([x, x.flip(0)]), torch.cat([y, y.flip(0)])
    kwargs = (
        {"subnetwork_indices": torch.tensor([0, 5, 40, 77, 90])} if subset == "subnetwork" else {}
    )
    fits = {}
    for backend in (BackPackPairGGN, ReferencePairGGN):
        la = laplace.Laplace(
            model,
            likelihood="contrastive",
            subset_of_weights=subset,
            hessian_structure=structure,
            hessian_method="full",
            backend=backend,
            **kwargs,
        )
        la.fit(loader(x, y))
        mean, var = la(x[:3])
        assert torch.isfinite(var).all()
        fits[backend] = (la.H_signed, mean, var)
    ours, ref = fits[BackPackPairGGN], fits[ReferencePairGGN]
    assert_close(ours[0], ref[0], 1e-10)
    assert rel_error(ours[2], ref[2]) < 1e-8


def test_default_backend_used_by_laplace():
    model, x, y = build("mlp_tanh", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        la = laplace.Laplace(model, likelihood="contrastive", hessian_structure="diag")
    la.fit(loader(x, y))
    assert isinstance(la.backend, BackPackPairGGN)
