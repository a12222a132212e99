"""The reference backend and the estimators against brute-force float64 computations."""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from torch.nn.utils import parameters_to_vector

from tests.bruteforce import (
    clip_psd,
    embedding_jacobian,
    kron_factors,
    pairwise_ggn,
    rel_error,
)
from tests.conftest import labelled_data, loader, make_cnn, make_mlp

METHODS = ["positives", "fixed", "full"]
MARGIN = 1.5
RTOL = 1e-10


def setup(net_kind: str, device):
    model = (make_mlp() if net_kind == "mlp" else make_cnn()).to(device)
    shape = (5,) if net_kind == "mlp" else (1, 8, 8)
    x, y = labelled_data(12, shape)
    return model, x.to(device), y.to(device)


def brute_ggn(model, x, y, method, normalize=True, indices=None, last_layer=False):
    module = model[-1] if last_layer else model
    inputs = model[:-1](x).detach() if last_layer else x
    jac, z = embedding_jacobian(module.cpu(), inputs.cpu(), normalize)
    module.to(x.device)
    if indices is not None:
        jac = jac[:, :, indices]
    return pairwise_ggn(jac, z, y.cpu(), MARGIN, method), jac


def project(ggn, method, structure):
    if method == "positives":
        return ggn
    return ggn.clamp(min=0) if structure == "diag" else clip_psd(ggn)


@pytest.mark.parametrize("net_kind", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("subset", ["all", "last_layer", "subnetwork"])
def test_diag_and_full_match_bruteforce(net_kind, structure, method, subset, device):
    model, x, y = setup(net_kind, device)
    kwargs = {}
    indices = None
    if subset == "subnetwork":
        n = sum(p.numel() for p in model.parameters())
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:15]
        kwargs["subnetwork_indices"] = indices.to(device)
    la = Laplace(
        model,
        "contrastive",
        subset_of_weights=subset,
        hessian_structure=structure,
        hessian_method=method,
        margin=MARGIN,
        **kwargs,
    )
    la.fit(loader(x, y, batch_size=12))
    ggn, _ = brute_ggn(model, x, y, method, indices=indices, last_layer=subset == "last_layer")
    signed = ggn.diagonal() if structure == "diag" else ggn
    expected = project(signed, method, structure)
    # PSD projection is 1-Lipschitz in Frobenius norm: measure errors against the signed norm
    assert float((la.H.cpu() - expected).norm() / signed.norm()) < RTOL
    assert rel_error(la.H_signed.cpu(), signed) < RTOL
    assert (
        float(torch.linalg.eigvalsh(la.H.cpu()).min() if structure == "full" else la.H.min())
        >= -1e-12
    )


@pytest.mark.parametrize("net_kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_kron_matches_bruteforce(net_kind, method, subset, device):
    model, x, y = setup(net_kind, device)
    la = Laplace(
        model,
        "contrastive",
        subset_of_weights=subset,
        hessian_structure="kron",
        hessian_method=method,
        margin=MARGIN,
    )
    la.fit(loader(x, y, batch_size=12))
    module = model[-1] if subset == "last_layer" else model
    inputs = model[:-1](x).detach() if subset == "last_layer" else x
    factors = kron_factors(module.cpu(), inputs.cpu(), y.cpu(), MARGIN, method, True)
    module.to(device)
    ggn, _ = brute_ggn(model, x, y, method, last_layer=subset == "last_layer")
    got = [[f.cpu() for f in fs] for fs in la.H_facs.kfacs]
    i, offset = 0, 0
    for name, param in module.named_parameters():
        size = param.numel()
        if param.ndim == 1:
            expected = [ggn[offset : offset + size, offset : offset + size]]
        else:
            layer = name.rsplit(".", 1)[0] if "." in name else ""
            expected = list(factors[layer])
        scale = [e.norm() for e in expected]
        if method != "positives":
            expected = [clip_psd(f) for f in expected]
        for g, e, s in zip(got[i], expected, scale):
            assert float((g - e).norm() / s) < RTOL, (name, method)
        i, offset = i + 1, offset + size


def test_kron_exact_for_last_layer_pair_without_normalisation():
    """One positive pair, unnormalised output: the difference-only factor is exact."""
    model = make_mlp()
    x, _ = labelled_data(2, (5,))
    y = torch.tensor([0, 0])
    la = Laplace(model, "contrastive", "last_layer", "kron", normalize=False)
    la.fit(loader(x, y, batch_size=2))
    b_fac, a_fac = la.H_facs.kfacs[0]
    la_full = Laplace(model, "contrastive", "last_layer", "full", normalize=False)
    la_full.fit(loader(x, y, batch_size=2))
    n_w = b_fac.shape[0] * a_fac.shape[0]
    assert rel_error(torch.kron(b_fac, a_fac), la_full.H[:n_w, :n_w]) < RTOL


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_glm_predictive_is_j_sigma_jt(structure, subset, device):
    model, x, y = setup("mlp", device)
    la = Laplace(
        model,
        "contrastive",
        subset_of_weights=subset,
        hessian_structure=structure,
        prior_precision=0.7,
    )
    la.fit(loader(x, y, batch_size=6))
    mean, cov = la(x[:4])
    module = model[-1] if subset == "last_layer" else model
    inputs = model[:-1](x[:4]).detach() if subset == "last_layer" else x[:4]
    jac, z = embedding_jacobian(module.cpu(), inputs.cpu(), True)
    module.to(device)
    if structure == "kron":
        precision = la.posterior_precision.to_matrix().cpu()
    elif structure == "diag":
        precision = torch.diag(la.posterior_precision.cpu())
    else:
        precision = la.posterior_precision.cpu()
    sigma = torch.linalg.inv(precision)
    expected = torch.einsum("bdp,pq,beq->bde", jac, sigma, jac)
    assert rel_error(mean.cpu(), z) < RTOL
    assert rel_error(cov.cpu(), expected) < 1e-9
    _, var = la(x[:4], diagonal_output=True)
    assert rel_error(var.cpu(), expected.diagonal(dim1=1, dim2=2)) < 1e-9


def test_loss_is_batch_summed_nll_over_same_pairs():
    model, x, y = setup("mlp", "cpu")
    la = Laplace(model, "contrastive", "all", "diag", margin=MARGIN)
    la.fit(loader(x, y, batch_size=6))
    expected = 0.0
    for xb, yb in loader(x, y, batch_size=6):
        with torch.no_grad():
            z = torch.nn.functional.normalize(model(xb), dim=-1)
        i, j = torch.triu_indices(6, 6, offset=1)
        d = (z[i] - z[j]).square().sum(-1)
        pos = yb[i] == yb[j]
        expected = expected + torch.where(pos, d, (MARGIN - d).clamp(min=0)).sum() / 2
    assert abs(float(la.loss) - float(expected)) < 1e-10
    # the default likelihood_scale='dataset' stands for all N(N-1)/2 pairs of the data
    n = len(y)
    offered = sum(len(yb) * (len(yb) - 1) // 2 for _, yb in loader(x, y, batch_size=6))
    assert la.likelihood_factor == pytest.approx(n * (n - 1) / 2 / offered)
    assert torch.allclose(la.log_likelihood, -la.loss * la.likelihood_factor)
    assert la.mean.shape == parameters_to_vector(model.parameters()).shape
