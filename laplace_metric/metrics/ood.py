"""OOD detection: the kNN-distance score and AUROC / AUPR with OOD inputs as positives.

Scores follow one convention: higher = more out-of-distribution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from laplace_metric.metrics._base import DistanceFn, _check_scores, _is_pml_distance
from laplace_metric.metrics.retrieval import nearest_neighbours

if TYPE_CHECKING:
    from pytorch_metric_learning.distances import BaseDistance

__all__ = ["knn_distance_score", "ood_auroc", "ood_aupr"]


def knn_distance_score(
    query_emb: Tensor,
    train_emb: Tensor,
    k: int = 1,
    exclude_self: bool = False,
    distance: DistanceFn | BaseDistance | None = None,
) -> Tensor:
    """Distance from each query to its ``k``-th nearest training embedding (OOD score).

    ``s(q) = d(q, t_(k))`` with ``t_(k)`` the k-th nearest training embedding; the deterministic
    baseline of the demo. Higher = more OOD.

    Parameters
    ----------
    query_emb : Tensor
        ``(n, D)``.
    train_emb : Tensor
        ``(m, D)``.
    k : int, default=1
    exclude_self : bool, default=False
        The queries are the training set (leave-one-out).
    distance : callable, optional
        ``distance(query, db) -> (n, m)``, smaller = closer; default Euclidean. Similarities
        (inverted pml distances) are rejected, since the score must grow with distance.

    Returns
    -------
    scores : Tensor
        ``(n,)``.
    """
    if _is_pml_distance(distance) and distance.is_inverted:
        raise ValueError("knn_distance_score needs a distance, not a similarity (is_inverted).")
    dist, _ = nearest_neighbours(query_emb, train_emb, k, exclude_self, distance)
    return dist[:, k - 1]


def _ood_inputs(scores_in: Tensor, scores_out: Tensor) -> tuple[Tensor, Tensor]:
    _check_scores(scores_in, "scores_in")
    _check_scores(scores_out, "scores_out")
    scores = torch.cat([scores_in.double().cpu(), scores_out.double().cpu()])
    # torchmetrics applies a sigmoid to scores outside [0, 1], which saturates and creates
    # false ties; a min-max rescaling keeps the order exactly.
    span = scores.max() - scores.min()
    scores = (scores - scores.min()) / span if span > 0 else torch.full_like(scores, 0.5)
    target = torch.cat(
        [
            torch.zeros(len(scores_in), dtype=torch.long),
            torch.ones(len(scores_out), dtype=torch.long),
        ]
    )
    return scores, target


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve for separating OOD from in-distribution inputs (torchmetrics).

    The **OOD inputs are the positive class**, and higher scores mean more OOD:
    ``AUROC = P(s_out > s_in) + 1/2 P(s_out = s_in)``. 1 is perfect, 0.5 is chance, and
    values below 0.5 mean the score ranks in-distribution inputs as more OOD.

    Parameters
    ----------
    scores_in : Tensor
        Scores of in-distribution inputs ``(n_in,)``.
    scores_out : Tensor
        Scores of OOD inputs ``(n_out,)``.

    Returns
    -------
    auroc : float
    """
    from torchmetrics.functional.classification import binary_auroc  # slow import, done lazily

    scores, target = _ood_inputs(scores_in, scores_out)
    return binary_auroc(scores, target).item()


def ood_aupr(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the precision-recall curve with the **OOD inputs as the positive class**.

    Computed as torchmetrics' average precision ``sum_n (R_n - R_{n-1}) P_n`` over thresholds on
    the score (higher = more OOD). A random score gets ``n_out / (n_in + n_out)``.

    Parameters
    ----------
    scores_in : Tensor
        Scores of in-distribution inputs ``(n_in,)``.
    scores_out : Tensor
        Scores of OOD inputs ``(n_out,)``.

    Returns
    -------
    aupr : float
    """
    from torchmetrics.functional.classification import binary_average_precision

    scores, target = _ood_inputs(scores_in, scores_out)
    return binary_average_precision(scores, target).item()
