"""Time and peak memory of LAM on real encoder architectures, against stock laplace-torch.

Models (random weights, nothing downloaded; 3x32x32 inputs, a 128-d head): torchvision
``resnet18``, ``resnet50``, a ViT-Tiny-sized ``torchvision.models.VisionTransformer`` (patch 4,
12 layers, 3 heads, width 192), and smaller encoders: a 2-layer ViT of
width 64 (``vit_small``), a CNN with two 3x3 convolutions (``cnn``: 16 and 32 channels, 1x28x28
inputs) and the MLP 784-256-256-128 (on flattened 1x28x28 inputs). Data: 512 random images of 10
classes, batches of 64; 32 queries.

Each cell runs in a fresh subprocess (so the peak memory is the cell's own) under an
address-space cap (``--cap-gb`` above the interpreter's size after imports; default 6 GB), with
``--threads`` intra-op threads. Per stage it records the wall time and the peak resident set
size above the stage's starting RSS (``VmHWM`` in ``/proc/self/status``, reset before each
stage through ``/proc/self/clear_refs``):

* ``fit``: ``la.fit(loader)``;
* ``glm32``: the GLM predictive ``la(x)`` of 32 queries;
* ``score256``: ``la.predictive_uncertainty`` (stock: ``la(x)``) of 256 queries (the GLM trace);
* ``knn256`` (laplace-metric cells): the default score, ``UncertaintyScorer(la, database=x)``
  of the 256 queries (30 weight samples; the 512 training images as the database);
* ``knn256cand`` (laplace-metric all-layer cells): the same with
  ``database_embedding='candidates'`` (the database embedded once at the posterior mean, and
  under the samples only each query's 64 nearest items there);
* ``retrieval`` (laplace-metric last-layer cells): ``posterior_retrieval`` of the 32 queries
  against a 2048-image database with 10 weight samples, also as a multiple of one plain forward
  pass over the same 2080 images.

Methods: ``lam-<subset>-<structure>`` is laplace-metric (``likelihood='contrastive'``, default
backend, default ``memory_budget``); ``stock-<subset>-<structure>`` is stock
``laplace.Laplace(model, 'regression', ...)`` with its default ``CurvlinopsGGN`` on D = 128
regression outputs (per-sample curvature; the floor). Stock kron does not run on models with
parameters outside Linear/Conv2d layers (BatchNorm and LayerNorm affines, attention projections,
class tokens): ``floor-all-kron`` is the same stock fit with only those layers' parameters
trainable (the others frozen), the nearest per-sample floor there is; its ``P`` is in the table.
A failing stage is recorded with its error message. The all-layer cells of ResNet-18/50 and ViT-Tiny are off by default
(``--all-layer``): each takes minutes on a CPU. ``lam-all-full`` cells are there to show the
budget error that names what fits instead. On ViT-Tiny, ``lam-all-kron-frozenpos`` is all-layer
kron with the positional embedding frozen (its Kronecker factor is dense, 12,480 x 12,480).

Run ``nice -n 10 python benchmarks/encoders.py`` (``--models resnet18 --methods lam-ll-kron``
to select cells, ``--stages fit knn256`` to select stages; ``--json out.json`` to keep the raw
results).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from encoder_models import build_encoder  # noqa: E402

EMBED_DIM, N_TRAIN, N_CLASSES, BATCH, N_QUERIES, N_SCORE, N_DB, N_SAMPLES = (
    128,
    512,
    10,
    64,
    32,
    256,
    2048,
    10,
)
MODELS = ("resnet18", "resnet50", "vit_tiny", "vit_small", "cnn", "mlp")
LAST_LAYER = ("ll-diag", "ll-kron", "ll-full")
METHODS = tuple(f"{lib}-{m}" for m in LAST_LAYER for lib in ("stock", "lam"))
ALL_LAYER = (
    "lam-all-diag",
    "lam-all-kron",
    "lam-all-full",
    "stock-all-diag",
    "stock-all-kron",
    "floor-all-kron",
)
#: Every stage of a cell (``--stages`` selects; ``fit`` always runs).
STAGES = ("fit", "glm32", "score256", "knn256", "knn256cand", "retrieval")
#: ViT cells beside :data:`ALL_LAYER`: all-layer kron with the positional embedding frozen.
VIT_ALL_LAYER = ("lam-all-kron-frozenpos",)
#: The small models' all-layer cells are cheap and run by default.
SMALL_METHODS = {
    "mlp": ("stock-all-diag", "lam-all-diag", "stock-ll-kron", "lam-ll-kron"),
    "vit_small": ("floor-all-kron", "lam-all-diag", "lam-all-kron", "lam-all-full"),
    "cnn": ("stock-all-kron", "lam-all-diag", "lam-all-kron", "lam-all-full"),
}


# ---------------------------------------------------------------------- one cell (child)
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


class Stage:
    """Wall time and peak RSS above the starting RSS of one stage."""

    def __init__(self, results: dict, name: str) -> None:
        self.results, self.name = results, name

    def __enter__(self) -> Stage:
        import gc

        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        self.rss0 = _rss_kb("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        elapsed = time.perf_counter() - self.t0
        peak = max(_rss_kb("VmHWM") - self.rss0, 0) * 1024
        entry = {"time": elapsed, "peak_bytes": peak}
        if exc is not None:
            message = f"{exc_type.__name__}: {exc}".replace("\n", " ")
            entry["error"] = message[:400]
        self.results[self.name] = entry
        print("RESULT " + json.dumps(self.results), flush=True)  # partial results survive a timeout
        return exc is not None and not isinstance(exc, KeyboardInterrupt)


def build_model(name: str):
    """One of :mod:`encoder_models` with the benchmark's embedding width."""
    return build_encoder(name, EMBED_DIM)


