"""The GLM predictive's variances alone against its full covariance, all layers, in one process.

The trace score (``la.predictive_uncertainty(x, 'trace')``), ``'variance_ratio'`` and
``la(x, diagonal_output=True)`` need only the diagonal of ``J Sigma J^T``. For all-layer diag
and kron posteriors the layer-by-layer predictive (``HookPairGGN.predictive_covariance``) then
skips every ``D x D`` product: on weights shared over ``T`` locations (tokens, conv positions)
that is the ``D^2 T`` term per output row of the location-Gram form.

For each ``--models`` encoder (random weights, eval mode, ``--dim``-d output, its input shape;
a ViT's positional embedding is frozen for ``kron``, whose dense factor would not fit) and each
``--structures`` posterior, it fits all-layer LAM on ``--fit-images`` random images of 10
classes, then times, in ``--rounds`` interleaved rounds over the same ``--queries`` queries
(after one warm-up call of each),

* ``full``: ``la(x)``, the ``(B, D, D)`` covariance (what the trace cost before);
* ``variances``: ``la(x, diagonal_output=True)``;

checks that the variances equal the full covariance's diagonal, and prints the median seconds
per query and ``variances / full``. Run ``python benchmarks/glm_variances.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from encoder_models import ENCODERS, build_encoder, random_labelled_images  # noqa: E402

N_CLASSES = 10


def fitted(model_name: str, structure: str, args: argparse.Namespace):
    """An all-layer LAM posterior of ``model_name`` fitted on ``--fit-images`` images, its fit
    seconds and ``--queries`` query images."""
    from laplace import Laplace

    import laplace_metric  # noqa: F401  (registers the likelihoods)

    model, shape = build_encoder(model_name, args.dim)
    model.eval()
    if structure == "kron" and hasattr(model, "encoder"):  # a ViT: dense positional factor
        model.encoder.pos_embedding.requires_grad_(False)
    x, data, gen = random_labelled_images(shape, args.fit_images, N_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default-backend notice
        la = Laplace(model, "contrastive", "all", structure)
    start = time.perf_counter()
    la.fit(torch.utils.data.DataLoader(data, batch_size=args.fit_images))
    seconds = time.perf_counter() - start
    queries = torch.randn(args.queries, *shape, generator=gen)
    return la, seconds, queries


def compare(la, queries: torch.Tensor, rounds: int) -> dict:
    """Interleaved timings of the full covariance and the variances alone, and their gap."""
    full_s, var_s = [], []
    la(queries[:1]), la(queries[:1], diagonal_output=True)  # warm-up: probes and caches
    for _ in range(rounds):
        start = time.perf_counter()
        _, cov = la(queries)
        full_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        _, var = la(queries, diagonal_output=True)
        var_s.append(time.perf_counter() - start)
    diagonal = torch.diagonal(cov, dim1=-2, dim2=-1)
    gap = float((var - diagonal).abs().max() / diagonal.abs().max())
    full, variances = statistics.median(full_s), statistics.median(var_s)
    n = len(queries)
    return {
        "full s/query": full / n,
        "variances s/query": variances / n,
        "ratio": variances / full,
        "max rel. gap": gap,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=ENCODERS, default=["vit_tiny", "resnet18"])
    parser.add_argument("--structures", nargs="+", choices=["diag", "kron"], default=["diag"])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--fit-images", type=int, default=20)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for model_name in args.models:
        for structure in args.structures:
            la, fit_s, queries = fitted(model_name, structure, args)
            row = {"model": model_name, "structure": structure, "fit s": fit_s}
            row.update(compare(la, queries, args.rounds))
            rows.append(row)
            print(
                f"{model_name:9s} {structure:5s} fit {fit_s:7.1f} s | full "
                f"{row['full s/query']:7.3f} s/query | variances {row['variances s/query']:7.3f}"
                f" s/query | {row['ratio']:.2f}x | max rel. gap {row['max rel. gap']:.1e}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
