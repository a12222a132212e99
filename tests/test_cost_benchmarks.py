"""The cost benchmarks run at toy size: the Kronecker factor census, gallery scoring, the
interleaved pairs table, the GLM variances against the full covariance and the scores' costs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_kron_factor_census_follows_laplace_torch_layout():
    pytest.importorskip("torchvision")
    bench = _load("kron_decomposition")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    # conv kernel: 8 and 3*3*3; conv bias: 8; linear: 4 and 8; linear bias: 4
    assert bench.factor_sizes(model) == {8: 3, 27: 1, 4: 2}
    resnet = bench.build_encoder("resnet18", 128)[0]
    assert bench.factor_sizes(resnet)[4608] == 3  # layer4's 3x3 convolutions over 512 channels
    vit = bench.build_encoder("vit_small", 128)[0]
    assert 65 * 64 not in bench.factor_sizes(vit)  # the positional embedding is left out
    timed = bench.main(["--models", "mlp", "--repeats", "1", "--threads", "1"])
    eigh, cholesky = timed["mlp"]
    assert eigh > 0 and cholesky > 0


def test_gallery_scoring_runs_both_database_embeddings():
    bench = _load("gallery_scoring")
    args = ["--model", "mlp", "--galleries", "96", "--queries", "4", "--samples", "3"]
    (row,) = bench.main([*args, "--candidates", "96", "--threads", "1"])
    # candidates covering the whole gallery: the same score, so a perfect rank agreement
    assert row["spearman"] == pytest.approx(1.0)
    assert row["per_sample s"] > 0 and row["candidates s"] > 0


def test_interleaved_pairs_table_times_both_fits_in_one_process():
    import argparse

    bench = _load("curvature")
    args = argparse.Namespace(models=["mlp"], rounds=2, device="cpu", threads=1)
    rows = bench.interleaved_table(args)
    assert [r["structure"] for r in rows] == ["diag", "kron"]
    for row in rows:
        assert row["default ms"] > 0 and row["floor ms"] > 0
        assert row["low"] <= row["ratio"] <= row["high"]


def test_glm_variances_equal_the_full_covariance_diagonal():
    bench = _load("glm_variances")
    args = ["--models", "vit_small", "cnn", "--structures", "diag", "kron", "--dim", "8"]
    rows = bench.main([*args, "--fit-images", "20", "--queries", "2", "--rounds", "1"])
    assert [(r["model"], r["structure"]) for r in rows] == [
        ("vit_small", "diag"),
        ("vit_small", "kron"),
        ("cnn", "diag"),
        ("cnn", "kron"),
    ]
    for row in rows:
        assert row["max rel. gap"] < 1e-4  # float32
        assert row["full s/query"] > 0 and row["variances s/query"] > 0


def test_score_costs_times_both_scores():
    bench = _load("score_costs")
    args = ["--model", "mlp", "--gallery", "96", "--queries", "3", "--samples", "3"]
    result = bench.main([*args, "--rounds", "2", "--threads", "1"])
    assert result["posterior_knn"] > 0 and result["knn_variance_ratio"] > 0
    assert result["ratio"] == pytest.approx(result["knn_variance_ratio"] / result["posterior_knn"])
