"""The splits of ``posterior_controls.py``: FashionMNIST -> MNIST from the packaged offline
copies, and the tensors (and wrongly retrieved test queries) of a trained encoder's split."""

from __future__ import annotations

import torch


def fashion_split(seed: int, n_train: int = 4000, n_val: int = 1000, n_test: int = 2000):
    """FashionMNIST train / val (from the training set) / test, MNIST test images as the OOD
    set, uniform noise; the packaged offline copies (see ``docs/fashion_mnist.rst``)."""
    from torch.utils.data import TensorDataset

    from laplace_metric.data import OpenSetSplit, load_idx_dataset

    fashion, mnist = load_idx_dataset("fashion_mnist"), load_idx_dataset("mnist")
    gen = torch.Generator().manual_seed(seed)

    def images(a, idx):
        return torch.as_tensor(a[idx.numpy()], dtype=torch.float32).unsqueeze(1) / 255.0

    def labels(a, idx):
        return torch.as_tensor(a[idx.numpy()], dtype=torch.int64)

    train = torch.randperm(len(fashion.y_train), generator=gen)[: n_train + n_val]
    test = torch.randperm(len(fashion.y_test), generator=gen)[:n_test]
    ood = torch.randperm(len(mnist.y_test), generator=gen)[:n_test]
    tr, va = train[:n_train], train[n_train:]
    noise = torch.rand(600, 1, 28, 28, generator=gen)
    return OpenSetSplit(
        train=TensorDataset(images(fashion.x_train, tr), labels(fashion.y_train, tr)),
        val=TensorDataset(images(fashion.x_train, va), labels(fashion.y_train, va)),
        test=TensorDataset(images(fashion.x_test, test), labels(fashion.y_test, test)),
        ood_classes=TensorDataset(images(mnist.x_test, ood), labels(mnist.y_test, ood)),
        ood_noise=TensorDataset(noise[:500], torch.full((500,), -1)),
        ood_noise_val=TensorDataset(noise[500:], torch.full((100,), -1)),
        id_classes=tuple(range(10)),
    )


def seed_data(split, det, candidates: tuple[int, ...]) -> dict:
    """The split's tensors, and which test queries the trained encoder retrieves wrongly."""
    from laplace_metric.metrics import top1_labels

    x_tr, y_tr = split.train.tensors
    x_te, y_te = split.test.tensors
    with torch.no_grad():
        z = torch.nn.functional.normalize(det(torch.cat([x_te, x_tr])), dim=-1)
    wrong = (top1_labels(z[: len(x_te)], z[len(x_te) :], y_tr) != y_te).double()
    return {
        "train": (x_tr, y_tr),
        "y_test": y_te,
        "y_val": split.val.tensors[1],
        "wrong": wrong,
        "inputs": {
            "test": x_te,
            "held": split.ood_classes.tensors[0],
            "noise": split.ood_noise.tensors[0],
            "val": split.val.tensors[0],
            "noise_val": split.ood_noise_val.tensors[0],
        },
        "candidates": candidates,
    }
