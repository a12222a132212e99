"""Scoring against a large gallery under an all-layer posterior: the whole gallery under every
weight sample (the default) against only each query's nearest items at the mean.

An all-layer LAM diag posterior is fitted on 256 random images of 10 classes (random weights;
``benchmarks/encoder_models.py``, 128-d head); then ``--queries`` random queries are scored by
``UncertaintyScorer`` (the default score, ``--samples`` weight samples) against random galleries
of each size in ``--galleries``, with ``database_embedding='per_sample'`` and
``'candidates'`` (``--candidates`` per query). Printed per gallery: both wall times (the gallery
embedding included), their ratio, the stored gallery embeddings of each, and the Spearman rank
correlation of the two scores (on random data it says little about real data: see
``docs/uncertainty.rst`` for digits).

Run: ``python benchmarks/gallery_scoring.py [--model cnn] [--galleries 4096 32768]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_models import build_encoder  # noqa: E402


def fitted_posterior(model_name: str):
    """All-layer LAM diag on 256 random images of 10 classes, and the input shape."""
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    import laplace_metric  # noqa: F401  (registers the likelihoods)

    model, shape = build_encoder(model_name, 128)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, *shape, generator=gen)
    y = torch.arange(256) % 10
    la = Laplace(model, "contrastive", "all", "diag")
    la.fit(DataLoader(TensorDataset(x, y), batch_size=64))
    return la, shape


def main(argv: list[str] | None = None) -> list[dict]:
    from laplace_metric import UncertaintyScorer
    from laplace_metric.memory import format_bytes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--galleries", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    la, shape = fitted_posterior(args.model)
    gen = torch.Generator().manual_seed(1)
    queries = torch.randn(args.queries, *shape, generator=gen)
    rows = []
    for size in args.galleries:
        gallery = torch.randn(size, *shape, generator=gen)
        result = {"gallery": size}
        scores = {}
        for mode in ("per_sample", "candidates"):
            scorer = UncertaintyScorer(
                la,
                gallery,
                n_samples=args.samples,
                database_embedding=mode,
                n_candidates=args.candidates,
                progress_bar=False,
            )
            start = time.perf_counter()
            scores[mode] = scorer(queries)
            result[f"{mode} s"] = time.perf_counter() - start
            stored = scorer.sampled_database_items
            result[f"{mode} stored"] = args.samples * stored * 128 * 4
        result["spearman"] = float(spearmanr(scores["per_sample"], scores["candidates"]).statistic)
        rows.append(result)
        print(
            f"{args.model}, gallery {size:,}, {args.queries} queries, {args.samples} samples: "
            f"whole gallery {result['per_sample s']:.1f} s "
            f"({format_bytes(result['per_sample stored'])} stored), "
            f"{args.candidates} candidates {result['candidates s']:.1f} s "
            f"({format_bytes(result['candidates stored'])}), "
            f"{result['per_sample s'] / result['candidates s']:.1f}x faster; "
            f"Spearman {result['spearman']:.3f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
