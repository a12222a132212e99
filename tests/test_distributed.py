"""Distributed fitting: two CPU processes on gloo equal one process on the union of the shards.

One ``torch.multiprocessing.spawn`` of two ranks (rendezvous through a ``FileStore`` in a tmp
dir) runs every scenario and saves its results; the tests compare them with single-process
fits. Spawning once keeps the file fast (the import of torch in the children dominates).
"""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from laplace import Laplace

from laplace_metric.distributed import is_distributed
from tests.conftest import labelled_data, make_mlp

WORLD = 2
N_BATCHES = 6
BATCH = 8
#: (subset_of_weights, hessian_structure, hessian_method)
CONFIGS = [
    ("all", "diag", "full"),
    ("all", "kron", "full"),
    ("all", "full", "fixed"),
    ("all", "kron", "positives"),
    ("last_layer", "kron", "full"),
    ("subnetwork", "full", "full"),
]
RTOL, ATOL = 1e-6, 1e-12


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = labelled_data(N_BATCHES * BATCH, (5,), n_classes=3, seed=3)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]


def build(subset: str, structure: str, method: str):
    kwargs = {}
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = torch.arange(0, 100, 4)
    return Laplace(
        make_mlp(), "contrastive", subset, structure, hessian_method=method, margin=1.5, **kwargs
    )


def summary(la) -> dict[str, torch.Tensor]:
    """The fitted state and a predictive, as plain tensors."""
    signed = la.H_signed
    out = {
        "loss": torch.as_tensor(la.loss).detach().clone(),
        "n_pairs": torch.tensor(la.n_pairs),
        "n_data": torch.tensor(la.n_data),
        "mean": la.mean.clone(),
    }
    if hasattr(signed, "kfacs"):
        for i, factors in enumerate(signed.kfacs):
            for j, f in enumerate(factors):
                out[f"H_signed.{i}.{j}"] = f.clone()
        for i, factors in enumerate(la.H_facs.kfacs):
            for j, f in enumerate(factors):
                out[f"H.{i}.{j}"] = f.clone()
    else:
        out["H_signed"] = signed.clone()
        out["H"] = la.H.clone()
    x, _ = labelled_data(4, (5,), seed=9)
    out["f_var"] = la(x)[1].detach().clone()
    return out


def worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    results: dict[str, object] = {}
    try:
        data = batches()
        shard = data[rank::WORLD]
        for subset, structure, method in CONFIGS:
            la = build(subset, structure, method)
            la.fit(shard)  # distributed=None: reduces automatically
            results[f"{subset}-{structure}-{method}"] = summary(la)

        # override=False: first half of every shard, then the second half
        la = build("all", "kron", "full")
        la.fit(shard[:1])
        la.fit(shard[1:], override=False)
        results["accumulate"] = summary(la)

        # opting out: each rank fits its own shard alone
        la = build("all", "diag", "full")
        la.fit(shard, distributed=False)
        results["local"] = summary(la)

        # a NaN batch on rank 1 only: every rank raises, no rank is updated
        la = build("all", "full", "full")
        la.fit(shard)
        before = summary(la)
        bad = [(b[0].clone(), b[1]) for b in shard]
        if rank == 1:
            bad[-1][0][0, 0] = float("nan")
        try:
            la.fit(bad)
            results["nan_error"] = "no error"
        except Exception as err:  # noqa: BLE001 - recorded for the parent
            results["nan_error"] = f"{type(err).__name__}: {err}"
        after = summary(la)
        results["nan_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)

        # different weights on the ranks are detected
        la = build("all", "diag", "positives")
        if rank == 1:
            with torch.no_grad():
                next(la.model.parameters())[0, 0] += 1e-6
        try:
            la.fit(shard)
            results["weights_error"] = "no error"
        except Exception as err:  # noqa: BLE001
            results["weights_error"] = f"{type(err).__name__}: {err}"
        results["ok"] = True
    except Exception:  # noqa: BLE001
        results["traceback"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert res.get("ok"), f"rank {r} failed:\n{res.get('traceback')}"
    return results


def single_process(subset: str, structure: str, method: str) -> dict[str, torch.Tensor]:
    la = build(subset, structure, method)
    la.fit(batches(), distributed=False)
    return summary(la)


def assert_same(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    worst = 0.0
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert torch.allclose(got[key].double(), want[key].double(), rtol=RTOL, atol=ATOL), key
        diff = (got[key].double() - want[key].double()).abs().max()
        worst = max(worst, float(diff / want[key].double().abs().max().clamp(min=1e-300)))
    return worst


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
def test_two_ranks_equal_one_process(ranks, config):
    want = single_process(*config)
    for res in ranks:
        assert_same(res["-".join(config)], want)
    # every rank holds bit-identical posteriors
    for key in want:
        assert torch.equal(ranks[0]["-".join(config)][key], ranks[1]["-".join(config)][key])


def test_kron_factors_are_normalised_by_the_global_pair_count(ranks):
    got = ranks[0]["all-kron-positives"]
    want = single_process("all", "kron", "positives")
    local = [
        sum(int(b[1].eq(b[1][:, None]).triu(1).sum()) for b in batches()[r::2]) for r in (0, 1)
    ]
    assert int(got["n_pairs"]) == sum(local) == int(want["n_pairs"])
    assert torch.allclose(got["H.0.1"], want["H.0.1"], rtol=RTOL, atol=ATOL)
    # normalising by one rank's count instead would be off by sum(local) / local[0]
    assert not torch.allclose(got["H.0.1"] * sum(local) / local[0], want["H.0.1"], rtol=1e-3)


def test_override_false_accumulates_across_ranks_once(ranks):
    want = single_process("all", "kron", "full")
    for res in ranks:
        assert_same(res["accumulate"], want)


def test_opt_out_fits_the_local_shard(ranks):
    data = batches()
    for rank, res in enumerate(ranks):
        la = build("all", "diag", "full")
        la.fit(data[rank::WORLD], distributed=False)
        assert_same(res["local"], summary(la))


def test_a_failing_rank_fails_every_rank_and_updates_none(ranks):
    assert ranks[1]["nan_error"].startswith("ValueError: The input batch contains NaN")
    assert ranks[0]["nan_error"].startswith("RuntimeError: Distributed fit failed on rank(s) [1]")
    assert ranks[0]["nan_unchanged"] and ranks[1]["nan_unchanged"]


def test_different_weights_are_detected(ranks):
    for res in ranks:
        assert "different weights" in res["weights_error"]


def test_flag_without_process_group():
    assert not dist.is_initialized()
    assert is_distributed(None) is False
    assert is_distributed(False) is False
    with pytest.raises(RuntimeError, match="init_process_group"):
        is_distributed(True)
    la = build("all", "diag", "positives")
    with pytest.raises(RuntimeError, match="init_process_group"):
        la.fit(batches(), distributed=True)
    assert la.H_signed is None


def test_example_script_exists():
    script = Path(__file__).parents[1] / "examples" / "distributed_fit.py"
    assert script.is_file() and "init_process_group" in script.read_text()
