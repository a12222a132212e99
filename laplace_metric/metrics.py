"""Evaluation metrics for (Bayesian) metric learning: retrieval, OOD detection, calibration.

All functions take tensors (embeddings, labels, scores, samples), never an estimator, so they
work for the Laplace posteriors of this package and for any baseline alike.

Conventions
-----------
* Embeddings are ``(n, D)`` float tensors; labels are ``(n,)`` integer tensors.
* Distances default to the Euclidean distance. Any ``distance(query, db) -> (n, m)`` callable
  (smaller = closer) or a pytorch-metric-learning ``BaseDistance`` (which knows whether it is a
  similarity through ``is_inverted``) can replace it.
* OOD scores: higher = more out-of-distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:  # pytorch-metric-learning is imported lazily: it pulls in scipy.stats
    from pytorch_metric_learning.distances import BaseDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

DistanceFn = Callable[[Tensor, Tensor], Tensor]
"""A distance ``distance(query (n, D), db (m, D)) -> (n, m)``; smaller = closer."""

__all__ = [
    "DistanceFn",
    "RetrievalConfidence",
    "ReliabilityBins",
    "SparsificationCurve",
    "recall_at_k",
    "map_at_r",
    "map_at_k",
    "nearest_neighbours",
    "top1_labels",
    "knn_distance_score",
    "ood_auroc",
    "ood_aupr",
    "retrieval_confidence_from_samples",
    "reliability_diagram_data",
    "retrieval_ece",
    "sparsification_curve",
    "sparsification_error_area",
]


# ---------------------------------------------------------------------------- validation
def _check_embeddings(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, D), got {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty.")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values.")
    return x


def _check_labels(labels: Tensor, n: int, name: str) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.ndim != 1:
        raise ValueError(f"{name} must have shape (n,), got {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must hold integer class ids, got dtype {labels.dtype}.")
    if labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but its embeddings have {n} rows.")
    return labels


def _check_scores(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 1:
        raise ValueError(f"{name} must have shape (n,), got {tuple(x.shape)}.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty.")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {x.dtype}.")
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values.")
    return x


def _check_pair(query: Tensor, db: Tensor) -> None:
    if query.shape[1] != db.shape[1]:
        raise ValueError(
            f"Query embeddings have dimension {query.shape[1]} but database embeddings "
            f"have {db.shape[1]}."
        )
    if query.device != db.device:
        raise ValueError(f"Query is on {query.device} but the database is on {db.device}.")


def _check_self(query: Tensor, db: Tensor, exclude_self: bool) -> None:
    if exclude_self and (query.shape != db.shape or not torch.equal(query, db)):
        raise ValueError(
            "exclude_self=True needs the query set to be the database itself "
            "(same tensor values, same order)."
        )


# ---------------------------------------------------------------------------- kNN
class _CallableDistance:
    """Adapter that gives a plain ``distance(query, db)`` callable the interface that
    pytorch-metric-learning's ``CustomKNN`` expects (``is_inverted`` and ``__call__``)."""

    is_inverted = False

    def __init__(self, fn: DistanceFn) -> None:
        self.fn = fn

    def __call__(self, query: Tensor, db: Tensor) -> Tensor:
        mat = self.fn(query, db)
        if not isinstance(mat, Tensor) or mat.shape != (query.shape[0], db.shape[0]):
            got = tuple(mat.shape) if isinstance(mat, Tensor) else type(mat).__name__
            raise ValueError(
                f"distance(query, db) must return a ({query.shape[0]}, {db.shape[0]}) "
                f"tensor, got {got}."
            )
        if not bool(torch.isfinite(mat).all()):
            raise ValueError("distance(query, db) returned NaN or inf values.")
        return mat


def _is_pml_distance(distance: object) -> bool:
    from pytorch_metric_learning.distances import BaseDistance

    return isinstance(distance, BaseDistance)


