"""Evaluation metrics for (Bayesian) metric learning, one module per family.

All functions take tensors (embeddings, labels, scores, samples), never an estimator, so they
work for the Laplace posteriors of this package and for any baseline alike.

Conventions
-----------
* Embeddings are ``(n, D)`` float tensors; labels are ``(n,)`` integer tensors.
* Distances default to the Euclidean distance. Any ``distance(query, db) -> (n, m)`` callable
  (smaller = closer) or a pytorch-metric-learning ``BaseDistance`` (which knows whether it is a
  similarity through ``is_inverted``) can replace it.
* OOD scores: higher = more out-of-distribution.

Families
--------
* :mod:`~laplace_metric.metrics.retrieval`: nearest neighbours, recall@k, MAP@R, MAP@k,
  truncated mAP@k.
* :mod:`~laplace_metric.metrics.ood`: the kNN-distance score, AUROC and AUPR.
* :mod:`~laplace_metric.metrics.calibration`: retrieval confidence, reliability bins, ECE.
* :mod:`~laplace_metric.metrics.sparsification`: sparsification curves and AUSE.
* :mod:`~laplace_metric.metrics.pair_nll`: the positive-pair Gaussian NLL of the predictive
  (the prior-precision objective of a grid search).

Every public name is re-exported here (``from laplace_metric.metrics import recall_at_k``).
"""

from laplace_metric.metrics._base import DistanceFn
from laplace_metric.metrics.calibration import (
    ReliabilityBins,
    RetrievalConfidence,
    reliability_diagram_data,
    retrieval_confidence_from_samples,
    retrieval_ece,
)
from laplace_metric.metrics.ood import knn_distance_score, ood_aupr, ood_auroc
from laplace_metric.metrics.pair_nll import PositivePairGaussianNLL
from laplace_metric.metrics.retrieval import (
    map_at_k,
    map_at_r,
    nearest_neighbours,
    recall_at_k,
    top1_labels,
    truncated_map_at_k,
)
from laplace_metric.metrics.sparsification import (
    SparsificationCurve,
    sparsification_curve,
    sparsification_error_area,
)

__all__ = [
    "DistanceFn",
    "PositivePairGaussianNLL",
    "RetrievalConfidence",
    "ReliabilityBins",
    "SparsificationCurve",
    "recall_at_k",
    "map_at_r",
    "map_at_k",
    "truncated_map_at_k",
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
