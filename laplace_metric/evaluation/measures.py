"""Scores and embeddings -> metric dictionaries (the cells of a row)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from laplace_metric.metrics import (
    ReliabilityBins,
    SparsificationCurve,
    map_at_r,
    ood_aupr,
    ood_auroc,
    recall_at_k,
    reliability_diagram_data,
    sparsification_curve,
    truncated_map_at_k,
)

__all__ = [
    "calibration_metrics",
    "ood_metrics",
    "retrieval_metrics",
    "sparsification_metrics",
]


def ood_metrics(score_in: Tensor, score_out: Tensor, suffix: str = "") -> dict[str, float]:
    """``AUROC<suffix>`` and ``AUPR<suffix>`` of OOD detection (OOD = positive, high score)."""
    return {
        f"AUROC{suffix}": ood_auroc(score_in, score_out),
        f"AUPR{suffix}": ood_aupr(score_in, score_out),
    }


def retrieval_metrics(
    query_emb: Tensor,
    query_labels: Tensor,
    db_emb: Tensor,
    db_labels: Tensor,
    recall_ks: Sequence[int] = (1,),
    map_ks: Sequence[int] = (),
) -> dict[str, float]:
    """``recall@k`` for ``recall_ks``, truncated ``mAP@k`` for ``map_ks``, then ``MAP@R``."""
    row = {
        f"recall@{k}": recall_at_k(query_emb, query_labels, db_emb, db_labels, k=k)
        for k in recall_ks
    }
    for k in map_ks:
        row[f"mAP@{k}"] = truncated_map_at_k(query_emb, query_labels, db_emb, db_labels, k=k)
    row["MAP@R"] = map_at_r(query_emb, query_labels, db_emb, db_labels)
    return row


def sparsification_metrics(
    score: Tensor, wrong: Tensor, n_steps: int = 50
) -> tuple[dict[str, float], SparsificationCurve]:
    """``{'AUSE': ...}`` of sparsifying by ``score`` with error ``wrong``, and the curve."""
    curve = sparsification_curve(score, wrong.double(), n_steps=n_steps)
    return {"AUSE": curve.error_area}, curve


def calibration_metrics(
    confidence: Tensor, correct: Tensor
) -> tuple[dict[str, float], ReliabilityBins]:
    """``{'ECE': ...}`` of a top-1 confidence against correctness, and the bins."""
    bins = reliability_diagram_data(confidence, correct)
    return {"ECE": bins.ece}, bins
