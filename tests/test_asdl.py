"""AsdlPairGGN against the exact torch.func reference (float64, 1e-10 relative)."""

from __future__ import annotations

import laplace
import pytest
import torch
from laplace.utils import Kron
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import laplace_metric  # noqa: F401  (registers the likelihoods)
from laplace_metric.curvature import AsdlPairGGN, BackPackPairGGN, ReferencePairGGN
from laplace_metric.likelihoods import ContrastiveLikelihood
from tests.bruteforce import assert_close, rel_error

# one thread: on a shared 2-core machine oversubscribed threads make tiny ops ~30x slower
torch.set_num_threads(1)

DEVICES = ["cpu"] + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []
)
METHODS = ["positives", "fixed", "full"]
LABELS = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2, 0])


def norm_stats(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for sub in model.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.running_mean.normal_()
                sub.running_var.uniform_(0.5, 2.0)
                sub.weight.uniform_(0.5, 1.5)
                sub.bias.normal_()
    return model


MODELS = {
    "mlp": (
        lambda: nn.Sequential(
            nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.GELU(), nn.Linear(6, 4)
        ),
        (5,),
    ),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 2, stride=2),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(16, 4),
        ),
        (2, 8, 8),
    ),
    "batchnorm": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ELU(), nn.Linear(6, 4)),
        (5,),
    ),
}
#: Structures each model supports with ASDL (BatchNorm has no Kronecker factors here).
STRUCTURES = {"mlp": ["diag", "kron", "full"], "cnn": ["diag", "kron", "full"]}
STRUCTURES["batchnorm"] = ["diag", "full"]
CASES = [(m, s) for m, structures in STRUCTURES.items() for s in structures]


def build(name: str, device: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = norm_stats(factory()).to(device=device, dtype=dtype).eval()
    x = torch.randn(len(LABELS), *shape, device=device, dtype=dtype)
    return model, x, LABELS.to(device)


def likelihood(method: str, normalize: bool = True) -> ContrastiveLikelihood:
    return ContrastiveLikelihood(margin=2.0, normalize=normalize, hessian_method=method)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name, structure", CASES)
def test_matches_reference(name, structure, method, device):
    model, x, y = build(name, device)
    lik = likelihood(method)
    ours = getattr(AsdlPairGGN(model, lik), structure)(x, y)
    ref = getattr(ReferencePairGGN(model, lik), structure)(x, y)
    assert ours.n_pairs == ref.n_pairs > 0
    assert_close(ours.hessian, ref.hessian, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_jacobians_match_reference(name, device):
    model, x, _ = build(name, device)
    lik = likelihood("positives")
    jac, _ = AsdlPairGGN(model, lik).jacobians(x)
    ref, _ = ReferencePairGGN(model, lik).jacobians(x)
    assert rel_error(jac, ref) < 1e-10


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_unnormalised_and_float32(structure):
    model, x, y = build("cnn", "cpu")
    lik = likelihood("full", normalize=False)
    ref = getattr(ReferencePairGGN(model, lik), structure)(x, y).hessian
    assert_close(getattr(AsdlPairGGN(model, lik), structure)(x, y).hessian, ref, 1e-10)
    ours = getattr(AsdlPairGGN(model.float(), lik), structure)(x.float(), y).hessian
    if isinstance(ours, Kron):
        ours = Kron([[t.double() for t in f] for f in ours.kfacs])
    assert_close(ours if isinstance(ours, Kron) else ours.double(), ref, 1e-4)


def test_column_chunks_equal_one_pass():
    model, x, y = build("mlp", "cpu")
    lik = likelihood("full")
    whole = AsdlPairGGN(model, lik).full(x, y).hessian
    chunked = AsdlPairGGN(model, lik)
    chunked.max_gradient_elements = 1  # one column per pass
    assert_close(chunked.full(x, y).hessian, whole, 1e-12)


def test_model_left_clean_for_backpack_and_torch_func():
    model, x, y = build("mlp", "cpu")
    lik = likelihood("positives")
    AsdlPairGGN(model, lik).diag(x, y)
    for sub in model.modules():
        assert not sub._forward_hooks and not sub._backward_hooks
    # BackPACK's full backward hooks still work on (a copy of) the model afterwards
    assert_close(
        BackPackPairGGN(model, lik).diag(x, y).hessian,
        ReferencePairGGN(model, lik).diag(x, y).hessian,
        1e-10,
    )


def test_unsupported_layers_errors():
    x, y = torch.randn(6, 2, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    conv1d = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match="Conv1d"):
        AsdlPairGGN(conv1d, likelihood("positives")).diag(x, y)
    model, x, y = build("batchnorm", "cpu")
    with pytest.raises(ValueError, match="BatchNorm1d"):
        AsdlPairGGN(model, likelihood("positives")).kron(x, y)


@pytest.mark.parametrize(
    "subset, structure",
    [("all", "kron"), ("last_layer", "diag"), ("subnetwork", "full")],
)
def test_laplace_fits_and_predicts(subset, structure):
    model, x, y = build("cnn", "cpu")
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    kwargs = {"subnetwork_indices": torch.tensor([1, 9, 60, 100])} if subset == "subnetwork" else {}
    fits = []
    for backend in (AsdlPairGGN, ReferencePairGGN):
        la = laplace.Laplace(
            model,
            likelihood="contrastive",
            subset_of_weights=subset,
            hessian_structure=structure,
            backend=backend,
            **kwargs,
        )
        la.fit(loader)
        fits.append((la.H_signed, la(x[:3])[1]))
    assert_close(fits[0][0], fits[1][0], 1e-10)
    assert rel_error(fits[0][1], fits[1][1]) < 1e-8
