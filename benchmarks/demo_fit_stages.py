"""The demo's curvature stages with the pair graph against the per-pair path, in one run.

The demo (``laplace-metric demo``) fits four post-hoc LAM posteriors and one online LAM on the
digits split (606 training images, batches of 64, MLP 64-128-128-16, contrastive likelihood,
``hessian_method='positives'``). This script times each ``la.fit`` (median of ``--repeats``)
and one epoch of ``fit_online_lam`` with the default pair-graph path and with the per-pair path
(``PairCurvatureInterface.use_pair_graph = False``, the implementation before the pair graph),
on the same encoder and loader. Run ``python benchmarks/demo_fit_stages.py``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import median_seconds  # noqa: E402

import laplace_metric  # noqa: E402
from laplace_metric.curvature import PairCurvatureInterface  # noqa: E402
from laplace_metric.data import digits_open_set  # noqa: E402
from laplace_metric.demo import POSTHOC_CONFIGS, make_encoder  # noqa: E402
from laplace_metric.likelihoods import ContrastiveLikelihood  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per stage (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    split = digits_open_set(seed=0)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(split.train, batch_size=64, shuffle=True, generator=gen)
    in_dim = split.train.tensors[0].shape[1]
    torch.manual_seed(0)
    encoder = make_encoder(in_dim)
    likelihood = ContrastiveLikelihood(margin=1.0)

    def posthoc(subset: str, structure: str):
        la = laplace_metric.metric_laplace(encoder, likelihood, subset, structure)
        return lambda: la.fit(loader)

    def online():
        torch.manual_seed(1)
        laplace_metric.fit_online_lam(make_encoder(in_dim), loader, likelihood, epochs=1)

    stages = [(name, posthoc(subset, structure)) for name, subset, structure, _ in POSTHOC_CONFIGS]
    stages.append(("online LAM, 1 epoch", online))
    print(
        f"threads={args.threads}, median of {args.repeats}, "
        f"{len(split.train)} images in batches of 64\n"
    )
    print("| stage | per-pair [s] | pair graph [s] | graph / per-pair |")
    print("|---|---|---|---|")
    for name, run in stages:
        seconds = {}
        for graph in (False, True):
            PairCurvatureInterface.use_pair_graph = graph
            seconds[graph] = median_seconds(run, args.repeats)
        PairCurvatureInterface.use_pair_graph = True
        ratio = seconds[True] / seconds[False]
        print(f"| {name} | {seconds[False]:.3f} | {seconds[True]:.3f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
