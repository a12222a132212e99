"""``benchmarks/encoders.py`` runs a cheap all-layer cell in its own process and tabulates it."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("encoders_bench", ROOT / "benchmarks/encoders.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["encoders_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_mlp_all_layer_diag_cell_records_every_stage():
    bench = _load()
    args = argparse.Namespace(threads=1, cap_gb=6.0, timeout=300.0)
    row = bench.measure("mlp", "lam-all-diag", args)
    assert "error" not in row, row
    for stage in ("fit", "glm32", "score256", "knn256", "knn256cand"):
        assert stage in row and "error" not in row[stage], (stage, row.get(stage))
        assert row[stage]["time"] > 0
    table = bench.table([row])
    assert "| mlp | lam-all-diag |" in table
    assert "(candidates " in table


def test_stages_select_what_runs_after_the_fit():
    bench = _load()
    args = argparse.Namespace(threads=1, cap_gb=6.0, timeout=300.0, stages=["fit", "knn256"])
    row = bench.measure("mlp", "lam-all-diag", args)
    assert "error" not in row, row
    assert {"fit", "knn256"} <= set(row) and not {"glm32", "score256", "knn256cand"} & set(row)
