"""Open-set splits for evaluating uncertainty in metric learning.

The in-distribution classes are split into train / val / test; the held-out classes and uniform
noise images are the out-of-distribution (OOD) sets. ``digits`` ships with scikit-learn and
needs no network; ``mnist`` and ``fashion_mnist`` are downloaded through torchvision.
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
    """torchvision MNIST: 28x28 images, 784 features, downloaded."""

    FASHION_MNIST = "fashion_mnist"
    """torchvision FashionMNIST: 28x28 images, 784 features, downloaded."""


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
    714 OOD images of classes 6-9 (BRIEF section 6).

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


def _load_torchvision(name: OpenSetDataset, root: str | Path, download: bool) -> tuple:
    try:
        from torchvision import datasets as tv_datasets
    except ImportError as err:  # pragma: no cover - torchvision is an optional dependency
        raise ImportError(
            f"dataset={name.value!r} needs torchvision (pip install 'laplace-metric[vision]'); "
            "dataset='digits' needs nothing extra."
        ) from err
    cls = tv_datasets.MNIST if name == OpenSetDataset.MNIST else tv_datasets.FashionMNIST
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise RuntimeError(
            f"Could not load {name.value!r} from {str(root)!r}: the files are not there and the "
            f"download is impossible (no network?). Original error: {err}. Use "
            "dataset='digits' (scikit-learn's digits, no download needed) or place the files "
            "under root."
        ) from err

    def arrays(ds) -> tuple[np.ndarray, np.ndarray]:
        x = ds.data.reshape(len(ds.data), -1).float().div(255.0).numpy()
        return x, ds.targets.numpy()

    return arrays(train), arrays(test)


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
    """Open-set split of ``digits`` (scikit-learn) or ``mnist`` / ``fashion_mnist`` (torchvision).

    For the torchvision datasets, the in-distribution classes of the official training set are
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
        Where torchvision keeps (or downloads) its files.
    download : bool, default=True
        Let torchvision download missing files.

    Returns
    -------
    OpenSetSplit

    Raises
    ------
    RuntimeError
        When the torchvision files are missing and cannot be downloaded.
    """
    name = parse_enum(OpenSetDataset, dataset, "dataset")
    if name == OpenSetDataset.DIGITS:
        return digits_open_set(seed, id_classes, n_noise, n_noise_val, val_fraction)
    (x_train, y_train), (x_test, y_test) = _load_torchvision(name, root, download)
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
