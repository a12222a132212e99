"""``'knn_variance_ratio'``: the default score weighted by what the curvature left of the prior.

``posterior_knn(x) * variance_ratio(x)``: the posterior-averaged distance to the nearest
database embedding, multiplied by the share of the prior's linearised predictive variance that
the fitted curvature leaves for ``x`` (0: the training pairs fully constrain ``x``'s
embedding, 1: not at all). The first factor measures how far a query is from the data under
weight noise; the second, which directions of weight space the data pinned down, and so it uses
the posterior covariance's shape, not only its scale. With the curvature off the ratio is 1 and
the score is ``'posterior_knn'`` itself: its curvature-off control is the default score's.

It costs the default score plus the ratio's linearised passes (one backward pass per embedding
dimension and query chunk for all-layer posteriors; closed form for last-layer ones; measured
per query on all-layer diag posteriors 1.31x on ResNet-18 and 1.96x at the ViT-Tiny size,
``benchmarks/score_costs.py``). Measured beside its controls (``docs/posterior_controls.rst``),
with the all-layer diag posterior on FashionMNIST -> MNIST: ahead of its curvature-off control
and of tuned isotropic noise on OOD AUROC at D = 3, level with both at D = 32. It flags wrong
retrievals worse than ``'posterior_knn'`` (AUSE) and gains nothing with last-layer posteriors,
so it is not the default: choose it on validation data.
"""

from __future__ import annotations

from laplace_metric.scores.base import ProductScore, register_score


@register_score("knn_variance_ratio")
class KNNVarianceRatioScore(ProductScore):
    """``'posterior_knn'`` times ``'variance_ratio'``, from the scorer's shared samples."""

    needs_samples = True
    needs_database = True
    factors = ("posterior_knn", "variance_ratio")
