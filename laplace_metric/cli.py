"""Command-line interface: ``laplace-metric demo``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from laplace_metric.demo import DemoConfig, run_demo


def build_parser() -> argparse.ArgumentParser:
    """The ``laplace-metric`` argument parser."""
    parser = argparse.ArgumentParser(prog="laplace-metric", description="Bayesian metric learning.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="post-hoc and online LAM vs baselines on an open-set split (digits: no download)",
    )
    demo.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion_mnist"])
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    demo.add_argument("--output-dir", type=Path, default=Path("laplace_metric_output"))
    demo.add_argument("--device", default="cpu")
    demo.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for small MLPs)"
    )
    demo.add_argument("--members", type=int, default=5, help="deep-ensemble size")
    demo.add_argument("--samples", type=int, default=30, help="posterior / dropout samples")
    demo.add_argument(
        "--data-root", type=Path, default=Path("data"), help="torchvision data folder"
    )
    demo.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``laplace-metric`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        config = DemoConfig(
            dataset=args.dataset,
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
        except RuntimeError as err:  # e.g. a dataset download without network
            print(f"laplace-metric demo: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
