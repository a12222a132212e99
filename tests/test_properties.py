"""Property-based tests (hypothesis) of the fitted curvature.

* the projected curvature is symmetric PSD for every method and structure;
* ``positives`` equals the exact GGN of the positive pairs (explicit float64 Jacobians);
* ``fit`` twice with ``override=False`` equals one fit on the concatenated data;
* the order of the batches, and of the samples within a batch, does not matter (except for
  ``hessian_method='fixed'``, which by definition differentiates the *second* sample of each
  mined pair ``i < j`` and so depends on the order within a batch).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from laplace import Laplace

from tests.bruteforce import embedding_jacobian
from tests.conftest import make_mlp

STRUCTURES = ["diag", "kron", "full"]
METHODS = ["positives", "fixed", "full"]
# Hypothesis draws random labels, so some batches hold one class: the single-class warning is
# expected here (its own test is in tests/test_errors.py).
pytestmark = pytest.mark.filterwarnings("ignore:.*had a single class:UserWarning")

SETTINGS = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
RTOL = 1e-10


@st.composite
def problems(draw) -> dict:
    """A small float64 encoder and 2-4 labelled batches of 3-7 samples."""
    seed = draw(st.integers(0, 2**16))
    n_classes = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(3, 7), min_size=2, max_size=4))
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        x = torch.randn(size, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, n_classes, (size,), generator=gen)
        y[:2] = 0  # at least one positive pair per batch
        batches.append((x, y))
    margin = draw(st.sampled_from([0.5, 1.5, 3.0]))
    return {"seed": seed, "batches": batches, "margin": margin}


def fit(problem: dict, structure: str, method: str, batches=None, device="cpu"):
    model = make_mlp(in_dim=4, hidden=5, out_dim=3, seed=problem["seed"] % 7).to(device)
    la = Laplace(
        model, "contrastive", "all", structure, hessian_method=method, margin=problem["margin"]
    )
    la.fit(problem["batches"] if batches is None else batches)
    return la


def tensors(la, which: str = "H") -> list[torch.Tensor]:
    value = la.H_facs if which == "H" and hasattr(la, "H_facs") else getattr(la, which)
    if hasattr(value, "kfacs"):
        return [f for factors in value.kfacs for f in factors]
    return [value]


def assert_close_fits(a, b, rtol: float = RTOL) -> None:
    # The PSD projection can clip a factor to (numerically) zero: compare it on the scale of
    # the signed curvature it came from, not on its own (possibly zero) scale.
    scales = [t.abs().max().clamp(min=1e-300) for t in tensors(b, "H_signed")]
    for which in ("H_signed", "H"):
        pairs = zip(tensors(a, which), tensors(b, which), scales, strict=True)
        for s, t, signed_scale in pairs:
            scale = torch.maximum(t.abs().max(), signed_scale)
            assert (s - t).abs().max() <= rtol * scale, which
    assert a.n_pairs == b.n_pairs and a.n_data == b.n_data
    assert torch.allclose(torch.as_tensor(a.loss), torch.as_tensor(b.loss), rtol=RTOL)


def is_sym_psd(matrix: torch.Tensor) -> bool:
    if not torch.allclose(matrix, matrix.T, rtol=0, atol=1e-12 * matrix.abs().max()):
        return False
    eig = torch.linalg.eigvalsh(matrix)
    return bool((eig >= -1e-10 * eig.abs().max().clamp(min=1e-300)).all())


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(problem=problems())
def test_projected_curvature_is_symmetric_psd(structure, method, problem, device):
    la = fit(problem, structure, method, device=device)
    for t in tensors(la):
        assert torch.isfinite(t).all()
        if t.ndim == 1:
            assert (t >= 0).all()
        else:
            assert is_sym_psd(t)
    # and so is the posterior precision that laplace-torch uses
    la.prior_precision = 1e-3
    if structure == "diag":
        assert (la.posterior_precision > 0).all()
    elif structure == "full":
        assert is_sym_psd(la.posterior_precision)
    else:
        assert is_sym_psd(la.posterior_precision.to_matrix())


@SETTINGS
@given(problem=problems())
def test_positives_equals_the_exact_ggn_of_positive_pairs(problem):
    full = fit(problem, "full", "positives")
    diag = fit(problem, "diag", "positives")
    model = full.model
    ggn = torch.zeros(full.n_params, full.n_params, dtype=torch.float64)
    n_positive = 0
    for x, y in problem["batches"]:
        jac, _ = embedding_jacobian(model, x, normalize=True)  # (B, D, P), explicit
        for i in range(len(y)):
            for j in range(i + 1, len(y)):
                if y[i] == y[j]:
                    diff = jac[i] - jac[j]
                    ggn += diff.T @ diff
                    n_positive += 1
    assert full.n_pairs == diag.n_pairs == n_positive
    scale = ggn.abs().max()
    assert (full.H - ggn).abs().max() <= RTOL * scale
    assert (full.H_signed - ggn).abs().max() <= RTOL * scale
    assert (diag.H - ggn.diagonal()).abs().max() <= RTOL * scale


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(problem=problems(), split=st.integers(1, 3))
def test_two_fits_with_override_false_equal_one_fit(structure, method, problem, split):
    batches = problem["batches"]
    split = min(split, len(batches) - 1)
    once = fit(problem, structure, method)
    twice = fit(problem, structure, method, batches=batches[:split])
    twice.fit(batches[split:], override=False)
    assert_close_fits(twice, once)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("method", METHODS)
@SETTINGS
@given(problem=problems(), data=st.data())
def test_batch_order_does_not_matter(structure, method, problem, data):
    batches = problem["batches"]
    order = data.draw(st.permutations(range(len(batches))))
    shuffled = fit(problem, structure, method, batches=[batches[i] for i in order])
    assert_close_fits(shuffled, fit(problem, structure, method))


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("method", ["positives", "full"])
@SETTINGS
@given(problem=problems(), seed=st.integers(0, 1000))
def test_sample_order_within_a_batch_does_not_matter(structure, method, problem, seed):
    gen = torch.Generator().manual_seed(seed)
    permuted = []
    for x, y in problem["batches"]:
        perm = torch.randperm(len(y), generator=gen)
        permuted.append((x[perm], y[perm]))
    assert_close_fits(
        fit(problem, structure, method, batches=permuted), fit(problem, structure, method)
    )


def test_fixed_depends_on_sample_order_within_a_batch():
    """Documented: 'fixed' differentiates the second sample of each pair i < j."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    problem = {"seed": 0, "batches": [(x, y)], "margin": 3.0}
    reverse = torch.arange(5, -1, -1)
    a = fit(problem, "diag", "fixed")
    b = fit(problem, "diag", "fixed", batches=[(x[reverse], y[reverse])])
    assert not torch.allclose(a.H_signed, b.H_signed, rtol=1e-6)
