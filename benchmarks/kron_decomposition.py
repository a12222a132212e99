"""What a Kronecker posterior's decomposition costs, and what a cheaper one could save at most.

A Kronecker posterior keeps, per weight matrix or kernel, an output factor ``A`` (``out x out``)
and an input factor ``B`` (``in * k * k`` square), one factor per bias or norm affine, and
eigendecomposes every factor once per fit
(``torch.linalg.eigh``). The posterior precision of the layer is ``s (A (x) B) + delta I``: not a
Kronecker product, so its solves and log-determinant need the eigenvalues of both factors; a
Cholesky factorisation of each factor would give solves of ``A (x) B`` only (without the prior
shift), so it is the lower bound of what any cheaper factorisation of the factors could cost.

For each encoder of ``benchmarks/encoder_models.py`` (128-d head), this script lists the
factor sizes, times ``eigh`` and ``cholesky`` once per distinct size on a random SPD matrix
(float32, ``--threads`` threads, best of ``--repeats``) and prints the totals over the model's
factors. Compare the totals with the kron fit times of ``benchmarks/encoders.py``.

Run: ``python benchmarks/kron_decomposition.py [--models resnet18 resnet50 vit_tiny]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_models import build_encoder  # noqa: E402


def factor_sizes(model: nn.Module) -> Counter:
    """Sizes of the Kronecker factors of every parameter (laplace-torch's ``Kron`` layout), with
    multiplicity: a matrix or convolution kernel has an output and an input factor, a vector
    (bias, norm affine) one factor, another tensor (a class token) one dense factor. The
    positional embedding of a ViT is left out: kron needs it frozen (``lam-all-kron-frozenpos``).
    """
    sizes: Counter = Counter()
    for name, param in model.named_parameters():
        if name.endswith("pos_embedding"):
            continue
        if 2 <= param.ndim <= 4:
            sizes[param.shape[0]] += 1
            sizes[param[0].numel()] += 1
        else:
            sizes[param.numel()] += 1
    return sizes


def time_factorisations(n: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of ``eigh`` and ``cholesky`` of a random ``n x n`` SPD matrix."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 2 * n, generator=gen)
    spd = x @ x.T / (2 * n) + 1e-3 * torch.eye(n)
    best = {}
    for name, fn in (("eigh", torch.linalg.eigh), ("cholesky", torch.linalg.cholesky)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(spd)
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    return best["eigh"], best["cholesky"]


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vit_tiny"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    timed: dict[int, tuple[float, float]] = {}
    totals = {}
    for name in args.models:
        sizes = factor_sizes(build_encoder(name, 128)[0])
        for n in sorted(sizes):
            if n not in timed:
                timed[n] = time_factorisations(n, args.repeats)
        eigh = sum(count * timed[n][0] for n, count in sizes.items())
        chol = sum(count * timed[n][1] for n, count in sizes.items())
        largest = ", ".join(f"{n} x{sizes[n]}" for n in sorted(sizes, reverse=True)[:4])
        print(
            f"{name}: {sum(sizes.values())} factors (largest: {largest}); eigh of all "
            f"{eigh:.1f} s, cholesky of all {chol:.1f} s ({eigh / max(chol, 1e-9):.1f}x)"
        )
        totals[name] = (eigh, chol)
    return totals


if __name__ == "__main__":
    main()