def freeze_outside_kfac_layers(model) -> None:
    """Only the parameters of Linear and Conv2d layers (what stock KFAC supports) stay trainable.

    Exact types: attention's ``out_proj`` (a Linear subclass) is applied functionally by
    ``nn.MultiheadAttention``, so KFAC's hooks would never see it.
    """
    from torch import nn

    kfac = {
        id(p) for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d) for p in m.parameters()
    }
    for param in model.parameters():
        param.requires_grad_(id(param) in kfac)


def run_cell(model_name: str, method: str, stages: tuple[str, ...] = STAGES) -> dict:
    import torch
    from laplace import Laplace

    import laplace_metric  # noqa: F401  (registers the likelihoods)

    lib, subset, structure, *variant = method.split("-")
    subset = {"ll": "last_layer", "all": "all"}[subset]
    model, shape = build_model(model_name)
    model.eval()
    if variant == ["frozenpos"]:  # a ViT's positional embedding frozen (its kron factor is dense)
        model.encoder.pos_embedding.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN, *shape, generator=gen)
    y = torch.arange(N_TRAIN) % N_CLASSES
    y = y[torch.randperm(N_TRAIN, generator=gen)]
    queries = torch.randn(N_SCORE, *shape, generator=gen)
    results: dict = {"model": model_name, "method": method}
    if lib == "lam":
        la = Laplace(model, "contrastive", subset_of_weights=subset, hessian_structure=structure)
        data = torch.utils.data.TensorDataset(x, y)
        results["memory_budget"] = la.memory_budget
    else:
        if lib == "floor":
            freeze_outside_kfac_layers(model)
        targets = torch.randn(N_TRAIN, EMBED_DIM, generator=gen)
        data = torch.utils.data.TensorDataset(x, targets)
        la = Laplace(model, "regression", subset_of_weights=subset, hessian_structure=structure)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    with Stage(results, "fit"):
        la.fit(loader)
    results["n_params"] = int(la.n_params) if la.n_params is not None else None
    results["backend"] = type(la.backend).__name__
    if "error" in results["fit"]:
        return results
    if "glm32" in stages:
        with Stage(results, "glm32"):
            mean, cov = la(queries[:N_QUERIES], pred_type="glm")
            assert cov.shape == (N_QUERIES, EMBED_DIM, EMBED_DIM), tuple(cov.shape)
    if "score256" in stages:
        with Stage(results, "score256"):
            if lib == "lam":
                la.predictive_uncertainty(queries)
            else:
                la(queries, pred_type="glm")
    if lib == "lam":
        _lam_score_stages(results, la, x, queries, subset, gen, stages)
    return results


def _lam_score_stages(
    results: dict, la, x, queries, subset: str, gen, stages: tuple[str, ...]
) -> None:
    """The posterior-kNN stages, and the retrieval stages of a last-layer posterior."""
    import torch

    from laplace_metric import UncertaintyScorer, posterior_retrieval

    if "knn256" in stages:  # the default score: 30 weight samples, 512-image database
        with Stage(results, "knn256"):
            UncertaintyScorer(la, database=x, progress_bar=False)(queries)
    if subset == "all":
        if "knn256cand" not in stages:
            return
        with Stage(results, "knn256cand"):  # 64 candidates per query under the samples
            scorer = UncertaintyScorer(
                la, database=x, progress_bar=False, database_embedding="candidates"
            )
            scorer(queries)
        return
    if "retrieval" not in stages:
        return
    database = torch.randn(N_DB, *queries.shape[1:], generator=gen)
    db_labels = torch.arange(N_DB) % N_CLASSES
    with Stage(results, "forward"), torch.no_grad():
        for chunk in torch.cat([queries[:N_QUERIES], database]).split(1024):
            la.model(chunk)
    with Stage(results, "retrieval"):
        posterior_retrieval(la, queries[:N_QUERIES], database, db_labels, n_samples=N_SAMPLES)


