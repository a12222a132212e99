"""Metrics and the baseline rows of :mod:`benchmarks.pretrained` (no Laplace posterior).

Every row is a dict of metrics: ``R@1``, ``MAP@R``, ``ECE`` (of the row's probability that the
top-1 match has the query's label), ``AUSE`` (top-1 errors sparsified by ``1 - p``), ``AUROC``
(FashionMNIST test vs MNIST). Rows whose probability is a margin (deterministic kNN) have it
calibrated on validation queries with the same probit fit as the analytic index
(:func:`laplace_metric.retrieval.fit_temperature`); vote fractions of samples or members are
used as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUERY_CHUNK = 500


def metrics(p, correct, ood_in, ood_out, map_r: float | None = None, p_ood=None) -> dict:
    """The row of a method from its match probability (or ``None``) and OOD scores; with the
    probability ``p_ood`` of the OOD queries, also the OOD AUROC of ``1 - p``."""
    from laplace_metric.metrics import ood_auroc, retrieval_ece
    from laplace_metric.metrics.sparsification import sparsification_error_area

    row = {"R@1": correct.float().mean().item()}
    if map_r is not None:
        row["MAP@R"] = map_r
    if p is not None:
        row["ECE"] = retrieval_ece(p, correct)
        row["AUSE"] = sparsification_error_area(1 - p, (~correct).float())
    if ood_in is not None:
        row["AUROC"] = ood_auroc(ood_in, ood_out)
    if p_ood is not None:
        row["AUROC 1-p"] = ood_auroc(1 - p, 1 - p_ood)
    return row


def map_at_r(q, yq, g, yg, distance=None) -> float:
    from laplace_metric.metrics import map_at_r as _map_at_r

    return _map_at_r(q, yq, g, yg, distance=distance)


def top_and_margin(sim: torch.Tensor, yg: torch.Tensor):
    """Top-1 index, its similarity, and the margin to the best item with another label."""
    top = sim.argmax(1)
    s1 = sim.gather(1, top[:, None])[:, 0]
    s2 = sim.masked_fill(yg[None, :] == yg[top][:, None], -torch.inf).max(1).values
    return top, s1, s1 - s2


def cosine_top(q: torch.Tensor, g: torch.Tensor, yg: torch.Tensor):
    """``(top-1 labels, margins, top-1 cosine)`` of queries ``q`` against gallery ``g``."""
    g = F.normalize(g, dim=1)
    parts = [top_and_margin(F.normalize(c, dim=1) @ g.T, yg) for c in q.split(QUERY_CHUNK)]
    top, s1, margin = (torch.cat(p) for p in zip(*parts))
    return yg[top], margin, s1


def calibrated_margin(val_margin, val_correct, margins):
    """Probit of the margins, ``(tau, kappa)`` fitted on validation margins (zero variance)."""
    from laplace_metric.retrieval import fit_temperature, match_probability

    tau, kappa = fit_temperature(val_margin, torch.zeros_like(val_margin), val_correct)
    return [match_probability(m, torch.zeros_like(m), tau, kappa) for m in margins]


def cosine_row(emb: dict, labels: dict, with_map: bool = True) -> dict:
    """Deterministic cosine kNN: margin probability calibrated on ``val``; OOD score: the
    cosine distance to the nearest gallery item."""
    g, yg = emb["gallery"], labels["gallery"]
    out = {k: cosine_top(emb[k], g, yg) for k in ("val", "test", "ood")}
    p, p_ood = calibrated_margin(
        out["val"][1], out["val"][0] == labels["val"], [out["test"][1], out["ood"][1]]
    )
    map_r = map_at_r(emb["test"], labels["test"], g, yg) if with_map else None
    correct = out["test"][0] == labels["test"]
    return metrics(p, correct, 1 - out["test"][2], 1 - out["ood"][2], map_r, p_ood)


def mahalanobis_row(feats: dict, labels: dict) -> dict:
    """Mahalanobis distance to the nearest class mean on the backbone features (OOD only)."""
    from laplace_metric.baselines import MahalanobisBaseline
    from laplace_metric.metrics import ood_auroc

    maha = MahalanobisBaseline(nn.Identity()).fit(feats["gallery"], labels["gallery"])
    return {"AUROC": ood_auroc(maha.score(feats["test"]), maha.score(feats["ood"]))}


def vote_top1(samples: torch.Tensor, g: torch.Tensor, yg: torch.Tensor) -> torch.Tensor:
    """Top-1 gallery labels ``(S, Q)`` of query embedding samples ``(S, Q, D)`` (cosine)."""
    g = F.normalize(g, dim=1)
    return torch.stack(
        [torch.cat([yg[(F.normalize(c, dim=1) @ g.T).argmax(1)] for c in s.split(QUERY_CHUNK)])
         for s in samples]
    )  # fmt: skip


def embed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(module.eval()(x), dim=1)


def mc_dropout_row(head: nn.Module, feats: dict, labels: dict, n_samples: int = 30) -> dict:
    """MC dropout: gallery embedded with dropout off, each query ``n_samples`` times with it on;
    probability = fraction of samples whose top-1 label is the mean embedding's; OOD score =
    trace of the embedding samples' covariance."""
    from laplace_metric.baselines import MCDropoutBaseline

    mc = MCDropoutBaseline(head, n_samples=n_samples, seed=0)
    g, yg = embed(head, feats["gallery"]), labels["gallery"]
    out = {}
    for k in ("test", "ood"):
        q = mc.samples(feats[k])
        mean = F.normalize(q.mean(0), dim=1)
        predicted = cosine_top(mean, g, yg)[0]
        p = (vote_top1(q, g, yg) == predicted).float().mean(0)
        out[k] = (mean, predicted, p, q.var(0).sum(-1))
    mean, predicted, p, score = out["test"]
    map_r = map_at_r(mean, labels["test"], g, yg)
    return metrics(p, predicted == labels["test"], score, out["ood"][3], map_r, out["ood"][2])


def ensemble_row(members: list[nn.Module], feats: dict, labels: dict) -> dict:
    """Deep ensemble: retrieval with the joint embedding; probability = fraction of members
    whose own top-1 label is the joint one; OOD score = mean over members of the kNN distance
    (:class:`laplace_metric.baselines.DeepEnsembleBaseline`)."""
    from laplace_metric.baselines import DeepEnsembleBaseline

    ens = DeepEnsembleBaseline(members).fit(feats["gallery"])
    yg = labels["gallery"]
    out = {}
    for k in ("test", "ood"):
        each = ens.member_embeddings(feats[k])
        joint = torch.cat(each, dim=1) / len(each) ** 0.5
        predicted = cosine_top(joint, ens.train_emb, yg)[0]
        votes = torch.stack([cosine_top(e, g, yg)[0] for e, g in zip(each, ens.member_train_emb)])
        out[k] = (joint, predicted, (votes == predicted).float().mean(0), ens.score(feats[k]))
    joint, predicted, p, score = out["test"]
    map_r = map_at_r(joint, labels["test"], ens.train_emb, yg)
    return metrics(p, predicted == labels["test"], score, out["ood"][3], map_r, out["ood"][2])
