"""Calibration of retrieval: confidence from embedding samples, reliability bins and ECE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from laplace_metric.metrics._base import DistanceFn, _check_scores
from laplace_metric.metrics.retrieval import top1_labels

if TYPE_CHECKING:
    from pytorch_metric_learning.distances import BaseDistance

__all__ = [
    "ReliabilityBins",
    "RetrievalConfidence",
    "reliability_diagram_data",
    "retrieval_confidence_from_samples",
    "retrieval_ece",
]


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
