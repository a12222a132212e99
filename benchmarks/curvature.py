"""Speed and memory of the pairwise curvature backends against stock BackPACK and torch.func.

For an MLP 784-256-256-32 and a small CNN on 28x28 inputs, with 64 positive pairs from 128
samples (float32), it times (median of ``--repeats``) each backend's curvature of one batch for
``diag`` and ``kron``, next to

* the floor: stock BackPACK ``DiagGGNExact`` / ``KFLR`` on the same 2N = 128 pair-batch inputs
  with an MSE loss on the embedding (as many square-root columns, D = 32, as the pairwise
  likelihood has), and
* the exact ``torch.func`` reference (:class:`ReferencePairGGN`).

Every measurement runs in a fresh subprocess. Memory is the peak resident set size during the
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

N_PAIRS, DIM = 64, 32
CASES = {
    "mlp": ["reference", "backpack", "asdl", "floor"],
    "cnn": ["reference", "backpack", "asdl", "floor"],
}
#: Not run on the CNN: the reference's ``jacrev`` over the whole batch vmaps N*D = 4096
#: cotangents through the convolutions (``[4096, N, 16, 28, 28]``, ~25 GB; killed for memory on
#: a 23 GB machine), and its Kronecker sensitivities are ``[N, D, N, C, H, W]``.
SKIP = {("cnn", "reference", "diag"), ("cnn", "reference", "kron")}


def build_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The benchmark encoders: MLP 784-256-256-32 (~275k parameters) and a small CNN."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, DIM),
        )
        return model, (1, 28, 28)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, DIM),
    )
    return model, (1, 28, 28)


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(model_name: str, backend: str, structure: str, repeats: int, device: str) -> dict:
    """Measure one (model, backend, structure) in this process; returns seconds and bytes."""
    import laplace_metric  # noqa: F401
    from laplace_metric.curvature import AsdlPairGGN, BackPackPairGGN, ReferencePairGGN
    from laplace_metric.likelihoods import ContrastiveLikelihood

    model, shape = build_model(model_name)
    model = model.to(device).eval()
    x = torch.randn(2 * N_PAIRS, *shape, device=device)
    labels = torch.arange(N_PAIRS, device=device).repeat_interleave(2)  # 64 positive pairs
    lik = ContrastiveLikelihood(hessian_method="positives")
    with torch.no_grad():
        g = model(x)
    terms = lik.pair_terms(g, labels).contributing()
    assert len(terms.signs) == N_PAIRS

    if backend == "floor":
        run = stock_backpack(model, x, terms, structure)
    else:
        cls = {"reference": ReferencePairGGN, "backpack": BackPackPairGGN, "asdl": AsdlPairGGN}
        curvature = cls[backend](model, lik)
        hook = getattr(curvature, f"_{structure}")

        def run():
            return hook(model, x, g, terms)

    run()  # warm-up (builds BackPACK's hooked copy, caches)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        sync(device)
        times.append(time.perf_counter() - start)
        del result
    memory = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes() - before
    return {"seconds": statistics.median(times), "bytes": max(memory, 0)}


def stock_backpack(model: nn.Module, x: torch.Tensor, terms, structure: str):
    """Stock DiagGGNExact / KFLR with an MSE loss on the 2N pair-batch embeddings."""
    import copy

    from backpack import backpack, extend
    from backpack.extensions import KFLR, DiagGGNExact

    twin = extend(copy.deepcopy(model))
    loss_fn = extend(nn.MSELoss(reduction="sum"))
    rows = torch.cat([x[terms.pairs.first], x[terms.pairs.second]])
    ext = DiagGGNExact() if structure == "diag" else KFLR()

    def run():
        out = twin(rows)
        with backpack(ext):
            loss_fn(out, torch.zeros_like(out)).backward()
        return [getattr(p, ext.savefield) for p in twin.parameters()]

    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model: str, backend: str, structure: str, args: argparse.Namespace) -> dict | None:
    """Run :func:`worker` in a fresh subprocess."""
    repeats = args.reference_repeats if backend == "reference" else args.repeats
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps([model, backend, structure, repeats]),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if lines else f"killed (rc={proc.returncode}, out of memory?)"
        print(f"  {model}/{backend}/{structure} failed: {why}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        import warnings

        warnings.simplefilter("ignore")
        print(json.dumps(worker(*json.loads(args.worker), device=args.device)))
        return

    print(
        f"device={args.device} threads={args.threads} float32, {N_PAIRS} pairs / "
        f"{2 * N_PAIRS} samples, D=R={DIM}; median of {args.repeats} "
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
            rows = {
                b: None
                if (model_name, b, structure) in SKIP
                else measure(model_name, b, structure, args)
                for b in backends
            }
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


if __name__ == "__main__":
    main()
