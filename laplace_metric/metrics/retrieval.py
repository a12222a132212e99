"""Retrieval metrics: nearest neighbours, recall@k, MAP@R and MAP@k.

Embeddings are ``(n, D)`` float tensors, labels ``(n,)`` integer tensors. Distances default to
the Euclidean distance; any ``distance(query, db) -> (n, m)`` callable (smaller = closer) or a
pytorch-metric-learning ``BaseDistance`` can replace it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from laplace_metric.metrics._base import (
    DistanceFn,
    _check_embeddings,
    _check_k,
    _check_labels,
    _check_pair,
    _check_self,
    _knn_func,
)

if TYPE_CHECKING:
    from pytorch_metric_learning.distances import BaseDistance

__all__ = ["map_at_k", "map_at_r", "nearest_neighbours", "recall_at_k", "top1_labels"]


def nearest_neighbours(
    query_emb: Tensor,
    db_emb: Tensor,
    k: int,
    exclude_self: bool = False,
    distance: DistanceFn | BaseDistance | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest database entries of every query (pml ``CustomKNN``).

    Parameters
    ----------
    query_emb : Tensor
        Query embeddings ``(n, D)``.
    db_emb : Tensor
        Database embeddings ``(m, D)``.
    k : int
        Number of neighbours.
    exclude_self : bool, default=False
        The query set is the database: do not return a query as its own neighbour.
    distance : callable or pml BaseDistance, optional
        ``distance(query, db) -> (n, m)`` (smaller = closer); default Euclidean.

    Returns
    -------
    distances : Tensor
        ``(n, k)``, sorted from nearest (values of ``distance``; similarities for an inverted pml
        distance).
    indices : Tensor
        ``(n, k)`` indices into the database.
    """
    _check_embeddings(query_emb, "query_emb")
    _check_embeddings(db_emb, "db_emb")
    _check_pair(query_emb, db_emb)
    _check_self(query_emb, db_emb, exclude_self)
    k = _check_k(k, db_emb.shape[0], exclude_self)
    return _knn_func(distance)(query_emb, k, db_emb, exclude_self)


def top1_labels(
    query_emb: Tensor,
    db_emb: Tensor,
    db_labels: Tensor,
    exclude_self: bool = False,
    distance: DistanceFn | BaseDistance | None = None,
) -> Tensor:
    """Label of each query's nearest database entry, ``(n,)``.

    Parameters
    ----------
    query_emb, db_emb : Tensor
        Embeddings ``(n, D)`` and ``(m, D)``.
    db_labels : Tensor
        Database labels ``(m,)``.
    exclude_self : bool, default=False
        The query set is the database (see :func:`nearest_neighbours`).
    distance : callable or pml BaseDistance, optional
        Default Euclidean.

    Returns
    -------
    labels : Tensor
    """
    _check_labels(db_labels, db_emb.shape[0], "db_labels")
    _, idx = nearest_neighbours(query_emb, db_emb, 1, exclude_self, distance)
    return db_labels.to(idx.device)[idx[:, 0]]


def recall_at_k(
    query_emb: Tensor,
    query_labels: Tensor,
    db_emb: Tensor,
    db_labels: Tensor,
    k: int = 1,
    exclude_self: bool = False,
    distance: DistanceFn | BaseDistance | None = None,
) -> float:
    """Recall@k: fraction of queries with at least one same-class item among their k nearest.

    ``R@k = 1/n sum_q 1[exists j in kNN(q): y_j = y_q]``. For ``k = 1`` this is pml's
    ``precision_at_1`` (top-1 retrieval accuracy), except that queries whose class is absent
    from the database count as failures here.

    Parameters
    ----------
    query_emb : Tensor
        Query embeddings ``(n, D)``.
    query_labels : Tensor
        Query labels ``(n,)``.
    db_emb : Tensor
        Database embeddings ``(m, D)``.
    db_labels : Tensor
        Database labels ``(m,)``.
    k : int, default=1
    exclude_self : bool, default=False
        The query set is the database (leave-one-out retrieval).
    distance : callable or pml BaseDistance, optional
        ``distance(query, db) -> (n, m)``; default Euclidean.

    Returns
    -------
    recall : float
    """
    _check_labels(query_labels, query_emb.shape[0], "query_labels")
    _check_labels(db_labels, db_emb.shape[0], "db_labels")
    _, idx = nearest_neighbours(query_emb, db_emb, k, exclude_self, distance)
    knn_labels = db_labels.to(idx.device)[idx]
    hit = (knn_labels == query_labels.to(idx.device)[:, None]).any(dim=1)
    return hit.double().mean().item()


