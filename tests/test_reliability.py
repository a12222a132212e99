"""Bad input fails clearly and leaves a fitted estimator untouched; numerical robustness.

``tests/test_errors.py`` checks the messages of the basic cases on a fresh estimator; this
file checks that *every* failing ``fit`` (also one failing in a later batch, and with
``override=False``) leaves a previous fit bit-identical, plus dtypes, devices, float32 vs
float64 agreement and the posterior at extreme prior precisions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from laplace import Laplace
from torch import nn

from tests.conftest import labelled_data, loader, make_mlp

STRUCTURES = ["diag", "kron", "full"]


# ---------------------------------------------------------------------------- helpers
def snapshot(la) -> dict[str, torch.Tensor]:
    """Every piece of fitted state, cloned."""
    out = {
        "loss": torch.as_tensor(la.loss).clone(),
        "n_data": torch.tensor(la.n_data),
        "n_pairs": torch.tensor(la.n_pairs),
        "mean": la.mean.clone(),
        "prior_precision": torch.as_tensor(la.prior_precision).clone(),
    }
    if hasattr(la.H_signed, "kfacs"):
        for name, kron in (("H_signed", la.H_signed), ("H", la.H_facs)):
            for i, factors in enumerate(kron.kfacs):
                for j, f in enumerate(factors):
                    out[f"{name}.{i}.{j}"] = f.clone()
    else:
        out["H_signed"] = la.H_signed.clone()
        out["H"] = la.H.clone()
    return out


def assert_unchanged(la, before: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    after = snapshot(la)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), f"{key} changed after a failed fit"


def fitted(structure: str, device: torch.device | str = "cpu", **kwargs):
    model = make_mlp().to(device)
    la = Laplace(model, "contrastive", "all", structure, margin=1.5, **kwargs)
    x, y = labelled_data(12, (5,))
    la.fit(loader(x.to(device), y.to(device), 6))
    la.prior_precision = 2.5
    return la


def good_batches(n: int = 2, seed: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = labelled_data(6 * n, (5,), seed=seed)
    return [(x[i : i + 6], y[i : i + 6]) for i in range(0, 6 * n, 6)]


class NoBias(nn.Module):
    """Bias-free tanh MLP: a zero input gives a zero (un-normalisable) embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 3, False))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def later_batch(kind: str) -> tuple[object, type[Exception], str]:
    """A bad batch (to follow good ones), the exception and the message it must raise."""
    x, y = good_batches(1, seed=7)[0]
    if kind == "nan":
        x = x.clone()
        x[2, 1] = float("nan")
        return (x, y), ValueError, "NaN or inf"
    if kind == "inf":
        x = x.clone()
        x[0, 0] = float("-inf")
        return (x, y), ValueError, "NaN or inf"
    if kind == "float_labels":
        return (x, y.double()), TypeError, "integer class ids"
    if kind == "2d_labels":
        return (x, torch.stack([y, y], 1)), ValueError, r"shape \(batch,\)"
    if kind == "0d_labels":
        return (x, torch.tensor(1)), ValueError, r"shape \(batch,\)"
    if kind == "label_count":
        return (x, y[:-1]), ValueError, "Got 5 labels for 6 embeddings"
    if kind == "list_labels":
        return (x, y.tolist()), TypeError, "pair of tensors"
    if kind == "triple":
        return (x, y, y), ValueError, "must be a pair"
    if kind == "dict":
        return {"x": x, "y": y}, TypeError, "dict-like"
    if kind == "float32_inputs":
        return (x.float(), y), TypeError, "dtype torch.float32 but the model's parameters"
    if kind == "0d_inputs":
        return (torch.tensor(1.0, dtype=torch.float64), y), ValueError, "batch dimension"
    if kind == "3d_output":  # Linear layers broadcast: the encoder returns (batch, 1, D)
        return (x[:, None, :], y), ValueError, r"shape \(batch, D\)"
    raise AssertionError(kind)


BAD_KINDS = [
    "nan",
    "inf",
    "float_labels",
    "2d_labels",
    "0d_labels",
    "label_count",
    "list_labels",
    "triple",
    "dict",
    "float32_inputs",
    "0d_inputs",
    "3d_output",
]


