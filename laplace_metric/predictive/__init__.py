"""Memory-planned prediction and sampling for the laplace-metric estimators.

Every function works on a :class:`PredictiveView`, the frozen view an estimator hands over
(``la.predictive_view()``; passing the estimator itself also works), and never reads the
estimator's private state, so this package imports nothing from
:mod:`laplace_metric.estimators`.

Three jobs, one module each, all used by :class:`laplace_metric.estimators.MetricLaplaceMixin`:

* **Posterior size checks** (:mod:`~laplace_metric.predictive.sizes`,
  :func:`check_posterior_memory`): before a dense ``P x P`` curvature is allocated, compare
  its size with the estimator's ``memory_budget`` and name the structures and subsets that
  would fit.
* **The GLM predictive in chunks** (:mod:`~laplace_metric.predictive.glm`,
  :func:`glm_chunks`): queries are processed in chunks whose working memory fits the budget.
  For a last-layer posterior over an ``nn.Linear`` head, ``J Sigma J^T`` is computed from the
  head's input features without forming the ``D x P`` Jacobian (the formulas are in the
  module); all-layer diag and kron posteriors go layer by layer
  (:mod:`~laplace_metric.predictive.layer_path`), the variances alone without ``D x D``
  products.
* **Posterior embeddings with a frozen backbone** (:mod:`~laplace_metric.predictive.samples`,
  :class:`PosteriorEmbedder`): for a last-layer posterior the backbone runs once per input;
  each weight sample only re-runs the head on the cached features.
* **Head samples on cached features** (:mod:`~laplace_metric.predictive.heads`,
  :class:`HeadSamples`): weight samples of a Linear head (Laplace or dropout), one matrix
  product per sample.
"""

from __future__ import annotations

from laplace_metric.memory import MemoryBudgetError
from laplace_metric.predictive.glm import JACOBIAN_COPIES as JACOBIAN_COPIES
from laplace_metric.predictive.glm import KRON_JACOBIAN_COPIES as KRON_JACOBIAN_COPIES
from laplace_metric.predictive.glm import (
    glm_bytes_per_query,
    glm_chunks,
    glm_joint,
    jacobian_glm,
    jacobian_glm_diagonal,
    linear_head,
    structured_glm,
)
from laplace_metric.predictive.heads import (
    HeadSamples,
    dropout_head_samples,
    head_features,
    laplace_head_samples,
)
from laplace_metric.predictive.samples import FORWARD_BATCH_SIZE as FORWARD_BATCH_SIZE
from laplace_metric.predictive.samples import (
    PosteriorEmbedder,
    draw_weight_samples,
    knn_and_top1,
    nearest,
    nn_embedding_samples,
)
from laplace_metric.predictive.samples import iter_query_chunks as iter_query_chunks
from laplace_metric.predictive.sizes import FULL_COPIES as FULL_COPIES
from laplace_metric.predictive.sizes import check_posterior_memory, structure_bytes
from laplace_metric.predictive.view import PosteriorOps, PredictiveView, as_view

__all__ = [
    "HeadSamples",
    "MemoryBudgetError",
    "PosteriorEmbedder",
    "PosteriorOps",
    "PredictiveView",
    "as_view",
    "check_posterior_memory",
    "glm_bytes_per_query",
    "glm_chunks",
    "glm_joint",
    "knn_and_top1",
    "nearest",
    "jacobian_glm",
    "jacobian_glm_diagonal",
    "linear_head",
    "draw_weight_samples",
    "dropout_head_samples",
    "head_features",
    "laplace_head_samples",
    "nn_embedding_samples",
    "structure_bytes",
    "structured_glm",
]