def child(args: argparse.Namespace) -> None:
    import resource

    import torch

    torch.set_num_threads(args.threads)
    import torchvision  # noqa: F401

    import laplace_metric  # noqa: F401

    size = _rss_kb("VmSize") * 1024
    cap = size + int(args.cap_gb * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        results = run_cell(args.cell[0], args.cell[1], tuple(args.stages))
    except Exception as exc:  # a cell must not crash the table
        traceback.print_exc()
        results = {"model": args.cell[0], "method": args.cell[1], "error": f"{exc!r}"[:400]}
    print("RESULT " + json.dumps(results))


# ---------------------------------------------------------------------- the table (parent)
def measure(model: str, method: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--cell",
        model,
        method,
        "--threads",
        str(args.threads),
        "--cap-gb",
        str(args.cap_gb),
        "--stages",
        *getattr(args, "stages", STAGES),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        partial = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        result = json.loads(partial[-1][len("RESULT ") :]) if partial else {}
        result.update(model=model, method=method, error=f"timed out after {args.timeout:.0f} s")
        return result
    results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if results:
        return json.loads(results[-1][len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"model": model, "method": method, "error": f"exit {proc.returncode}: {tail[0]}"}


def _fmt_stage(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return "fails"
    return f"{entry['time']:.2f} s, {entry['peak_bytes'] / 1e6:.0f} MB"


def _ratio(ours: dict | None, floor: dict | None, key: str) -> str:
    if not ours or not floor or "error" in ours or "error" in floor or floor[key] <= 0:
        return "-"
    return f"{ours[key] / floor[key]:.2g}x"


def table(rows: list[dict]) -> str:
    by_key = {(r["model"], r["method"]): r for r in rows}
    lines = [
        "| model | method | P | fit | GLM, 32 queries | score, 256 queries | "
        "posterior kNN, 256 queries | retrieval (x forward) | fit time / floor | "
        "GLM time / floor | GLM memory / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    errors = []
    for r in rows:
        base = r["method"].removesuffix("-frozenpos")
        floor = by_key.get((r["model"], base.replace("lam-", "stock-")))
        if floor is None or "error" in floor.get("fit", {"error": ""}):
            floor = by_key.get((r["model"], base.replace("lam-", "floor-")), floor)
        if floor is None and base.startswith("lam-all-"):  # the all-layer floor is stock KFAC
            floor = by_key.get((r["model"], "floor-all-kron"))
        is_lam = r["method"].startswith("lam-")
        retrieval = r.get("retrieval")
        ret = "-"
        if retrieval and "error" not in retrieval and "forward" in r:
            ret = f"{retrieval['time']:.2f} s ({retrieval['time'] / r['forward']['time']:.1f}x)"
        elif retrieval:
            ret = "fails"
        cells = [
            r["model"],
            r["method"],
            f"{r['n_params']:,}" if r.get("n_params") else "-",
            _fmt_stage(r.get("fit")) if "error" not in r else "fails",
            _fmt_stage(r.get("glm32")),
            _fmt_stage(r.get("score256")),
            _fmt_stage(r.get("knn256"))
            + (f" (candidates {_fmt_stage(r['knn256cand'])})" if "knn256cand" in r else ""),
            ret,
            _ratio(r.get("fit"), floor and floor.get("fit"), "time") if is_lam else "",
            _ratio(r.get("glm32"), floor and floor.get("glm32"), "time") if is_lam else "",
            _ratio(r.get("glm32"), floor and floor.get("glm32"), "peak_bytes") if is_lam else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        for stage in ("fit", "glm32", "score256", "knn256", "knn256cand", "retrieval"):
            if r.get(stage, {}).get("error"):
                errors.append(f"- {r['model']} {r['method']} {stage}: {r[stage]['error']}")
        if "error" in r:
            errors.append(f"- {r['model']} {r['method']}: {r['error']}")
    return "\n".join(lines) + ("\n\nFailures:\n" + "\n".join(errors) if errors else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=None, help="default: all but all-layer")
    parser.add_argument("--all-layer", action="store_true", help="add the all-layer cells")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap-gb", type=float, default=6.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--stages",
        nargs="+",
        default=list(STAGES),
        choices=STAGES,
        help="stages to run after the fit (default: all; e.g. --stages fit for a fit-only table)",
    )
    parser.add_argument(
        "--from-json",
        nargs="+",
        type=Path,
        default=None,
        help="print the table of saved --json results (later files replace earlier cells)",
    )
    parser.add_argument("--cell", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell is not None:
        child(args)
        return
    if args.from_json is not None:
        merged: dict = {}
        for path in args.from_json:
            for row in json.loads(path.read_text()):
                merged[(row["model"], row["method"])] = row
        print(table(list(merged.values())))
        return
    rows = []
    for model in args.models:
        methods = args.methods or list(SMALL_METHODS.get(model, METHODS))
        if args.all_layer and args.methods is None and model not in SMALL_METHODS:
            methods += list(ALL_LAYER) + (list(VIT_ALL_LAYER) if model == "vit_tiny" else [])
        for method in methods:
            result = measure(model, method, args)
            print(json.dumps(result), flush=True)
            rows.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