def _knn_func(distance: DistanceFn | BaseDistance | None) -> CustomKNN:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    if distance is None:
        # pml normalises by default; we measure distances between the embeddings as given.
        distance = LpDistance(normalize_embeddings=False, p=2, power=1)
    elif not _is_pml_distance(distance):
        if not callable(distance):
            raise TypeError(
                f"distance must be a callable or a pml BaseDistance, got {type(distance).__name__}."
            )
        distance = _CallableDistance(distance)
    return CustomKNN(distance)


def _check_k(k: int, n_db: int, exclude_self: bool) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}.")
    available = n_db - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] for a database of {n_db}, got {k}.")
    return k


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


# ---------------------------------------------------------------------------- retrieval
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


def knn_distance_score(
    query_emb: Tensor,
    train_emb: Tensor,
    k: int = 1,
    exclude_self: bool = False,
    distance: DistanceFn | BaseDistance | None = None,
) -> Tensor:
    """Distance from each query to its ``k``-th nearest training embedding (OOD score).

    ``s(q) = d(q, t_(k))`` with ``t_(k)`` the k-th nearest training embedding; the deterministic
    baseline of BRIEF section 6. Higher = more OOD.

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


# ---------------------------------------------------------------------------- OOD detection
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


# ---------------------------------------------------------------------------- calibration
class RetrievalConfidence(NamedTuple):
    """Output of :func:`retrieval_confidence_from_samples`.

    Attributes
    ----------
    confidence : Tensor
        ``(B,)`` fraction of samples agreeing with the mean's top-1 label.
    predicted : Tensor
        ``(B,)`` top-1 label of the mean embedding; ``correct = predicted == query_labels``.
    """

    confidence: Tensor
    predicted: Tensor


def retrieval_confidence_from_samples(
    samples_query: Tensor,
    db_emb: Tensor,
    db_labels: Tensor,
    mean_emb: Tensor | None = None,
    distance: DistanceFn | BaseDistance | None = None,
) -> RetrievalConfidence:
    """Confidence of each query's top-1 retrieval from samples of its embedding.

    ``c_b = 1/S sum_s 1[label(NN(z_b^s)) = label(NN(mean_b))]``: the fraction of the ``S``
    embedding samples whose nearest database neighbour carries the same label as the nearest
    neighbour of the mean embedding.

    Parameters
    ----------
    samples_query : Tensor
        Embedding samples ``(S, B, D)`` (e.g. ``la.predictive_samples(x, n_samples=S)``).
    db_emb : Tensor
        Database embeddings ``(M, D)``.
    db_labels : Tensor
        Database labels ``(M,)``.
    mean_emb : Tensor, optional
        The point embedding ``(B, D)`` used for retrieval; default the sample mean. (For a
        unit-norm database, rescaling the mean does not change its nearest neighbour.)
    distance : callable or pml BaseDistance, optional
        Default Euclidean.

    Returns
    -------
    RetrievalConfidence
        ``(confidence, predicted)``.
    """
    if not isinstance(samples_query, Tensor) or samples_query.ndim != 3:
        got = (
            tuple(samples_query.shape)
            if isinstance(samples_query, Tensor)
            else type(samples_query).__name__
        )
        raise ValueError(f"samples_query must have shape (S, B, D), got {got}.")
    n_samples, batch, dim = samples_query.shape
    if n_samples == 0 or batch == 0:
        raise ValueError(f"samples_query is empty: shape {tuple(samples_query.shape)}.")
    if not bool(torch.isfinite(samples_query).all()):
        raise ValueError("samples_query contains NaN or inf values.")
    if mean_emb is None:
        mean_emb = samples_query.mean(0)
    elif tuple(mean_emb.shape) != (batch, dim):
        raise ValueError(
            f"mean_emb must have shape ({batch}, {dim}) to match samples_query, "
            f"got {tuple(mean_emb.shape)}."
        )
    predicted = top1_labels(mean_emb, db_emb, db_labels, distance=distance)
    sample_labels = top1_labels(
        samples_query.reshape(-1, dim), db_emb, db_labels, distance=distance
    )
    agree = sample_labels.reshape(n_samples, batch) == predicted[None, :]
    return RetrievalConfidence(agree.to(samples_query.dtype).mean(0), predicted)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin data of a reliability diagram (equal-width bins on ``[0, 1]``).

    Attributes
    ----------
    edges : Tensor
        ``(n_bins + 1,)`` bin edges.
    confidence : Tensor
        ``(n_bins,)`` mean confidence per bin (NaN for empty bins).
    accuracy : Tensor
        ``(n_bins,)`` fraction correct per bin (NaN for empty bins).
    count : Tensor
        ``(n_bins,)`` number of queries per bin.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @property
    def ece(self) -> float:
        """``sum_b n_b / N |acc_b - conf_b|`` over the non-empty bins."""
        keep = self.count > 0
        weights = self.count[keep] / self.count.sum()
        return (weights * (self.accuracy[keep] - self.confidence[keep]).abs()).sum().item()


def reliability_diagram_data(
    confidence: Tensor, correct: Tensor, n_bins: int = 10
) -> ReliabilityBins:
    """Bin queries by confidence and report each bin's mean confidence, accuracy and count.

    Bins are ``[i/n, (i+1)/n)`` for ``i < n - 1`` and ``[(n-1)/n, 1]`` for the last one, so a
    confidence of exactly 1 falls in the top bin.

    Parameters
    ----------
    confidence : Tensor
        ``(N,)`` confidences in ``[0, 1]``.
    correct : Tensor
        ``(N,)`` booleans (or 0/1): whether each prediction is correct.
    n_bins : int, default=10

    Returns
    -------
    ReliabilityBins
    """
    _check_scores(confidence, "confidence")
    if not isinstance(correct, Tensor) or correct.shape != confidence.shape:
        got = tuple(correct.shape) if isinstance(correct, Tensor) else type(correct).__name__
        raise ValueError(
            f"correct must have the shape of confidence {tuple(confidence.shape)}, got {got}."
        )
    if not bool(((correct == 0) | (correct == 1)).all()):
        raise ValueError("correct must hold booleans or 0/1 values.")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}.")
    conf = confidence.double()
    if bool(((conf < 0) | (conf > 1)).any()):
        raise ValueError("confidence must lie in [0, 1].")
    acc = correct.to(device=conf.device, dtype=torch.float64)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)
    index = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    count.scatter_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).scatter_add_(0, index, conf)
    acc_sum = torch.zeros_like(count).scatter_add_(0, index, acc)
    empty = count == 0
    nan = torch.full_like(count, math.nan)
    return ReliabilityBins(
        edges=edges,
        confidence=torch.where(empty, nan, conf_sum / count.clamp(min=1)),
        accuracy=torch.where(empty, nan, acc_sum / count.clamp(min=1)),
        count=count.long(),
    )


def retrieval_ece(confidence: Tensor, correct: Tensor, n_bins: int = 10) -> float:
    """Expected calibration error of retrieval.

    ``ECE = sum_b n_b / N |acc_b - conf_b|`` over equal-width confidence bins (see
    :func:`reliability_diagram_data`), with ``acc_b`` the fraction of correct top-1 retrievals
    and ``conf_b`` the mean confidence in bin ``b``. Equal to torchmetrics'
    ``binary_calibration_error(confidence, correct, n_bins, norm='l1')`` except that torchmetrics
    puts confidences of exactly 1 in an extra bin of their own.

    Parameters
    ----------
    confidence : Tensor
        ``(N,)`` in ``[0, 1]``, e.g. from :func:`retrieval_confidence_from_samples`.
    correct : Tensor
        ``(N,)`` booleans: top-1 label equals the query label.
    n_bins : int, default=10

    Returns
    -------
    ece : float
    """
    return reliability_diagram_data(confidence, correct, n_bins).ece


# ---------------------------------------------------------------------------- sparsification
@dataclass(frozen=True)
class SparsificationCurve:
    """Error of the retained queries as the most uncertain ones are removed.

    Attributes
    ----------
    fractions : Tensor
        ``(n_steps,)`` removed fractions ``0, 1/n_steps, ..., (n_steps - 1)/n_steps``.
    error : Tensor
        ``(n_steps,)`` mean error of the retained queries, removing by uncertainty.
    oracle : Tensor
        ``(n_steps,)`` the same, removing by the true error (the best possible ordering).
    """

    fractions: Tensor
    error: Tensor
    oracle: Tensor

    @property
    def area(self) -> float:
        """Area under the curve, ``AUC = int_0^f_max e(f) df`` (trapezoidal rule)."""
        return torch.trapezoid(self.error, self.fractions).item()

    @property
    def oracle_area(self) -> float:
        """Area under the oracle curve."""
        return torch.trapezoid(self.oracle, self.fractions).item()

    @property
    def error_area(self) -> float:
        """Area between curve and oracle, ``AUSE = int (e(f) - e_oracle(f)) df`` (>= 0)."""
        return self.area - self.oracle_area


def _retained_error(order: Tensor, errors: Tensor, fractions: Tensor) -> Tensor:
    # errors sorted from the first-removed to the last-removed query; the retained part of a
    # removal fraction f is the tail of n - floor(f n) queries.
    sorted_err = errors[order]
    n = errors.numel()
    tail_sums = sorted_err.flip(0).cumsum(0).flip(0)  # tail_sums[i] = sum of sorted_err[i:]
    removed = torch.floor(fractions * n).long().clamp(max=n - 1)
    return tail_sums[removed] / (n - removed).to(errors.dtype)


def sparsification_curve(
    uncertainty: Tensor, errors: Tensor, n_steps: int = 20
) -> SparsificationCurve:
    """Sparsification curve and its oracle.

    For a removed fraction ``f``, remove the ``floor(f N)`` queries with the highest
    uncertainty and report the mean error of the rest,
    ``e(f) = 1 / (N - floor(f N)) sum_{i retained} err_i``; with ``err_i = 1 - 1[top-1
    correct]`` this is ``1 - recall@1`` of the retained queries. The oracle removes by the true
    error instead. A good uncertainty gives a decreasing curve close to the oracle; see
    :attr:`SparsificationCurve.error_area` (AUSE) and :attr:`SparsificationCurve.area` (AUC).
    Ties in ``uncertainty`` are broken by query order (stable sort).

    Parameters
    ----------
    uncertainty : Tensor
        ``(N,)`` higher = less certain.
    errors : Tensor
        ``(N,)`` per-query error (e.g. ``~correct``), any non-negative values.
    n_steps : int, default=20
        Number of removal fractions ``0, 1/n_steps, ..., (n_steps - 1)/n_steps``.

    Returns
    -------
    SparsificationCurve
    """
    _check_scores(uncertainty, "uncertainty")
    _check_scores(errors, "errors")
    if errors.shape != uncertainty.shape:
        raise ValueError(
            f"errors {tuple(errors.shape)} and uncertainty {tuple(uncertainty.shape)} must match."
        )
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}.")
    err = errors.double().cpu()
    if bool((err < 0).any()):
        raise ValueError("errors must be non-negative.")
    unc = uncertainty.double().cpu()
    fractions = torch.arange(n_steps, dtype=torch.float64) / n_steps
    by_uncertainty = torch.sort(unc, descending=True, stable=True).indices
    by_error = torch.sort(err, descending=True, stable=True).indices
    return SparsificationCurve(
        fractions=fractions,
        error=_retained_error(by_uncertainty, err, fractions),
        oracle=_retained_error(by_error, err, fractions),
    )


def sparsification_error_area(uncertainty: Tensor, errors: Tensor, n_steps: int = 20) -> float:
    """Area between the sparsification curve and its oracle (AUSE; lower is better).

    ``AUSE = int_0^f_max (e(f) - e_oracle(f)) df`` with the trapezoidal rule on the grid of
    :func:`sparsification_curve`.

    Parameters
    ----------
    uncertainty : Tensor
        ``(N,)``.
    errors : Tensor
        ``(N,)``.
    n_steps : int, default=20

    Returns
    -------
    ause : float
    """
    return sparsification_curve(uncertainty, errors, n_steps).error_area
