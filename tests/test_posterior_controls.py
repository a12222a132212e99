"""The controls benchmark runs (quick mode) and reports each LAM row beside its control."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_controls_table_has_each_control():
    bench = _load(ROOT / "benchmarks" / "posterior_controls.py", "posterior_controls")
    table = bench.main(["--quick"])
    lines = table.splitlines()
    assert lines[0].startswith("| method | AUROC held-out |")
    names = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    fitted = [n for n in names if n.endswith(": fitted")]
    assert fitted and all(n.replace(": fitted", ": curvature off") in names for n in fitted)
    assert "isotropic noise (all), tuned on validation" in names
    assert "kNN distance, penultimate features" in names


def test_reference_preset_temperature_counts_n_squared_pairs():
    preset = _load(ROOT / "examples" / "lam_reference.py", "lam_reference")
    # an epoch of 128-sample batches over 60k images offers 60000/128 * 128*127/2 pairs
    offered = 60000 / 128 * 128 * 127 / 2
    assert preset.reference_temperature(60000, 128) == pytest.approx(offered / 60000**2)
    assert preset.REFERENCE_MARGIN**2 == pytest.approx(0.49)
