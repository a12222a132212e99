"""Kronecker posteriors decompose their factors once per fit (issue #24).

Every fit eigendecomposes each Kronecker factor once; prior tuning (``marglik``) and
prediction reuse that decomposition (laplace-torch adds the prior to the eigenvalues). For
signed curvature (``fixed``/``full``), clipping to the PSD cone and decomposing share one
``eigh``.
"""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from laplace.utils import Kron

import laplace_metric  # noqa: F401  (registers the likelihoods)
from laplace_metric.curvature.projection import decompose_psd_kron, project_psd_kron
from tests.bruteforce import assert_close
from tests.conftest import labelled_data, make_mlp

TOL = 1e-10


def counting_eigh(monkeypatch) -> list[int]:
    calls = [0]
    eigh = torch.linalg.eigh

    def counted(*args, **kwargs):
        calls[0] += 1
        return eigh(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counted)
    return calls


def test_decompose_psd_kron_equals_projection_then_decomposition():
    gen = torch.Generator().manual_seed(0)
    factors = []
    for n, m in ((3, 4), (2, 1)):
        a = torch.randn(n, n, generator=gen, dtype=torch.float64)
        b = torch.randn(m, m, generator=gen, dtype=torch.float64)
        factors.append([a + a.T, b + b.T])  # indefinite
    kron = Kron(factors)
    projected, decomposed = decompose_psd_kron(kron, damping=True)
    want = project_psd_kron(kron)
    want_dec = want.decompose(damping=True)
    assert decomposed.damping
    for got_f, want_f in zip(projected.kfacs, want.kfacs):
        for g, w in zip(got_f, want_f):
            assert_close(g, w, TOL)
    for qs, ls, wqs, wls in zip(
        decomposed.eigenvectors,
        decomposed.eigenvalues,
        want_dec.eigenvectors,
        want_dec.eigenvalues,
    ):
        for q, lam, wq, wl in zip(qs, ls, wqs, wls):
            assert bool((lam >= 0).all())
            assert_close((q * lam) @ q.T, (wq * wl) @ wq.T, TOL)


@pytest.mark.parametrize("method", ["positives", "full"])
def test_one_eigendecomposition_per_factor_and_none_for_prior_tuning(method, monkeypatch):
    x, y = labelled_data(12, (5,))
    la = Laplace(
        make_mlp().double(), "contrastive", "all", "kron", hessian_method=method, margin=4.0
    )
    calls = counting_eigh(monkeypatch)
    la.fit([(x, y)])
    n_factors = sum(1 for fs in la.H_facs.kfacs for f in fs if f.ndim > 1)
    assert calls[0] == n_factors
    fitted = (la.H.eigenvectors, la.H.eigenvalues)
    calls[0] = 0
    la.optimize_prior_precision(method="marglik", n_steps=5)
    la.prior_precision = 3.0
    la(x[:2], pred_type="glm")
    assert calls[0] == 0
    # the decomposition still describes the fitted factors (only the prior changed)
    for qs, ls, wqs, wls in zip(la.H.eigenvectors, la.H.eigenvalues, *fitted):
        for q, lam, wq, wl in zip(qs, ls, wqs, wls):
            assert torch.equal(q, wq) and torch.equal(lam, wl)