def _pml_accuracy(
    metric: str,
    k: int | str,
    query_emb: Tensor,
    query_labels: Tensor,
    db_emb: Tensor,
    db_labels: Tensor,
    exclude_self: bool,
    distance: DistanceFn | BaseDistance | None,
) -> float:
    _check_embeddings(query_emb, "query_emb")
    _check_embeddings(db_emb, "db_emb")
    _check_pair(query_emb, db_emb)
    _check_labels(query_labels, query_emb.shape[0], "query_labels")
    _check_labels(db_labels, db_emb.shape[0], "db_labels")
    _check_self(query_emb, db_emb, exclude_self)
    db_labels = db_labels.to(query_labels.device)
    counts = (query_labels[:, None] == db_labels[None, :]).sum(1) - int(exclude_self)
    if not bool((counts > 0).any()):
        raise ValueError("No query has a same-class item in the database; the metric is undefined.")
    # imported here: it pulls in scikit-learn's metrics (seconds of import time)
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(
        include=(metric,), k=k, knn_func=_knn_func(distance), device=query_emb.device
    )
    result = calc.get_accuracy(
        query_emb, query_labels, db_emb, db_labels, ref_includes_query=exclude_self
    )
    return float(result[metric])


def map_at_r(
    query_emb: Tensor,
    query_labels: Tensor,
    db_emb: Tensor,
    db_labels: Tensor,
    exclude_self: bool = False,
    distance: DistanceFn | BaseDistance | None = None,
) -> float:
    """Mean average precision at R (Musgrave et al., 2020), via pml's ``AccuracyCalculator``.

    For a query with ``R`` same-class database items,
    ``MAP@R = 1/R sum_{i=1}^{R} P(i) 1[item i is relevant]`` with ``P(i)`` the precision of the
    top ``i``; averaged over queries. Queries whose class is absent from the database are
    skipped (pml's convention).

    Parameters
    ----------
    query_emb, query_labels, db_emb, db_labels : Tensor
        As in :func:`recall_at_k`.
    exclude_self : bool, default=False
    distance : callable or pml BaseDistance, optional

    Returns
    -------
    map_at_r : float
    """
    return _pml_accuracy(
        "mean_average_precision_at_r",
        "max_bin_count",
        query_emb,
        query_labels,
        db_emb,
        db_labels,
        exclude_self,
        distance,
    )


def map_at_k(
    query_emb: Tensor,
    query_labels: Tensor,
    db_emb: Tensor,
    db_labels: Tensor,
    k: int,
    exclude_self: bool = False,
    distance: DistanceFn | BaseDistance | None = None,
) -> float:
    """Mean average precision over the top ``k`` (pml's ``mean_average_precision`` with ``k``).

    ``MAP@k = 1/R sum_{i=1}^{k} P(i) 1[item i is relevant]``, with ``R`` the total number of
    same-class items in the database (pml divides by ``R``, not by ``min(k, R)``), averaged over
    queries whose class occurs in the database.

    Parameters
    ----------
    query_emb, query_labels, db_emb, db_labels : Tensor
        As in :func:`recall_at_k`.
    k : int
    exclude_self : bool, default=False
    distance : callable or pml BaseDistance, optional

    Returns
    -------
    map_at_k : float
    """
    _check_k(k, db_emb.shape[0], exclude_self)
    return _pml_accuracy(
        "mean_average_precision",
        k,
        query_emb,
        query_labels,
        db_emb,
        db_labels,
        exclude_self,
        distance,
    )


def truncated_map_at_k(
    query_emb: Tensor, query_labels: Tensor, db_emb: Tensor, db_labels: Tensor, k: int = 5
) -> float:
    """mAP@k normalised by ``min(k, R)`` (the information-retrieval convention), Euclidean.

    ``AP@k(q) = 1 / min(k, R_q) sum_{i <= k} P(i) rel(i)`` with ``R_q`` the number of
    same-class database items, averaged over queries whose class occurs in the database.
    pytorch-metric-learning's ``mean_average_precision`` (and :func:`map_at_k`) divide by
    ``R_q`` instead, which caps the value at ``k / R_q``; LAM's reported mAP@5 is on this
    truncated scale.

    Parameters
    ----------
    query_emb, query_labels, db_emb, db_labels : Tensor
        As in :func:`recall_at_k`.
    k : int, default=5

    Returns
    -------
    truncated_map_at_k : float
    """
    import torch

    _check_k(k, db_emb.shape[0], False)
    index = torch.cdist(query_emb, db_emb).topk(k, largest=False).indices
    rel = (db_labels[index] == query_labels[:, None]).double()
    precision = rel.cumsum(1) / torch.arange(1, k + 1, dtype=torch.float64, device=rel.device)
    n_rel = (db_labels[None, :] == query_labels[:, None]).sum(1).clamp(max=k).double()
    keep = n_rel > 0
    return float(((precision * rel).sum(1)[keep] / n_rel[keep]).mean())
