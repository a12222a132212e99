"""``fashion_mnist.py --tune`` / ``--diagnose``, the acceptance checks and the plots."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_mnist_methods import (  # noqa: E402
    all_features,
    lam_encoder,
    load_data,
    make_loader,
    train,
)

from laplace_metric.evaluation import (  # noqa: E402
    SeedResult,
    plot_metric_bars,
    plot_sphere,
    write_seed_plots,
)
from laplace_metric.likelihoods import ContrastiveLikelihood  # noqa: E402
from laplace_metric.metrics import ood_auroc, recall_at_k  # noqa: E402
from laplace_metric.predictive import laplace_head_samples  # noqa: E402
from laplace_metric.registry import metric_laplace  # noqa: E402

if TYPE_CHECKING:
    from fashion_mnist import BenchConfig

__all__ = ["diagnose_lam_std", "tune", "verdict", "write_plots"]


def tune(config: BenchConfig, dim: int, seed: int = 0) -> dict:
    """Validation recall@1 after every epoch, for every margin of ``config.tune_margins``.

    Queries are the validation split (carved from the FashionMNIST training set), the database
    the training subset. Returns ``{"curves": {margin: [recall@1 per epoch]}, "margin": ...,
    "epochs": ...}`` with the best (margin, epochs); ties go to fewer epochs.
    """
    data = load_data(config, seed)
    loader = make_loader(data, config, seed)
    curves: dict[str, list[float]] = {}
    for margin in config.tune_margins:
        curve: list[float] = []
        torch.manual_seed(1000 * seed)
        model = lam_encoder(dim)

        def on_epoch(epoch: int, model=model, curve: list = curve) -> None:
            with torch.no_grad():
                z_val = F.normalize(model(data.x_val), dim=-1)
                z_tr = torch.cat([F.normalize(model(c), dim=-1) for c in data.x_train.split(512)])
            curve.append(recall_at_k(z_val, data.y_val, z_tr, data.y_train, k=1))

        train(model, loader, replace(config, margin=margin), 1000 * seed, on_epoch=on_epoch)
        curves[str(margin)] = curve
    best = max(
        ((m, e + 1, r) for m, c in curves.items() for e, r in enumerate(c)),
        key=lambda t: (round(t[2], 3), -t[1]),
    )
    return {"dim": dim, "curves": curves, "margin": float(best[0]), "epochs": best[1]}


def _spearman(a: Tensor, b: Tensor) -> float:
    rank_a, rank_b = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rank_a, rank_b]))[0, 1])


def _candidates(samples, feats: dict, weight: Tensor, bias: Tensor) -> dict:
    """The LAM-std score and simple functions of ``f`` and ``g = W f + b`` it may reduce to."""
    norm_g = {k: (f @ weight.T + bias).norm(dim=-1) for k, f in feats.items()}

    def raw_std(f: Tensor) -> Tensor:
        raw = torch.stack([f @ w.T + b for w, b in zip(samples.weight, samples.bias)])
        return raw.std(0).sum(-1)

    return norm_g, {
        "LAM std (normalised samples)": lambda k: samples.lam_std(feats[k]),
        "std of unnormalised samples": lambda k: raw_std(feats[k]),
        "||f|| / ||g||": lambda k: feats[k].norm(dim=-1) / norm_g[k],
        "1 / ||g||": lambda k: 1 / norm_g[k],
        "||f||": lambda k: feats[k].norm(dim=-1),
    }


def diagnose_lam_std(config: BenchConfig, dim: int, seed: int = 0) -> dict:
    """Why LAM's std score fails on the last-layer diag posterior: what it reduces to.

    Trains the deterministic encoder of ``run_seed`` and fits the same post-hoc posterior, then
    reports the prior precision against the curvature, and the OOD AUROC of the LAM-std score
    next to simple functions of the features ``f`` and the raw embedding ``g = W f + b``:
    ``||f|| / ||g||`` (what the score becomes when the posterior is the isotropic prior, since
    the std of ``W f`` is then proportional to ``||f||`` and the normalisation divides by
    ``||g||``), ``1 / ||g||`` and the std of the *unnormalised* samples. A diagnosis only: none
    of these is tuned or reported as a method.
    """
    data = load_data(config, seed)
    loader = make_loader(data, config, seed)
    torch.manual_seed(1000 * seed)
    det = train(lam_encoder(dim), loader, config, 1000 * seed)
    feats = all_features(det, data)
    la = metric_laplace(det, ContrastiveLikelihood(margin=config.margin), "last_layer", "diag")
    la.fit(loader)
    la.optimize_prior_precision(method="marglik")
    prior = float(la.prior_precision.reshape(-1)[0])
    curvature = la.H.detach().double()
    samples = laplace_head_samples(la, det[-1], config.n_samples, seed)
    weight, bias = det[-1].weight.detach(), det[-1].bias.detach()
    norm_g, candidates = _candidates(samples, feats, weight, bias)
    with torch.no_grad():
        scores = {name: (fn("test"), fn("ood")) for name, fn in candidates.items()}
    both = {k: torch.cat(v) for k, v in scores.items()}
    lam = both["LAM std (normalised samples)"]
    mean_norm = {
        name: {"FashionMNIST test": float(v["test"].mean()), "MNIST": float(v["ood"].mean())}
        for name, v in (("g", norm_g), ("f", {k: f.norm(dim=-1) for k, f in feats.items()}))
    }
    return {
        "dim": dim,
        "seed": seed,
        "prior_precision": prior,
        "curvature_median": float(curvature.median()),
        "curvature_mean": float(curvature.mean()),
        "fraction_curvature_below_prior": float((curvature < prior).double().mean()),
        "auroc": {k: ood_auroc(a.double(), b.double()) for k, (a, b) in scores.items()},
        "spearman_with_lam_std": {k: _spearman(lam, v) for k, v in both.items()},
        "mean_norm_g": mean_norm["g"],
        "mean_norm_f": mean_norm["f"],
    }


def verdict(table: dict) -> list[str]:
    """The issue's acceptance checks on one D, as sentences with the numbers."""
    det = table["deterministic, kNN"]
    lam = {
        n: c
        for n, c in table.items()
        if n.startswith(("post-hoc LAM", "online LAM")) and "(curvature off)" not in n
    }
    base = {n: c for n, c in table.items() if n not in lam}  # controls included
    best_base = max(base, key=lambda n: base[n]["AUROC"][0])
    best_lam = max(lam, key=lambda n: lam[n]["AUROC"][0])
    lines = [
        f"best LAM row: {best_lam} (AUROC {lam[best_lam]['AUROC'][0]:.3f}, recall@1 "
        f"{lam[best_lam]['recall@1'][0]:.3f}); best baseline: {best_base} (AUROC "
        f"{base[best_base]['AUROC'][0]:.3f}); deterministic recall@1 {det['recall@1'][0]:.3f}.",
    ]
    ok = [
        n
        for n, c in lam.items()
        if c["AUROC"][0] >= 0.95 and c["recall@1"][0] >= det["recall@1"][0] - 1e-9
    ]
    lines.append(
        "AUROC >= 0.95 with recall@1 >= deterministic: " + (", ".join(ok) if ok else "none")
    )
    beats = lam[best_lam]["AUROC"][0] > base[best_base]["AUROC"][0]
    lines.append(f"a LAM row beats every baseline and control on AUROC: {'yes' if beats else 'no'}")
    for name, cells in lam.items():
        head, _, score = name.rpartition(", ")
        control = table.get(f"{head} (curvature off), {score}")
        if control is not None:
            (a, sa), (b, sb) = cells["AUROC"], control["AUROC"]
            lines.append(
                f"{name}: AUROC {a:.3f} ± {sa:.3f} against {b:.3f} ± {sb:.3f} with the "
                "curvature off"
            )
    return lines


def write_plots(result: SeedResult, table: dict, dim: int, output_dir: Path) -> list[Path]:
    """Score histograms, sparsification curves, reliability diagrams, AUROC bars, embedding."""
    paths = write_seed_plots(result, output_dir, prefix=f"D{dim}_")
    xlabel = "OOD AUROC (FashionMNIST test vs MNIST)"
    path = output_dir / f"D{dim}_auroc.png"
    paths.append(plot_metric_bars(table, "AUROC", path, xlabel=xlabel, title=f"D = {dim}"))
    if result.embedding is not None:
        z_in, labels, z_out = result.embedding
        path = output_dir / f"D{dim}_embedding.png"
        names = ("FashionMNIST test", "MNIST (OOD)")
        title = "deterministic encoder, D = 3"
        paths.append(plot_sphere(z_in, labels, z_out, path, names=names, title=title))
    return paths
