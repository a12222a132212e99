"""The Laplace rows of :mod:`benchmarks.pretrained`: post-hoc last-layer LAM on a trained head.

* analytic (diag, kron): :class:`laplace_metric.retrieval.RetrievalIndex` over the gallery,
  its probit match probability calibrated on validation queries; OOD score ``1 - p``;
* the curvature-off control (:func:`laplace_metric.controls.curvature_off`: the same estimator,
  its posterior the prior), indexed and calibrated the same way;
* sampled (30 weight samples, :class:`laplace_metric.UncertaintyScorer`): probability = the
  fraction of samples whose top-1 label is the mean's; OOD score = the posterior kNN distance;
  its time, and its top-1 agreement with the analytic path;
* the Bregman head: ``la.predictive_similarity`` has no closed form for a learned potential, so
  its LAM row is sampled: 30 last-layer weight samples, Bregman kNN per sample
  (:func:`laplace_metric.bregman.bregman_knn`).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from pretrained_rows import calibrated_margin, map_at_r, metrics
from torch import nn

N_SAMPLES = 30
MARGLIK_STEPS = 100


def fit_laplace(head: nn.Module, feats: dict, labels: dict, structure: str, **kwargs):
    """Post-hoc last-layer LAM on ``head``, prior precision by marginal likelihood."""
    import laplace

    import laplace_metric  # noqa: F401  (registers the likelihoods)

    likelihood = kwargs.pop("likelihood", "contrastive")
    batch_size = kwargs.pop("batch_size", 128)
    la = laplace.Laplace(head, likelihood, "last_layer", structure, **kwargs)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(feats["gallery"], labels["gallery"]), batch_size=batch_size
    )
    la.fit(loader, progress_bar=False)
    la.optimize_prior_precision(method="marglik", n_steps=MARGLIK_STEPS)
    return la


def analytic_row(la, feats: dict, labels: dict, control: bool = False):
    """The analytic row (``control``: with the curvature off); ``(row, test SearchResult)``."""
    from laplace_metric.controls import curvature_off
    from laplace_metric.retrieval import RetrievalIndex

    with curvature_off(la) if control else contextlib.nullcontext():
        index = RetrievalIndex.from_laplace(la, feats["gallery"], labels["gallery"])
        index.calibrate(feats["val"], labels["val"])
        t0 = time.perf_counter()
        test = index.search(feats["test"], k=1)
        seconds = time.perf_counter() - t0
        ood = index.search(feats["ood"], k=1)
    p = test.match_probability
    correct = labels["gallery"][test.indices[:, 0]] == labels["test"]
    row = metrics(p, correct, test.variance[:, 0], ood.variance[:, 0], None, ood.match_probability)
    row["search s"] = seconds
    return row, test


def sampled_row(la, feats: dict, labels: dict, analytic) -> dict:
    """The sampled-LAM row, with its time and top-1 agreement with ``analytic``."""
    from laplace_metric import UncertaintyScorer

    t0 = time.perf_counter()
    scorer = UncertaintyScorer(la, feats["gallery"], labels["gallery"], n_samples=N_SAMPLES,
                               generator=torch.Generator().manual_seed(0), progress_bar=False)  # fmt: skip
    res = scorer.retrieval(feats["test"])
    seconds = time.perf_counter() - t0
    ood = scorer.retrieval(feats["ood"])
    correct = res.predicted == labels["test"]
    row = metrics(res.confidence, correct, res.knn_distance, ood.knn_distance, None, ood.confidence)
    analytic_label = labels["gallery"][analytic.indices[:, 0]]
    row.update(
        {"search s": seconds, "agree": (analytic_label == res.predicted).float().mean().item()}
    )
    return row


def _bregman_top(q: torch.Tensor, g: torch.Tensor, yg: torch.Tensor, div):
    """Bregman top-1 labels, margins (rival divergence minus top-1's) and top-1 divergences."""
    from pretrained_rows import QUERY_CHUNK, top_and_margin

    with torch.no_grad():
        grad = div.potential.gradient(g)
        parts = [top_and_margin(-div.pairwise(c, g, grad_y=grad), yg) for c in q.split(QUERY_CHUNK)]
    top, s1, margin = (torch.cat(p) for p in zip(*parts))
    return yg[top], margin, -s1


def bregman_rows(head: nn.Module, div, feats: dict, labels: dict, n_fit: int) -> dict:
    """Deterministic Bregman kNN, and sampled last-layer LAM (kron) with Bregman kNN, the
    posterior fitted on the first ``n_fit`` gallery items (batches of 32)."""
    from laplace_metric.bregman import BregmanDistance

    with torch.no_grad():
        emb = {k: F.normalize(head(v), dim=1) for k, v in feats.items()}
    g, yg = emb["gallery"], labels["gallery"]
    out = {k: _bregman_top(emb[k], g, yg, div) for k in ("val", "test", "ood")}
    p, p_ood = calibrated_margin(
        out["val"][1], out["val"][0] == labels["val"], [out["test"][1], out["ood"][1]]
    )
    map_r = map_at_r(emb["test"], labels["test"], g, yg, distance=BregmanDistance(div))
    correct = out["test"][0] == labels["test"]
    rows = {"det": metrics(p, correct, out["test"][2], out["ood"][2], map_r, p_ood)}
    subset = {k: v[:n_fit] for k, v in feats.items()}
    la = fit_laplace(head, subset, {k: v[:n_fit] for k, v in labels.items()}, "kron",
                     likelihood="bregman", divergence=div, margin=1.0, batch_size=32)  # fmt: skip
    predicted = {k: out[k][0] for k in ("test", "ood")}
    rows["lam"] = _bregman_sampled(la, head, div, feats, labels, predicted)
    return rows


def _bregman_sampled(la, head: nn.Module, div, feats: dict, labels: dict, predicted) -> dict:
    """Last-layer weight samples; per sample, Bregman kNN of the test and OOD queries."""
    last = head[-1]
    D, N = last.weight.shape
    votes, knn = {"test": [], "ood": []}, {"test": 0.0, "ood": 0.0}
    with torch.no_grad():
        phi = {k: head[:-1](v) for k, v in feats.items() if k != "val"}
        for w in la.sample(N_SAMPLES, generator=torch.Generator().manual_seed(0)):
            W, b = w[: D * N].reshape(D, N), w[D * N :]
            g = F.normalize(phi["gallery"] @ W.T + b, dim=1)
            for k in ("test", "ood"):
                top, _, d1 = _bregman_top(F.normalize(phi[k] @ W.T + b, dim=1), g,
                                          labels["gallery"], div)  # fmt: skip
                knn[k] = knn[k] + d1 / N_SAMPLES
                votes[k].append(top == predicted[k])
    p = {k: torch.stack(v).float().mean(0) for k, v in votes.items()}
    correct = predicted["test"] == labels["test"]
    return metrics(p["test"], correct, knn["test"], knn["ood"], None, p["ood"])
