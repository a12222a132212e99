"""A fitted estimator saved with ``state_dict`` predicts identically in a fresh process.

The parent fits every configuration, saves ``torch.save(la.state_dict())`` and the encoder's
weights, and one ``subprocess`` (a fresh interpreter) rebuilds each estimator, loads the state
with ``torch.load(..., weights_only=True)`` and saves its predictions, which must equal the
parent's bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from laplace import Laplace

from tests.conftest import labelled_data, loader, make_mlp

ROOT = Path(__file__).parents[1]
CONFIGS = [
    (subset, structure, method)
    for subset in ("all", "last_layer")
    for structure in ("diag", "kron", "full")
    for method in ("positives", "full")
]
CONFIGS.append(("subnetwork", "full", "fixed"))


def build(subset: str, structure: str, method: str, dtype: torch.dtype = torch.float64):
    kwargs = {}
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = torch.arange(0, 60, 3)
    model = make_mlp(seed=5).to(dtype)
    return Laplace(
        model, "contrastive", subset, structure, hessian_method=method, margin=1.2, **kwargs
    )


def predictions(la, x: torch.Tensor) -> dict[str, torch.Tensor]:
    # one explicit chunk: the default chunking follows the free memory, which differs between
    # processes, and bit-for-bit equality needs the same floating-point summation order
    batch = len(x)
    mean, cov = la(x, batch_size=batch)
    _, var = la(x, diagonal_output=True, batch_size=batch)
    gen = torch.Generator().manual_seed(0)
    return {
        "mean": mean,
        "cov": cov,
        "var": var,
        "samples": la.predictive_samples(x, n_samples=5, generator=gen, batch_size=batch),
        "score": la.predictive_uncertainty(x, batch_size=batch),
        "log_marglik": la.log_marginal_likelihood().detach().reshape(1),
    }


CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from tests.test_serialization import CONFIGS, build, predictions

    folder = sys.argv[1]
    x = torch.load(f"{folder}/x.pt", weights_only=True)
    out = {}
    for config in CONFIGS:
        name = "-".join(config)
        la = build(*config)
        la.model.load_state_dict(torch.load(f"{folder}/{name}.model.pt", weights_only=True))
        la.load_state_dict(torch.load(f"{folder}/{name}.la.pt", weights_only=True))
        out[name] = predictions(la, x)
    torch.save(out, f"{folder}/child.pt")
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("state")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child (OMP_NUM_THREADS=1): same summation order
    data_x, data_y = labelled_data(18, (5,))
    x, _ = labelled_data(4, (5,), seed=11)
    torch.save(x, folder / "x.pt")
    parent = {}
    for config in CONFIGS:
        name = "-".join(config)
        la = build(*config)
        la.fit(loader(data_x, data_y, 6))
        la.optimize_prior_precision(method="marglik", n_steps=5)
        torch.save(la.model.state_dict(), folder / f"{name}.model.pt")
        torch.save(la.state_dict(), folder / f"{name}.la.pt")
        parent[name] = predictions(la, x)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], cwd=ROOT, env=env, check=True, timeout=120
    )
    child = torch.load(folder / "child.pt", weights_only=True)
    torch.set_num_threads(threads)
    return folder, parent, child


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
def test_fresh_process_predicts_identically(saved, config):
    _, parent, child = saved
    name = "-".join(config)
    assert parent[name].keys() == child[name].keys()
    for key, value in parent[name].items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(child[name][key], value), key


def test_state_is_plain_and_weights_only_loadable(saved):
    folder, _, _ = saved
    state = torch.load(folder / "all-kron-full.la.pt", weights_only=True)
    assert type(state["likelihood"]) is str and state["likelihood"] == "contrastive"
    assert state["likelihood_config"]["hessian_method"] == "full"
    assert isinstance(state["n_pairs"], int) and state["n_pairs"] > 0


def test_loading_into_another_structure_is_refused(saved):
    folder, _, _ = saved
    state = torch.load(folder / "all-kron-full.la.pt", weights_only=True)
    with pytest.raises(ValueError, match="cannot be loaded into a"):
        build("all", "diag", "full").load_state_dict(state)
    with pytest.raises(ValueError, match="hessian_method"):
        build("all", "kron", "positives").load_state_dict(state)


def test_loading_all_weights_state_into_last_layer_is_refused_clearly(saved):
    folder, _, _ = saved
    state = torch.load(folder / "all-kron-full.la.pt", weights_only=True)
    with pytest.raises(ValueError, match="MetricKronLaplace"):
        build("last_layer", "kron", "full").load_state_dict(state)


def test_unfitted_estimator_has_no_state():
    with pytest.raises(AttributeError, match="not fitted"):
        build("all", "diag", "positives").state_dict()


def test_float32_round_trip_in_process(tmp_path):
    data_x, data_y = labelled_data(12, (5,))
    la = build("all", "kron", "full", dtype=torch.float32)
    la.fit(loader(data_x.float(), data_y, 6))
    torch.save(la.state_dict(), tmp_path / "la.pt")
    fresh = build("all", "kron", "full", dtype=torch.float32)
    fresh.load_state_dict(torch.load(tmp_path / "la.pt", weights_only=True))
    x = data_x[:3].float()
    assert torch.equal(fresh(x)[1], la(x)[1])
