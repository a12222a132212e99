"""Why the linearised trace fails on uniform noise (docs/uncertainty.rst), measured.

On one seed of the demo's digits split: the norm ||g(x)|| of the unnormalised embedding per
input set, the OOD AUROC of 1/||g||^2 alone, and for three posteriors the AUROC of the trace,
of the trace without the 1/||g||^2 factor (tangent space), of the trace of the unnormalised
output, of LAM's sampled std and of the posterior kNN distance.

Run: ``PYTHONPATH=. python docs/measurements/trace_probe.py [seed]`` (about 2 min on a CPU).
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader

from laplace_metric import ContrastiveLikelihood, UncertaintyScorer, metric_laplace
from laplace_metric.baselines import train_encoder
from laplace_metric.data import open_set_split
from laplace_metric.demo import make_encoder
from laplace_metric.metrics import ood_auroc


def main(seed: int = 0) -> None:
    torch.set_num_threads(1)
    split = open_set_split("digits", seed=seed)
    x_tr = split.train.tensors[0]
    sets = [split.test.tensors[0], split.ood_classes.tensors[0], split.ood_noise.tensors[0]]
    loader = DataLoader(
        split.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    likelihood = ContrastiveLikelihood(margin=1.0)
    torch.manual_seed(1000 * seed)
    encoder = make_encoder(x_tr.shape[1])
    train_encoder(
        encoder,
        list(loader),
        lambda g, y: likelihood.loss(g, y, reduction="mean"),
        epochs=30,
        seed=1000 * seed,
        progress_bar=False,
    )

    def report(name, score):
        s = [score(x).detach() for x in sets]
        print(f"{name:<44} held-out {ood_auroc(s[0], s[1]):.3f}  noise {ood_auroc(s[0], s[2]):.3f}")

    def norm2(x):
        with torch.no_grad():
            return encoder(x).norm(dim=-1) ** 2

    print(
        "median ||g||: test / held-out / noise:",
        [round(norm2(x).sqrt().median().item(), 3) for x in sets],
    )
    report("1 / ||g||^2 alone", lambda x: 1 / norm2(x))
    for subset, structure in (("last_layer", "kron"), ("last_layer", "full"), ("all", "diag")):
        la = metric_laplace(encoder, likelihood, subset, structure)
        la.fit(loader)
        la.optimize_prior_precision(method="marglik")
        scorer = UncertaintyScorer(la, database=x_tr)

        def unnormalised_trace(x, la=la):
            la.pair_likelihood.normalize = False  # Jacobians of g instead of g / ||g||
            try:
                Js, _ = la.backend.jacobians(x)
                return torch.diagonal(la.functional_variance(Js), dim1=-2, dim2=-1).sum(-1)
            finally:
                la.pair_likelihood.normalize = True

        tag = f"{subset} {structure}"
        report(f"{tag}: trace", lambda x, s=scorer: s(x, "trace"))
        report(
            f"{tag}: trace * ||g||^2 (tangent, no scale)",
            lambda x, s=scorer: s(x, "trace") * norm2(x),
        )
        report(f"{tag}: trace of the unnormalised output", unnormalised_trace)
        report(f"{tag}: sampled std (LAM)", lambda x, s=scorer: s(x, "sampled_std"))
        report(f"{tag}: posterior kNN (default)", scorer)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
