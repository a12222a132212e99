"""Retrieval at gallery scale: analytic posterior similarity vs deterministic top-k vs sampling.

A last-layer Kronecker posterior over a ``1280 -> 128`` linear head (the size of a projection
head on EfficientNet-Lite0 features), fitted on 2000 synthetic features from 10 classes. The
gallery holds ``G`` synthetic features (class centres plus noise, float32). For 1000 queries,
``k = 10``:

* ``deterministic``: MAP cosine similarities by matrix products in chunks, then top-k;
* ``analytic``: :class:`laplace_metric.retrieval.RetrievalIndex` (candidates by the MAP cosine,
  64 per query, re-ranked by the closed-form posterior mean; variance of each match and the
  match probability with its margin variance);
* ``faiss-<factory>``: the analytic search with its candidates from a faiss inner-product
  index (``candidate_search='faiss'``, e.g. ``faiss-HNSW32`` with ``efSearch=128``,
  ``faiss-IVF1024,Flat`` with ``nprobe=32``, ``faiss-Flat``; other search parameters after a
  colon, ``faiss-IVF1024,Flat:nprobe=128``; optional extra
  ``laplace-metric[faiss]``, one faiss thread), re-ranked exactly as above; the faiss index is
  built once with the gallery (its time is printed), and the top-k overlap with the matmul
  analytic search of the same run is reported;
* ``sampled``: 30 weight samples from ``la.sample``; each re-applies the head to the gallery
  and the queries and takes the top-k (the package's sampled retrieval,
  :func:`~laplace_metric.scores.posterior_retrieval`, works the same way). With ``--sampled-
  samples S < 30`` it times ``S`` samples and scales the time to 30 (printed as such).

Each (method, G) runs in a fresh subprocess with one torch thread (``OMP_NUM_THREADS=1``); the
memory column is the peak resident set during the search minus the resident set after the
gallery was built (what the search needs beyond the gallery). All methods use the same
``memory_budget`` (``--budget``, default 1GB) for their chunks. Timings on a shared machine are
noisy: compare the ratios, measured in the same run.

Run ``python benchmarks/retrieval_speed.py --sizes 100000 1000000`` (add ``--methods
deterministic analytic faiss-HNSW32`` to time faiss, which must be installed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_FEATURES, DIM, N_CLASSES, N_QUERIES, K = 1280, 128, 10, 1000, 10
#: faiss search parameters by index family (``faiss-HNSW32`` -> ``HNSW``,
#: ``faiss-IVF1024,Flat`` -> ``IVF``)
FAISS_PARAMS = {"HNSW": "efSearch=128", "IVF": "nprobe=32"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def features(n: int, seed: int, centres: torch.Tensor, out: torch.Tensor | None = None):
    """``n`` synthetic features and labels, generated in chunks (into ``out`` if given)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(N_CLASSES, (n,), generator=gen)
    out = torch.empty(n, N_FEATURES) if out is None else out
    for start in range(0, n, 50_000):
        y = labels[start : start + 50_000]
        noise = torch.randn(len(y), N_FEATURES, generator=gen)
        out[start : start + len(y)] = torch.relu(centres[y] + 2.0 * noise)
    return out, labels


def fitted_estimator(centres: torch.Tensor, budget: str):
    import laplace

    import laplace_metric  # noqa: F401

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(N_FEATURES, DIM))
    x, y = features(2000, 1, centres)
    la = laplace.Laplace(
        model, "contrastive", "last_layer", "kron", memory_budget=budget, prior_precision=1.0
    )
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100))
    return la


def gallery_index(la, size: int, centres: torch.Tensor, budget: str, **kwargs):
    """The index of a synthetic gallery, built chunk by chunk (no full-size copy)."""
    from laplace_metric.predictive.similarity import similarity_provider
    from laplace_metric.predictive.similarity_stats import Items
    from laplace_metric.retrieval import RetrievalIndex

    post = similarity_provider(la)
    phi, labels = features(size, 2, centres)
    z, n, c = torch.empty(size, DIM), torch.empty(size), torch.empty(size, DIM)
    with torch.no_grad():
        for start in range(0, size, 50_000):
            items = post.items(phi[start : start + 50_000])
            stop = start + len(items.n)
            z[start:stop], n[start:stop], c[start:stop] = items.z, items.n, items.c
            phi[start:stop] = items.psi  # rotated features replace the raw ones in place
    gallery = Items(z=z, n=n, psi=phi, c=c)
    index = RetrievalIndex(post, gallery, labels, n_candidates=64, memory_budget=budget, **kwargs)
    return index, labels


