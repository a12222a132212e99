"""Where the uncertainty comes from: fitted posteriors against their controls (digits split).

Run: ``python benchmarks/posterior_controls.py [--seeds 0 1 2]`` (about 2 minutes per seed on 2
CPU cores). For each seed it trains the demo encoder on digits 0-5 and reports, for the OOD
score of each method, AUROC against the held-out digits 6-9 and against uniform noise, AUSE of
the score as an error predictor, the retrieval ECE where the method has a top-1 confidence,
and the validation figures used to choose a configuration (AUROC of in-distribution
validation vs validation noise; retrieval ECE of the validation queries), as mean +- std over
seeds. Rows:

- every LAM configuration (posterior x likelihood scale x prior precision), its default score
  (posterior kNN) with the curvature fitted and with the curvature off
  (:func:`laplace_metric.controls.curvature_off`: same prior precision, same weight samples);
- isotropic weight noise with its scale tuned on validation data (no curvature, no marglik);
- the deterministic kNN distance on the embedding and on the penultimate features, and
  Mahalanobis on the penultimate features;
- with ``--scores``, every other score of two posteriors beside its control
  (``posterior_controls_scores.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from posterior_controls_configs import (  # noqa: E402
    CONFIGS,
    FASHION_ALL_LAYER,
    FASHION_CONFIGS,
    PRIOR_CONFIGS,
    SCORE_CONFIGS,
)
from posterior_controls_data import fashion_split, seed_data  # noqa: E402
from posterior_controls_merge import add_selected_rows, load_merged  # noqa: E402
from posterior_controls_scores import ALL_OTHER, chosen_scores, score_rows  # noqa: E402

COLUMNS = ("AUROC held-out", "AUROC noise", "AUSE", "ECE", "val AUROC noise", "val ECE")
#: With ``--candidates``: the default score with only each query's nearest database items at the
#: mean re-embedded under the samples, its rank agreement with the whole database re-embedded,
#: and the scoring time of each.
CANDIDATE_COLUMNS = (*COLUMNS, "Spearman vs per-sample", "score s")


def _metrics(score, data, confidence=None) -> dict[str, float]:
    """AUROC / AUSE columns of a score: a function of the inputs, or a mapping input set ->
    scores already computed."""
    from laplace_metric.metrics import ood_auroc, retrieval_ece, sparsification_curve

    if callable(score):
        s = {k: score(x).detach().cpu() for k, x in data["inputs"].items()}
    else:
        s = {k: v.detach().cpu() for k, v in score.items()}
    row = {
        "AUROC held-out": ood_auroc(s["test"], s["held"]),
        "AUROC noise": ood_auroc(s["test"], s["noise"]),
        "val AUROC noise": ood_auroc(s["val"], s["noise_val"]),
        "AUSE": sparsification_curve(s["test"], data["wrong"], n_steps=50).error_area,
        # the raw scores of test, held-out and noise queries (for rank agreement; not saved)
        "scores": torch.cat([s["test"], s["held"], s["noise"]]),
        "per_input": s,  # each input set's scores (for scores built on this one; not saved)
    }
    if confidence is not None:
        conf, correct = confidence
        row["ECE"] = retrieval_ece(conf.cpu(), correct.cpu())
    return row


def _lam_rows(rows, name, config, det, loader, data, seed, n_samples, margin) -> None:
    from laplace_metric.controls import curvature_off
    from laplace_metric.registry import metric_laplace
    from laplace_metric.scores import UncertaintyScorer

    subset, structure, scale, prior = config
    la = metric_laplace(
        det, "contrastive", subset, structure, likelihood_scale=scale, margin=margin
    )
    la.fit(loader)
    if isinstance(prior, str) and prior.startswith("marglik"):
        structure = prior.partition("-")[2] or "scalar"
        la.optimize_prior_precision(method="marglik", prior_structure=structure)
    elif prior == "val-nll":  # the default objective: PositivePairGaussianNLL of val pairs
        val = torch.utils.data.TensorDataset(data["inputs"]["val"], data["y_val"])
        la.optimize_prior_precision(
            method="gridsearch", val_loader=DataLoader(val, 256), grid_size=data["grid_size"]
        )
    else:
        la.prior_precision = prior
    x_tr, y_tr = data["train"]
    modes = [("per_sample", 0)] + [("candidates", c) for c in data["candidates"]]
    for mode, n_candidates in modes:
        gen = torch.Generator().manual_seed(seed)
        scorer = UncertaintyScorer(
            la,
            x_tr,
            y_tr,
            n_samples=n_samples,
            generator=gen,
            database_embedding=mode,
            n_candidates=max(n_candidates, 1),
        )
        tag = f", {n_candidates} candidates" if n_candidates else ""
        for suffix, off in (("fitted", False), ("curvature off", True)):
            with curvature_off(la) if off else nullcontext():
                start = time.perf_counter()
                row = _retrieval_metrics(scorer, scorer.retrieval, data)
                row["score s"] = time.perf_counter() - start
            rows[f"{name}: {suffix}{tag}"] = row
        if data.get("other_scores") and mode == "per_sample":
            score_rows(rows, name, la, scorer, data, _metrics)
    for _, n_candidates in modes[1:]:
        for suffix in ("fitted", "curvature off"):
            row = rows[f"{name}: {suffix}, {n_candidates} candidates"]
            base = rows[f"{name}: {suffix}"]["scores"]
            row["Spearman vs per-sample"] = float(spearmanr(row["scores"], base).statistic)


def _retrieval_metrics(score, retrieval, data) -> dict[str, float]:
    """:func:`_metrics` plus the ECE of the top-1 retrieval confidence, on test and validation
    queries (``retrieval(x)`` returns a :class:`~laplace_metric.scores.PosteriorRetrieval`)."""
    from laplace_metric.metrics import retrieval_ece

    test = retrieval(data["inputs"]["test"])
    row = _metrics(score, data, (test.confidence, test.predicted == data["y_test"]))
    val = retrieval(data["inputs"]["val"])
    correct = (val.predicted == data["y_val"]).cpu()
    row["val ECE"] = retrieval_ece(val.confidence.cpu(), correct)
    return row


def _baseline_rows(rows, det, data, seed, n_samples, image: bool = False) -> None:
    from laplace_metric.baselines import (
        IsotropicNoiseBaseline,
        KNNDistanceBaseline,
        MahalanobisBaseline,
        MultiLayerMahalanobisBaseline,
        penultimate,
    )

    x_tr, y_tr = data["train"]
    inputs = data["inputs"]
    # on images, all-layer noise re-runs the CNN per draw and grid value: last layer only
    for params in ("last_layer",) if image else ("all", "last_layer"):
        iso = IsotropicNoiseBaseline(det, parameters=params, n_samples=n_samples, seed=seed)
        iso.fit(x_tr, y_tr, x_val=inputs["val"], x_val_ood=inputs["noise_val"])
        name = f"isotropic noise ({params.replace('_', '-')}), tuned on validation"
        rows[name] = _retrieval_metrics(iso.score, iso.retrieval, data)
    rows["kNN distance (deterministic)"] = _metrics(KNNDistanceBaseline(det).fit(x_tr).score, data)
    feats = KNNDistanceBaseline(penultimate(det), normalize=False).fit(x_tr)
    rows["kNN distance, penultimate features"] = _metrics(feats.score, data)
    raw = KNNDistanceBaseline(torch.nn.Flatten(), normalize=False).fit(x_tr)
    rows["kNN distance, raw inputs"] = _metrics(raw.score, data)
    if image:  # Lee et al.'s pooled multi-layer recipe (the 9216-d flat features are singular)
        maha = MultiLayerMahalanobisBaseline(det, layers=["1", "3"]).fit(x_tr, y_tr)
        rows["Mahalanobis, pooled conv layers (Lee et al.)"] = _metrics(maha.score, data)
    else:
        maha = MahalanobisBaseline(penultimate(det)).fit(x_tr, y_tr)
        rows["Mahalanobis, penultimate features"] = _metrics(maha.score, data)


def run_seed(
    seed: int,
    n_samples: int,
    epochs: int,
    configs: dict,
    dim: int | None = None,
    candidates: tuple[int, ...] = (),
    grid_size: int = 100,
    scores: tuple[str, ...] = (),
    baselines: bool = True,
):
    """All rows of one seed; ``dim`` set: FashionMNIST -> MNIST with LAM's CNN of that size;
    ``candidates``: LAM rows also with ``database_embedding='candidates'`` of these sizes."""
    from fashion_mnist_methods import lam_encoder

    from laplace_metric.baselines import train_encoder
    from laplace_metric.data import digits_open_set
    from laplace_metric.demo import make_encoder
    from laplace_metric.likelihoods import ContrastiveLikelihood

    image = dim is not None
    split = fashion_split(seed) if image else digits_open_set(seed=seed)
    loader = DataLoader(
        split.train,
        batch_size=128 if image else 64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    # FashionMNIST: the margin of docs/fashion_mnist.rst (0.5, chosen on validation recall@1)
    likelihood = ContrastiveLikelihood(margin=0.5 if image else 1.0)
    torch.manual_seed(1000 * seed)
    det = lam_encoder(dim) if image else make_encoder(split.train.tensors[0].shape[1])
    train_encoder(
        det,
        loader,
        lambda g, y: likelihood.loss(g, y, reduction="mean"),
        epochs=epochs,
        seed=1000 * seed,
        progress_bar=False,
    )
    det.eval()
    data = seed_data(split, det, candidates)
    data["grid_size"] = grid_size  # of the validation grid searches (laplace-torch's default)
    data["other_scores"] = scores  # the rows of posterior_controls_scores
    rows: dict[str, dict[str, float]] = {}
    for name, config in configs.items():
        _lam_rows(rows, name, config, det, loader, data, seed, n_samples, likelihood.margin)
    if baselines:
        _baseline_rows(rows, det, data, seed, n_samples, image)
    for row in rows.values():
        row.pop("scores", None)
        row.pop("per_input", None)
    return rows


def format_table(results: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """Mean +- std over seeds, one row per method (the shared evaluation layer's table)."""
    from laplace_metric.evaluation import Column, ResultTable

    digits = {"AUSE": 4, "ECE": 4, "val ECE": 4, "score s": 2}
    table = ResultTable([Column(c, digits.get(c, 3)) for c in columns])
    for name in results[0]:
        values = {c: [r[name].get(c, math.nan) for r in results] for c in columns}
        table.add_row(name, values)
    return table.to_markdown()


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--save``, ``--merge`` and ``--select``: per-seed JSON files and their merged table."""
    parser.add_argument("--save", default=None, help="also write the per-seed rows to this JSON")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="print the table of per-seed JSON files written by --save (runs nothing); "
        "join files of the same seed with '+'",
    )
    parser.add_argument(
        "--select",
        nargs="+",
        default=None,
        help="with --merge: add the rows of the configuration (of these names) with the lowest "
        "validation ECE in each seed",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument("--samples", type=int, default=30, help="weight samples per score")
    parser.add_argument("--epochs", type=int, default=30, help="encoder training epochs")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one seed, 2 epochs, 4 samples, 2 configurations, 7 grid points",
    )
    parser.add_argument(
        "--fashion-dim",
        type=int,
        default=None,
        help="FashionMNIST -> MNIST with LAM's CNN of this embedding size (default: digits)",
    )
    parser.add_argument(
        "--all-layer", action="store_true", help="FashionMNIST: add all-layer diag rows (slow)"
    )
    parser.add_argument(
        "--priors",
        action="store_true",
        help="digits: compare how the prior precision is chosen (per layer, per weight, "
        "validation pair NLL) instead of the likelihood scales",
    )
    parser.add_argument(
        "--scores",
        nargs="*",
        default=None,
        metavar="SCORE",
        help="the two posteriors of the outside check (digits; with --fashion-dim the chosen "
        "configurations) scored by other scores, each beside its curvature-off control: the "
        f"named ones of {', '.join(ALL_OTHER)}, or with no names all of them (on FashionMNIST "
        "the two ratio scores)",
    )
    parser.add_argument(
        "--only", default=None, help="run only the LAM configurations whose name contains this"
    )
    parser.add_argument(
        "--candidates",
        type=int,
        nargs="+",
        default=[],
        help="LAM rows also with UncertaintyScorer(database_embedding='candidates', "
        "n_candidates=N) for each N, their Spearman rank agreement with the whole database "
        "re-embedded, and the scoring times",
    )
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="LAM rows only (skip isotropic noise, kNN and Mahalanobis; e.g. when adding rows "
        "to a table whose baselines were measured on the same seeds)",
    )
    _add_output_options(parser)
    return parser


def _print_merged(files: list[str], select: list[str] | None) -> str:
    results = load_merged(files)
    chosen = add_selected_rows(results, select) if select else []
    candidates = any("Spearman vs per-sample" in row for row in results[0].values())
    table = format_table(results, CANDIDATE_COLUMNS if candidates else COLUMNS)
    print(table)
    if chosen:
        print("\nchosen on validation ECE, per seed: " + "; ".join(chosen))
    return table


def main(argv: list[str] | None = None) -> str:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.merge:
        return _print_merged(args.merge, args.select)
    torch.set_num_threads(1)
    scores = chosen_scores(args.scores, image=args.fashion_dim is not None)
    configs = PRIOR_CONFIGS if args.priors else SCORE_CONFIGS if scores else CONFIGS
    grid_size = 100
    if args.fashion_dim is not None:
        configs = {**FASHION_CONFIGS, **(FASHION_ALL_LAYER if args.all_layer else {})}
        if args.epochs == parser.get_default("epochs"):
            args.epochs = 5
    if args.only:
        configs = {name: c for name, c in configs.items() if args.only in name}
    if args.quick:
        args.seeds, args.epochs, args.samples = args.seeds[:1], 2, 4
        grid_size = 7
        configs = dict(list(configs.items())[:1] + list(configs.items())[-1:])
    start = time.perf_counter()
    results = [
        run_seed(
            s,
            args.samples,
            args.epochs,
            configs,
            args.fashion_dim,
            tuple(args.candidates),
            grid_size,
            scores,
            not args.no_baselines,
        )
        for s in args.seeds
    ]
    if args.save:
        Path(args.save).write_text(json.dumps(results))
    table = format_table(results, CANDIDATE_COLUMNS if args.candidates else COLUMNS)
    print(table)
    print(f"\n{len(args.seeds)} seeds, {time.perf_counter() - start:.0f} s")
    return table


if __name__ == "__main__":
    main()
