"""Importing laplace_metric must not change any stock laplace-torch behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import laplace
import laplace.laplace
import pytest
import torch
from laplace import (
    DiagLaplace,
    DiagLLLaplace,
    FullLaplace,
    FullLLLaplace,
    KronLaplace,
    KronLLLaplace,
)
from laplace.baselaplace import BaseLaplace

import laplace_metric
from laplace_metric import registry

STOCK = {
    ("all", "diag"): DiagLaplace,
    ("all", "kron"): KronLaplace,
    ("all", "full"): FullLaplace,
    ("last_layer", "diag"): DiagLLLaplace,
    ("last_layer", "kron"): KronLLLaplace,
    ("last_layer", "full"): FullLLLaplace,
}

# A stock computation run both in a clean interpreter and with laplace_metric imported.
STOCK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    if sys.argv[1] == "plugin":
        import laplace_metric  # noqa: F401
    from laplace import Laplace
    torch.manual_seed(0)
    x = torch.randn(32, 4); yc = torch.randint(0, 3, (32,)); yr = torch.randn(32, 3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    out = {}
    for lik, y in (("classification", yc), ("regression", yr)):
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
        for subset in ("all", "last_layer"):
            for structure in ("diag", "kron", "full"):
                la = Laplace(net, lik, subset_of_weights=subset, hessian_structure=structure)
                la.fit(data)
                la.optimize_prior_precision(method="marglik", n_steps=5)
                pred = la(x[:5], pred_type="glm")
                pred = pred if isinstance(pred, torch.Tensor) else torch.cat([p.flatten() for p in pred])
                out[f"{lik}-{subset}-{structure}"] = [type(la).__name__, pred.flatten().tolist(),
                                                      float(la.log_marginal_likelihood())]
    print(json.dumps(out))
    """
)


def test_stock_factory_returns_stock_classes_every_time():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for _ in range(20):
        for (subset, structure), cls in STOCK.items():
            for lik in ("classification", "regression"):
                la = laplace.Laplace(
                    model, lik, subset_of_weights=subset, hessian_structure=structure
                )
                assert type(la) is cls


def test_plugin_keys_cannot_collide_with_stock_lookups():
    def subclasses(cls):
        return set(cls.__subclasses__()).union(
            s for c in cls.__subclasses__() for s in subclasses(c)
        )

    stock_keys = {
        c._key
        for c in subclasses(BaseLaplace)
        if hasattr(c, "_key") and not c.__module__.startswith("laplace_metric")
    }
    for cls in laplace_metric.ESTIMATORS.values():
        assert len(cls._key) == 3 and cls._key not in stock_keys
        assert cls.__name__ not in {
            c.__name__
            for c in subclasses(BaseLaplace)
            if c is not cls and c.__module__.startswith("laplace.")
        }
        assert "asdl" not in cls.__name__.lower() and "backpack" not in cls.__name__.lower()


def test_install_is_idempotent_and_wraps_both_entry_points():
    before = laplace.laplace.Laplace
    registry.install()
    registry.install()
    assert laplace.laplace.Laplace is before is laplace.Laplace
    assert laplace.Laplace.__wrapped__ is laplace.Laplace.stock
    assert laplace.Laplace.__doc__ == laplace.Laplace.stock.__doc__


@pytest.mark.slow
def test_stock_predictions_identical_with_and_without_plugin():
    results = {}
    for mode in ("clean", "plugin"):
        proc = subprocess.run(
            [sys.executable, "-c", STOCK_SCRIPT, mode], capture_output=True, text=True, check=True
        )
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["clean"] == results["plugin"]
    assert len(results["clean"]) == 12


def test_stock_factory_bound_before_import_routes_pairwise_likelihoods():
    """``from laplace import Laplace`` before ``import laplace_metric`` (isort order) still works."""
    stock = laplace.Laplace.stock
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    la = stock(model, "contrastive", "all", "diag", margin=0.3)
    assert type(la) is laplace_metric.MetricDiagLaplace and la.pair_likelihood.margin == 0.3
    assert type(DiagLaplace(model, "contrastive")) is laplace_metric.MetricDiagLaplace
    assert type(DiagLaplace(model, "classification")) is DiagLaplace
    with pytest.raises(ValueError, match="not supported for pairwise"):
        laplace.FunctionalLaplace(model, "contrastive", n_subset=3)