def deterministic(index, q: torch.Tensor, budget: int):
    z = index.posterior.items(q).z
    chunk = max(1, budget // (2 * len(index.gallery.n) * 4))
    return torch.cat([(c @ index.gallery.z.T).topk(K, dim=1).indices for c in z.split(chunk)])


def sampled(la, index, q: torch.Tensor, n_samples: int, budget: int):
    """Per weight sample: head on the gallery (rotated features) and queries, then top-k."""
    post = index.posterior
    torch.manual_seed(0)
    weights = la.sample(n_samples)
    D, N = DIM, N_FEATURES
    chunk = max(1, budget // (2 * len(index.gallery.n) * 4))
    out = []
    for w in weights:
        W, b = w[: D * N].reshape(D, N), w[D * N :]
        Wr = W @ post.Q2  # g = W phi + b = (W Q2) psi + b
        zg = torch.cat([(p @ Wr.T + b) for p in index.gallery.psi.split(50_000)])
        zg = zg / zg.norm(dim=1, keepdim=True)
        zq = q @ W.T + b
        zq = zq / zq.norm(dim=1, keepdim=True)
        out.append(torch.cat([(c @ zg.T).topk(K, dim=1).indices for c in zq.split(chunk)]))
    return out


def build_index(la, method: str, size: int, centres: torch.Tensor, budget: str):
    """The gallery index (for ``faiss-<factory>``: and its faiss index; ``faiss`` seconds)."""
    kwargs, seconds = {}, 0.0
    if method.startswith("faiss-"):
        import faiss

        faiss.omp_set_num_threads(1)
        factory, _, params = method.split("-", 1)[1].partition(":")
        params = params or FAISS_PARAMS.get(re.match(r"[A-Za-z]*", factory).group())
        kwargs = {"candidate_search": "faiss", "faiss_factory": factory, "faiss_params": params}
    index, _ = gallery_index(la, size, centres, budget)
    if kwargs:
        from laplace_metric.retrieval import RetrievalIndex

        t0 = time.perf_counter()
        index = RetrievalIndex(index.posterior, index.gallery, index.labels, n_candidates=64,
                               memory_budget=budget, **kwargs)  # fmt: skip
        seconds = time.perf_counter() - t0
    return index, seconds


def child(method: str, size: int, budget: str, n_samples: int, save: str | None) -> dict:
    from laplace_metric.memory import parse_bytes

    torch.set_num_threads(1)
    centres = 3.0 * torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(0))
    la = fitted_estimator(centres, budget)
    t0 = time.perf_counter()
    index, faiss_build = build_index(la, method, size, centres, budget)
    build = time.perf_counter() - t0 - faiss_build
    q, _ = features(N_QUERIES, 3, centres)
    before = rss_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        if method == "deterministic":
            top = deterministic(index, q, parse_bytes(budget))
        elif method == "sampled":
            top = sampled(la, index, q, n_samples, parse_bytes(budget))[0]
        else:
            top = index.search_features(q, k=K).indices
    seconds = time.perf_counter() - t0
    if method == "sampled":
        seconds *= 30 / n_samples
    if save:
        torch.save(top, save)
    return {"seconds": seconds, "memory": peak_rss_bytes() - before, "build": build,
            "faiss build": faiss_build}  # fmt: skip


def run(method: str, size: int, args, save: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", method, "--sizes", str(size)]
    cmd += ["--budget", args.budget, "--sampled-samples", str(args.sampled_samples)]
    cmd += ["--save", save] if save else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--budget", default="1GB")
    parser.add_argument("--sampled-samples", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=["deterministic", "analytic", "sampled"])
    parser.add_argument("--child", default=None)
    parser.add_argument("--save", default=None)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.sizes[0], args.budget, args.sampled_samples, args.save)
        print(json.dumps(result))
        return
    print(f"{N_QUERIES} queries, k={K}, features {N_FEATURES} -> {DIM}, last-layer kron, "
          f"1 thread, budget {args.budget}")  # fmt: skip
    print("| G | method | seconds | x deterministic | memory beyond gallery (MB) | top-k overlap "
          "with analytic |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            time_size(size, args, Path(tmp))


def time_size(size: int, args, tmp: Path) -> None:
    """Every method at gallery size ``size``, printed as table rows."""
    base, builds = None, {}
    methods = ["deterministic"] + [m for m in args.methods if m != "deterministic"]
    for method in methods:
        r = run(method, size, args, save=str(tmp / f"{method}.pt"))
        base = r["seconds"] if method == "deterministic" else base
        builds[method] = (r["build"], r["faiss build"])
        label = method
        if method == "sampled" and args.sampled_samples < 30:
            label += f" ({args.sampled_samples} timed, x{30 / args.sampled_samples:g})"
        overlap = ""
        if method.startswith("faiss-") and (tmp / "analytic.pt").exists():
            ref, top = torch.load(tmp / "analytic.pt"), torch.load(tmp / f"{method}.pt")
            hits = (ref[:, :, None] == top[:, None, :]).any(-1).float().mean()
            overlap = f"{hits.item():.3f}"
        print(f"| {size:,} | {label} | {r['seconds']:.2f} | {r['seconds'] / base:.2f} | "
              f"{r['memory'] / 1e6:.0f} | {overlap} |", flush=True)  # fmt: skip
    for method, (build, faiss_build) in builds.items():
        extra = f" + faiss index {faiss_build:.1f} s" if faiss_build else ""
        print(f"(G={size:,}, {method}: index build {build:.1f} s{extra}, once)")


if __name__ == "__main__":
    main()
