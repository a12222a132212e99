"""``'variance_ratio'``: the share of the prior's predictive variance that the curvature leaves.

``tr(J Sigma J^T) / tr(J Sigma_0 J^T)`` per query, with ``Sigma`` the fitted posterior
covariance and ``Sigma_0 = diag(1 / prior_precision)`` the prior's (the same estimator with its
curvature off, :func:`~laplace_metric.controls.curvature_off`). The Jacobian's scale, and on the
unit sphere the ``1 / ||g(x)||^2`` factor of the normalisation, cancel: what is left is only what
the training pairs taught the posterior about ``x`` (0: fully constrained, 1: not at all). Its
curvature-off control is 1 for every input, so the score *is* the curvature's contribution: use
it to ask whether the curvature carries any out-of-distribution signal on your data, not as a
replacement for the default score (see ``docs/posterior_controls.rst`` for its measured AUROCs).
All-layer diag and kron posteriors compute both traces from one set of backward passes per
chunk of queries (:func:`~laplace_metric.predictive.layer_path.layer_variances`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from laplace_metric.controls import curvature_off
from laplace_metric.predictive.layer_path import layer_posterior, layer_variances, uses_layer_path
from laplace_metric.scores.base import Score, register_score
from laplace_metric.scores.trace import TraceScore

if TYPE_CHECKING:
    from laplace_metric.scores.scorer import UncertaintyScorer


@register_score("variance_ratio")
class VarianceRatioScore(Score):
    """The ``'trace'`` score of the fitted posterior over that of the prior."""

    def __call__(
        self, scorer: UncertaintyScorer, x: torch.Tensor, sampled: torch.Tensor | None
    ) -> torch.Tensor:
        """``tr(J Sigma J^T) / tr(J Sigma_0 J^T)``, ``(n,)``, in ``(0, 1]`` up to rounding."""
        la = scorer.la
        if math.isinf(la.temperature):  # curvature off: the posterior is the prior, exactly
            return torch.ones(len(x), dtype=la.mean.dtype, device=la.mean.device)
        view = la.predictive_view()
        if uses_layer_path(view, x):  # both posteriors from one set of backward passes
            posterior = layer_posterior(view)
            with curvature_off(la):
                prior_posterior = layer_posterior(la.predictive_view())
            traces = [
                [var.sum(-1) for var in layer_variances(view, c, [posterior, prior_posterior])]
                for c in x.to(view.device).split(scorer.batch_size)
            ]
            fitted, prior = (torch.cat(parts) for parts in zip(*traces))
        else:
            trace = TraceScore()
            fitted = trace(scorer, x, sampled)
            with curvature_off(la):
                prior = trace(scorer, x, sampled)
        return fitted / prior.clamp_min(torch.finfo(prior.dtype).tiny)