# ---------------------------------------------------------------------------- no partial update
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_later_batch_raises_and_leaves_fit_unchanged(structure, kind):
    la = fitted(structure)
    before = snapshot(la)
    bad, exc, match = later_batch(kind)
    for override in (True, False):
        with pytest.raises(exc, match=match):
            la.fit([*good_batches(2), bad], override=override)
        assert_unchanged(la, before, bad)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_loader_failing_midway_leaves_fit_unchanged(structure):
    la = fitted(structure)
    before = snapshot(la)

    def flaky():
        yield from good_batches(2)
        raise OSError("disk read failed")

    with pytest.raises(OSError, match="disk read failed"):
        la.fit(flaky())
    assert_unchanged(la, before, None)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize(
    "loader_, exc, match",
    [
        ([], ValueError, "empty"),
        (iter([]), ValueError, "empty"),
        (5, TypeError, "must be an iterable"),
        (None, TypeError, "must be an iterable"),
        # every batch skipped: single samples, or no positive pair for 'positives'
        ([(torch.zeros(1, 5, dtype=torch.float64), torch.tensor([0]))] * 3, ValueError, "No pair"),
        (
            [(labelled_data(4, (5,))[0], torch.arange(4))] * 2,
            ValueError,
            "No pair contributed curvature in 2 batches",
        ),
    ],
    ids=["empty_list", "empty_iter", "int", "none", "single_samples", "distinct_labels"],
)
def test_loader_with_nothing_to_fit_leaves_fit_unchanged(structure, loader_, exc, match):
    la = fitted(structure)
    before = snapshot(la)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'contributed no pair' warnings precede the error
        with pytest.raises(exc, match=match):
            la.fit(loader_)
    assert_unchanged(la, before, None)


@pytest.mark.filterwarnings("ignore:Using HookPairGGN")
@pytest.mark.parametrize("structure", STRUCTURES)
def test_zero_norm_embedding_in_later_batch(structure):
    la = Laplace(NoBias(), "contrastive", "all", structure)
    la.fit(good_batches(2))
    before = snapshot(la)
    x, y = good_batches(1, seed=8)[0]
    x = x.clone()
    x[3] = 0.0
    with pytest.raises(ValueError, match="zero norm"):
        la.fit([*good_batches(2), (x, y)])
    assert_unchanged(la, before, x)
    # without normalisation the same batch is fine
    plain = Laplace(NoBias(), "contrastive", "all", structure, normalize=False)
    plain.fit([*good_batches(2), (x, y)])
    assert all(torch.isfinite(t).all() for t in snapshot(plain).values())


