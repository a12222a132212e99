"""What ``'knn_variance_ratio'`` costs on top of the default score, at the sizes users meet.

The all-layer LAM diag posterior of ``benchmarks/gallery_scoring.py`` (256 random images of 10
classes, random weights, 128-d head; ``--model`` from ``benchmarks/encoder_models.py``); one
:class:`~laplace_metric.UncertaintyScorer` with a random gallery (``--gallery`` items,
``database_embedding='candidates'`` as for large galleries under all-layer posteriors), and
``--queries`` random queries. The gallery is embedded once before the clock starts; then each
round times, in one process and alternating, the default ``'posterior_knn'`` and
``'knn_variance_ratio'``, each of fresh random queries so that no cached sample embeddings are
reused (the extra is the variance ratio's linearised
passes: one backward pass per embedding dimension and query chunk, fitted and prior variances
together). Printed: the median seconds per query of each and their ratio.

Run: ``python benchmarks/score_costs.py [--model resnet18] [--queries 8] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery_scoring import fitted_posterior  # noqa: E402

SCORES = ("posterior_knn", "knn_variance_ratio")


def main(argv: list[str] | None = None) -> dict[str, float]:
    from laplace_metric import UncertaintyScorer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--gallery", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    la, shape = fitted_posterior(args.model)
    gen = torch.Generator().manual_seed(1)
    gallery = torch.randn(args.gallery, *shape, generator=gen)
    scorer = UncertaintyScorer(
        la, gallery, n_samples=args.samples, database_embedding="candidates", progress_bar=False
    )
    scorer(torch.randn(2, *shape, generator=gen))  # embeds the gallery at the mean, once
    times: dict[str, list[float]] = {name: [] for name in SCORES}
    for _ in range(args.rounds):
        for name in SCORES:
            queries = torch.randn(args.queries, *shape, generator=gen)  # no query cache
            start = time.perf_counter()
            scorer(queries, name)
            times[name].append((time.perf_counter() - start) / args.queries)
    result = {name: statistics.median(t) for name, t in times.items()}
    result["ratio"] = result["knn_variance_ratio"] / result["posterior_knn"]
    print(
        f"{args.model}, all-layer diag, gallery {args.gallery:,}, {args.samples} samples, "
        f"{args.queries} queries x {args.rounds} rounds: posterior_knn "
        f"{result['posterior_knn']:.3f} s/query, knn_variance_ratio "
        f"{result['knn_variance_ratio']:.3f} s/query, {result['ratio']:.2f}x",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
