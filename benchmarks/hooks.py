"""Time and peak memory of all-layer fits with :class:`HookPairGGN` on real encoders.

Cells (random weights, eval mode, float32, CPU): torchvision ``resnet18`` and ``resnet50`` with a
128-d ``fc``, and a small torchvision ``VisionTransformer`` (image 32, patch 4, 2 layers, 4 heads,
width 64, MLP 128, 128-d head); 3x32x32 inputs, ``--images`` (512) random images of 10 classes,
batch 64, contrastive likelihood with ``hessian_method='positives'``. Each cell fits an
all-layer ``diag`` or ``kron`` Laplace and predicts ``--queries`` (32) inputs with
:func:`~laplace_metric.curvature.hooks.predictive_covariance`, the layer-by-layer product that
the estimator's GLM predictive ``la(x)`` uses for these posteriors (never a ``B x D x P``
Jacobian, 32 x 128 x 11.7M for resnet18); calling it directly lets ``--phase predict`` time the
predictive of a unit posterior without a fit. ``benchmarks/encoders.py`` times ``la(x)`` itself.

Every cell runs in a fresh subprocess under an address-space limit of ``--limit-gb`` (6 GB;
``RLIMIT_AS``, which also counts the ~3.8 GB of virtual memory that importing torch maps);
the reported peak is the child's peak resident set size
(``ru_maxrss`` of ``os.wait4`` on that child).

``--phase predict`` times the predictive alone with a unit posterior; ``--timeout`` kills a
cell after that many seconds and still reports its peak RSS so far (the passes are
chunked, so the peak is reached within the first chunk of the first batch).

Run ``python benchmarks/hooks.py`` (``--cells resnet18-diag vit-kron`` for a subset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CELLS = ["resnet18-diag", "resnet18-kron", "vit-diag", "vit-kron", "resnet50-diag"]


def build_model(name: str):
    """The encoders, random weights, eval mode, 128-d output (``vit``: ``vit_small``)."""
    from encoder_models import build_encoder

    return build_encoder({"vit": "vit_small"}.get(name, name))[0].eval()


def synthetic_posterior(la, structure: str):
    """A unit posterior (``--phase predict`` without a fit): variances 1, or identity Kronecker
    factors with prior precision 1 (the cost of the predictive does not depend on the values)."""
    import torch
    from laplace.utils import Kron

    params = [p for p in la.model.parameters() if p.requires_grad]
    if structure == "diag":
        return torch.ones(sum(p.numel() for p in params))
    kron = Kron.init_from_model(params, torch.device("cpu"), torch.float32)
    kron = Kron([[torch.eye(f.shape[0]) for f in factors] for factors in kron.kfacs])
    return kron.decompose() + torch.tensor(1.0)


def run_cell(cell: str, images: int, queries: int, batch: int, phase: str) -> dict:
    """Fit and/or predict in this process; returns timings."""
    import torch
    from laplace import Laplace

    import laplace_metric  # noqa: F401
    from laplace_metric.curvature.hooks import HookPairGGN, predictive_covariance

    name, structure = cell.split("-")
    model = build_model(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=gen)
    y = torch.arange(images) % 10
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False
    )
    la = Laplace(
        model,
        "contrastive",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=HookPairGGN,
    )
    fit_s = None
    if phase != "predict":
        start = time.perf_counter()
        la.fit(loader)
        fit_s = round(time.perf_counter() - start, 1)
        print(json.dumps({"fit_s": fit_s}), flush=True)
    if phase == "fit":
        return {"cell": cell, "phase": phase, "fit_s": fit_s}
    if phase == "predict":
        posterior = synthetic_posterior(la, structure)
    else:
        posterior = la.posterior_variance if structure == "diag" else la.posterior_precision
    start = time.perf_counter()
    z, cov = predictive_covariance(la.backend, x[:queries], posterior)
    predict_s = time.perf_counter() - start
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    return {
        "cell": cell,
        "params": sum(p.numel() for p in model.parameters()),
        "phase": phase,
        "fit_s": fit_s,
        "predict_s": round(predict_s, 1),
        "finite": bool(torch.isfinite(cov).all()),
        "trace_mean": float(trace.mean()),
    }


def parse_args() -> argparse.Namespace:
    """The command line (``--child CELL`` runs one cell in this process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", nargs="+", default=CELLS, help="cells to run, one child each")
    parser.add_argument("--images", type=int, default=512, help="images fitted per cell")
    parser.add_argument("--queries", type=int, default=32, help="queries predicted per cell")
    parser.add_argument("--batch", type=int, default=64, help="fit batch size")
    parser.add_argument("--limit-gb", type=float, default=6.0, help="address-space cap per child")
    parser.add_argument("--phase", choices=["fit", "predict", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per cell")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_child(cell: str, args: argparse.Namespace) -> tuple[int, str, str, Any]:
    """Run one cell in a child process under the memory cap and the time limit.

    Returns
    -------
    returncode, stdout, stderr, usage
        ``usage`` is the child's own ``resource`` usage (its peak RSS).
    """
    limit = int(args.limit_gb * 2**30)
    cmd = [sys.executable, __file__, "--child", cell, "--images", str(args.images)]
    cmd += ["--queries", str(args.queries), "--batch", str(args.batch), "--phase", args.phase]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
        )
        timer = threading.Timer(args.timeout, proc.kill) if args.timeout else None
        if timer is not None:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        if timer is not None:
            timer.cancel()
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read(), err.read(), usage


def cell_row(cell: str, args: argparse.Namespace) -> dict:
    """One JSON row: the child's results, wall time, peak RSS and error, if any."""
    start = time.perf_counter()
    returncode, stdout, stderr, usage = run_child(cell, args)
    row = {"cell": cell, "rc": returncode, "wall_s": round(time.perf_counter() - start, 1)}
    for line in stdout.splitlines():
        if line.startswith("{"):
            row.update(json.loads(line))
    if returncode == -9 and args.timeout:
        row["error"] = f"killed at the {args.timeout:.0f} s time limit"
    elif returncode != 0:
        row["error"] = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
    row["peak_rss_gb"] = round(usage.ru_maxrss / 2**20, 2)
    return row


def main() -> None:
    args = parse_args()
    if args.child:
        result = run_cell(args.child, args.images, args.queries, args.batch, args.phase)
        print(json.dumps(result))
        return
    for cell in args.cells:
        print(json.dumps(cell_row(cell, args)), flush=True)


if __name__ == "__main__":
    main()