def test_overflowing_curvature_is_rejected_not_committed():
    """float32, no normalisation, inputs 1e20: the squared Jacobians overflow to inf."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    la = Laplace(model, "contrastive", "all", "diag", normalize=False)
    x, y = labelled_data(12, (5,))
    la.fit(loader(x.float(), y, 6))
    before = snapshot(la)
    with pytest.raises(ValueError, match="curvature contains NaN or inf"):
        la.fit(loader(x.float() * 1e20, y, 6))
    assert_unchanged(la, before, x)


def test_single_class_batches_positives_no_warning():
    x, _ = labelled_data(12, (5,))
    y = torch.tensor([0] * 6 + [1] * 6)
    la = Laplace(make_mlp(), "contrastive", "all", "diag")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'positives' needs no negative pair: no warning
        la.fit(loader(x, y, 6))
    assert la.n_pairs == 2 * 15


# ---------------------------------------------------------------------------- options
def test_unknown_subset_and_structure_names():
    with pytest.raises(ValueError):
        Laplace(make_mlp(), "contrastive", "first_layer", "diag")
    with pytest.raises(ValueError, match="Unknown hessian_method 'Positives'"):
        Laplace(make_mlp(), "contrastive", "all", "diag", hessian_method="Positives")


def test_bregman_without_divergence_names_it():
    with pytest.raises(ValueError, match="divergence"):
        Laplace(make_mlp(), "bregman", "all", "diag")


# ---------------------------------------------------------------------------- dtypes, devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_float32_and_float64_models(dtype, structure, device):
    model = make_mlp().to(device=device, dtype=dtype)
    la = Laplace(model, "contrastive", "all", structure, hessian_method="full", margin=1.5)
    x, y = labelled_data(12, (5,))
    la.fit(loader(x.to(dtype), y, 6))  # data on the CPU: moved to the model's device
    for t in snapshot(la).values():
        if t.is_floating_point() and t.ndim:
            assert t.dtype == dtype and t.device.type == device.type
    mean, cov = la(x[:3].to(dtype))
    assert mean.dtype == dtype and torch.isfinite(cov).all()
    other = torch.float64 if dtype == torch.float32 else torch.float32
    with pytest.raises(TypeError, match=f"dtype {other}"):
        la.fit(loader(x.to(other), y, 6))


def test_last_layer_dtype_mismatch_is_caught_before_locating_the_layer():
    la = Laplace(make_mlp(), "contrastive", "last_layer", "diag")
    x, y = labelled_data(12, (5,))
    with pytest.raises(TypeError, match="float32 but the model's parameters have dtype"):
        la.fit(loader(x.float(), y, 6))


def test_generator_must_be_a_generator_on_the_model_device():
    la = fitted("diag")
    x, _ = labelled_data(3, (5,))
    with pytest.raises(ValueError, match="Invalid random generator"):
        la.predictive_samples(x, generator=3)
    with pytest.raises(ValueError, match="Invalid random generator"):
        la.predictive_samples(x, pred_type="nn", n_samples=2, generator=torch.Generator().seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a second device")
def test_cross_device_data_and_generator():
    la = fitted("diag", device="cuda")
    x, y = labelled_data(12, (5,))
    before = snapshot(la)
    la.fit(loader(x, y, 6))  # CPU data, CUDA model: moved by fit
    assert la.H.device.type == "cuda"
    with pytest.raises(ValueError, match="Invalid random generator"):
        la.predictive_samples(x[:2], generator=torch.Generator(device="cpu"))
    cpu = fitted("diag")
    cpu.fit(loader(x.cuda(), y.cuda(), 6))  # CUDA data, CPU model
    assert cpu.H.device.type == "cpu"
    assert before.keys() == snapshot(la).keys()


# ---------------------------------------------------------------------------- numerics
def encoder_64_128_128_16() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 16)
    )


#: Measured on the 64-128-128-16 encoder, 'positives' (see docs/guarantees.rst):
#: H max-normalised 1.1e-7 (diag) / 2.5e-7 (kron); predictive variance 4.4e-7 / 2.3e-6.
F32_TOL_H, F32_TOL_VAR = 2e-6, 2e-5


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_float32_fit_agrees_with_float64(structure, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(24, 64, generator=gen)
    y = torch.arange(24) % 4
    fits = {}
    for dtype in (torch.float32, torch.float64):
        model = encoder_64_128_128_16().to(device=device, dtype=dtype)
        la = Laplace(model, "contrastive", "all", structure)
        la.fit([(x.to(dtype), y)])
        h = la.H_facs.kfacs if structure == "kron" else [[la.H]]
        fits[dtype] = (h, la(x[:6].to(dtype))[1].cpu(), la.loss.cpu())
    (h32, v32, l32), (h64, v64, l64) = fits[torch.float32], fits[torch.float64]
    for f32s, f64s in zip(h32, h64):
        for a, b in zip(f32s, f64s):
            assert (a.double() - b).abs().max() <= F32_TOL_H * b.abs().max()
            assert a.device.type == device.type
    assert (v32.double() - v64).abs().max() <= F32_TOL_VAR * v64.abs().max()
    assert abs(float(l32) - float(l64)) <= 1e-6 * abs(float(l64))


def parameter_variances(la, structure: str) -> torch.Tensor:
    if structure == "diag":
        return la.posterior_variance
    if structure == "full":
        return la.posterior_covariance.diagonal()
    return torch.linalg.inv(la.posterior_precision.to_matrix()).diagonal()


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("method", ["positives", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_nan_or_negative_variance_at_extreme_priors(subset, structure, method, dtype, device):
    model = make_mlp().to(device=device, dtype=dtype)
    la = Laplace(model, "contrastive", subset, structure, hessian_method=method, margin=1.5)
    x, y = labelled_data(24, (5,))
    data = loader(x.to(dtype), y, 8)
    la.fit(data)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=data,
        log_prior_prec_min=-8,
        log_prior_prec_max=8,
        grid_size=5,
    )
    assert 1e-8 * 0.99 <= float(la.prior_precision) <= 1e8 * 1.01
    eps = torch.finfo(dtype).eps
    heads = [t for k, t in snapshot(la).items() if k.split(".")[0] == "H"]
    scale = float(max(t.abs().max() for t in heads))
    for prior in (1e-8, 1.0, 1e8, float(la.prior_precision)):
        la.prior_precision = prior
        try:
            var = parameter_variances(la, structure)
            _, cov = la(x[:6].to(dtype))
        except torch.linalg.LinAlgError:
            # documented failure mode: a dense posterior precision that is singular in the
            # working precision fails its Cholesky factorisation (an error, never a NaN)
            assert structure == "full" and prior < 1e3 * eps * scale, (prior, scale)
            continue
        assert torch.isfinite(var).all() and (var > 0).all(), prior
        assert torch.isfinite(cov).all(), prior
        assert (cov.diagonal(dim1=1, dim2=2) >= 0).all(), prior
        eig = torch.linalg.eigvalsh(cov.double())
        # PSD up to rounding: eps times the condition number of the posterior precision
        cond = (scale + prior) / prior
        assert (eig >= -10 * eps * cond * eig.abs().amax(-1, keepdim=True)).all(), prior
        if structure != "full":  # diagonal and Kronecker inverses are exact up to eps
            assert (eig >= -1e3 * eps * eig.abs().amax(-1, keepdim=True)).all(), prior
