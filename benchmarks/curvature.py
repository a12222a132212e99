"""Speed and memory of the pairwise curvature backends against stock BackPACK and torch.func.

Three tables (``--table pairs|scaling|interleaved|all``):

``pairs``: for an MLP 784-256-256-32 and a small CNN on 28x28 inputs, with 64 positive pairs
from 128 samples (float32), it times (median of ``--repeats``) a whole ``la.fit`` over one batch
for ``diag`` and ``kron`` with each backend, next to

* the floor: stock laplace-torch ``Laplace(model, 'regression', backend=BackPackGGN).fit`` on
  the same 128 inputs with D = 32 regression outputs (``DiagGGNExact`` / ``KFLR``: as many
  square-root columns per sample as the pairwise likelihood has), and
* the exact ``torch.func`` reference (:class:`ReferencePairGGN`).

``scaling``: the MLP 784-256-256-D, all layers, one batch of B samples from 10 classes with
*every* pair mined, B in {32, 64, 128, 256, 512}, D in {32, 128}, ``diag`` and ``kron``,
``hessian_method`` ``positives`` and ``full``, default backend (BackPACK, pair graph), against
the same stock floor on the same B inputs and D outputs, measured in the same run (memory: the
whole process's peak resident set, imports and data included).

``interleaved``: the ``pairs`` fit of the default backend and its floor, alternated in *one*
process for ``--rounds`` rounds (after a warm-up), with the median of the per-round ratios. A
fit of 20-30 ms is sensitive to what else the machine does; alternating the two in one process
exposes both to the same conditions, which separate processes measured minutes apart do not.

Every ``pairs`` and ``scaling`` measurement runs in a fresh subprocess. Memory is the peak resident set size during the
measurement minus the resident set size just before it (``resource.getrusage`` against
``/proc/self/statm``; CPU), or ``torch.cuda.max_memory_allocated`` on CUDA. The dense ``full``
structure is not benchmarked (``P x P`` does not fit for these models). The size a per-sample
Jacobian ``[C, N, P]`` would take is printed for reference.

Run ``python benchmarks/curvature.py`` (``--device cuda`` on a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder_models import build_encoder  # noqa: E402

N_PAIRS, DIM = 64, 32
CASES = {
    "mlp": ["reference", "backpack", "asdl", "floor"],
    "cnn": ["reference", "backpack", "asdl", "floor"],
}
#: Not run on the CNN: the reference's ``jacrev`` over the whole batch vmaps N*D = 4096
#: cotangents through the convolutions (``[4096, N, 16, 28, 28]``, ~25 GB; killed for memory on
#: a 23 GB machine), and its Kronecker sensitivities are ``[N, D, N, C, H, W]``.
SKIP = {("cnn", "reference", "diag"), ("cnn", "reference", "kron")}


def build_model(name: str, dim: int = DIM) -> tuple[nn.Module, tuple[int, ...]]:
    """The benchmark encoders: MLP 784-256-256-D (~275k parameters at D=32) and a small CNN."""
    return build_encoder(name, dim if name == "mlp" else DIM)


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(run, repeats: int, device: str) -> dict:
    """Median seconds of ``run()`` after one warm-up, and the peak memory it added."""
    run()  # warm-up (builds BackPACK's hooked copy, caches)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes() - before
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    return {"seconds": statistics.median(times), "bytes": max(memory, 0), "peak": peak}


def fit_runner(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    backend: str,
    structure: str,
    method: str,
):
    """A closure that runs one whole ``la.fit`` over the batch ``(x, labels)``."""
    import laplace
    from laplace.curvature import BackPackGGN
    from torch.utils.data import DataLoader, TensorDataset

    from laplace_metric.curvature import AsdlPairGGN, BackPackPairGGN, ReferencePairGGN

    batch = len(x)
    if backend == "floor":
        with torch.no_grad():
            dim = model(x[:1]).shape[1]
        targets = torch.zeros(batch, dim, device=x.device)
        loader = DataLoader(TensorDataset(x, targets), batch_size=batch)
        la = laplace.Laplace(
            model,
            "regression",
            subset_of_weights="all",
            hessian_structure=structure,
            backend=BackPackGGN,
        )
    else:
        loader = DataLoader(TensorDataset(x, labels), batch_size=batch)
        cls = {"reference": ReferencePairGGN, "backpack": BackPackPairGGN, "asdl": AsdlPairGGN}
        la = laplace.Laplace(
            model,
            "contrastive",
            subset_of_weights="all",
            hessian_structure=structure,
            hessian_method=method,
            backend=cls.get(backend),
        )
    return lambda: la.fit(loader)


def worker(task: dict, device: str) -> dict:
    """Measure one cell in this process; returns seconds and bytes."""
    import laplace_metric  # noqa: F401

    if task["table"] == "pairs":
        model, shape = build_model(task["model"])
        x = torch.randn(2 * N_PAIRS, *shape, device=device)
        labels = torch.arange(N_PAIRS, device=device).repeat_interleave(2)  # 64 positive pairs
        method = "positives"
    else:
        model, shape = build_model("mlp", dim=task["dim"])
        x = torch.randn(task["batch"], *shape, device=device)
        labels = torch.arange(task["batch"], device=device) % 10
        method = task["method"]
    model = model.to(device).eval()
    run = fit_runner(model, x, labels, task["backend"], task["structure"], method)
    return timed(run, task["repeats"], device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(task: dict, args: argparse.Namespace) -> dict | None:
    """Run :func:`worker` in a fresh subprocess."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(task),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if lines else f"killed (rc={proc.returncode}, out of memory?)"
        print(f"  {task} failed: {why}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pairs_table(args: argparse.Namespace) -> None:
    """64 positive pairs: each backend's whole fit against the stock floor and torch.func."""
    print(
        f"\n## 64 pairs: device={args.device} threads={args.threads} float32, {N_PAIRS} pairs / "
        f"{2 * N_PAIRS} samples, D=R={DIM}; whole la.fit, median of {args.repeats} "
        f"(reference: {args.reference_repeats}); memory = peak RSS increase (CPU)"
    )
    header = (
        f"{'model':5} {'P':>7} {'struct':6} {'backend':10} {'time [s]':>9} {'mem [MB]':>9} "
        f"{'x floor':>8} {'ref/this':>9}"
    )
    for model_name in args.models:
        backends = CASES[model_name]
        n_params = sum(p.numel() for p in build_model(model_name)[0].parameters())
        cnp = DIM * 2 * N_PAIRS * n_params * 4 / 2**20
        print(f"\n{model_name}: P={n_params}, a [C, N, P] float32 tensor would be {cnp:.0f} MB")
        print(header)
        for structure in ("diag", "kron"):
            rows = {}
            for b in backends:
                if (model_name, b, structure) in SKIP:
                    continue
                repeats = args.reference_repeats if b == "reference" else args.repeats
                task = dict(table="pairs", model=model_name, backend=b, structure=structure)
                rows[b] = measure({**task, "repeats": repeats}, args)
            floor, ref = rows.get("floor"), rows.get("reference")
            for backend, row in rows.items():
                if row is None:
                    continue
                vs_floor = row["seconds"] / floor["seconds"] if floor else float("nan")
                speedup = ref["seconds"] / row["seconds"] if ref else float("nan")
                print(
                    f"{model_name:5} {n_params:>7} {structure:6} {backend:10} "
                    f"{row['seconds']:9.4f} {row['bytes'] / 2**20:9.1f} {vs_floor:8.2f} "
                    f"{speedup:9.1f}"
                )


def interleaved_table(args: argparse.Namespace) -> list[dict]:
    """64 positive pairs: the default backend's fit and the floor alternated in this process;
    prints the table and returns its rows."""
    import warnings

    import laplace_metric  # noqa: F401

    print(
        f"\n## 64 pairs, interleaved: device={args.device} threads={args.threads} float32, "
        f"{args.rounds} rounds of (default backend, floor) after 5 warm-up rounds; "
        "median of the per-round ratios\n"
    )
    print("| model | structure | default [ms] | floor [ms] | median ratio | ratio range (10-90%) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for model_name in args.models:
        model, shape = build_model(model_name)
        model = model.to(args.device).eval()
        x = torch.randn(2 * N_PAIRS, *shape, device=args.device)
        labels = torch.arange(N_PAIRS, device=args.device).repeat_interleave(2)
        for structure in ("diag", "kron"):
            runs = [
                fit_runner(model, x, labels, backend, structure, "positives")
                for backend in ("default", "floor")
            ]
            times: list[list[float]] = [[], []]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the stock fit warns on every call
                for round_ in range(5 + args.rounds):
                    for run, measured in zip(runs, times):
                        start = time.perf_counter()
                        run()
                        sync(args.device)
                        if round_ >= 5:
                            measured.append(time.perf_counter() - start)
            ratios = sorted(a / b for a, b in zip(*times))
            row = {
                "model": model_name,
                "structure": structure,
                "default ms": 1e3 * statistics.median(times[0]),
                "floor ms": 1e3 * statistics.median(times[1]),
                "ratio": statistics.median(ratios),
                "low": ratios[len(ratios) // 10],
                "high": ratios[(9 * len(ratios)) // 10],
            }
            rows.append(row)
            print(
                f"| {model_name} | {structure} | {row['default ms']:.1f} | {row['floor ms']:.1f} "
                f"| **{row['ratio']:.2f}x** | {row['low']:.2f}-{row['high']:.2f}x |",
                flush=True,
            )
    return rows


def scaling_table(args: argparse.Namespace) -> None:
    """All pairs of 10 classes: the pair graph's fit against the stock per-sample floor."""
    print(
        f"\n## Scaling: MLP 784-256-256-D, all layers, all pairs of 10 classes, whole la.fit, "
        f"median of {args.repeats}; floor = stock BackPackGGN regression fit on the same B "
        f"inputs and D outputs; memory = process peak RSS (CPU)\n"
    )
    print(
        "| B | D | structure | pairs | floor [s] | positives [s] | x floor | full [s] | x floor "
        "| peak MB (floor / positives / full) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dim in args.dims:
        for batch in args.batches:
            for structure in ("diag", "kron"):
                base = dict(table="scaling", dim=dim, batch=batch, structure=structure)
                base["repeats"] = args.repeats
                cells = {
                    m: measure({**base, "backend": b, "method": m}, args)
                    for b, m in (("floor", "-"), ("default", "positives"), ("default", "full"))
                }
                floor = cells["-"]

                def cell(row, floor=floor):
                    if row is None or floor is None:
                        return "failed", "-"
                    return f"{row['seconds']:.3f}", f"{row['seconds'] / floor['seconds']:.2f}"

                pos_t, pos_r = cell(cells["positives"])
                full_t, full_r = cell(cells["full"])
                mems = " / ".join(
                    "-" if r is None else f"{r['peak'] / 2**20:.0f}"
                    for r in (floor, cells["positives"], cells["full"])
                )
                floor_t = "failed" if floor is None else f"{floor['seconds']:.3f}"
                n_pairs = batch * (batch - 1) // 2
                print(
                    f"| {batch} | {dim} | {structure} | {n_pairs} | {floor_t} | {pos_t} | "
                    f"{pos_r} | {full_t} | {full_r} | {mems} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--table", choices=["pairs", "scaling", "interleaved", "all"], default="all"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=60, help="rounds of --table interleaved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    parser.add_argument("--dims", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        import warnings

        warnings.simplefilter("ignore")
        print(json.dumps(worker(json.loads(args.worker), device=args.device)))
        return
    if args.table in ("pairs", "all"):
        pairs_table(args)
    if args.table in ("scaling", "all"):
        scaling_table(args)
    if args.table in ("interleaved", "all"):
        interleaved_table(args)


if __name__ == "__main__":
    main()
