"""Pairwise likelihoods: the contrastive likelihood (LAM), the Bregman likelihood, and the
factory that builds them from ``laplace.Laplace`` arguments."""

from __future__ import annotations

from typing import Any

from laplace_metric.enums import MetricLikelihood, parse_enum
from laplace_metric.likelihoods.base import GraphTerms, PairLikelihood, PairTerms
from laplace_metric.likelihoods.bregman import BregmanLikelihood as BregmanLikelihood
from laplace_metric.likelihoods.contrastive import ContrastiveLikelihood


def build_likelihood(
    likelihood: str | MetricLikelihood | PairLikelihood,
    divergence: Any | None = None,
    **options: Any,
) -> PairLikelihood:
    """Build a pairwise likelihood from its name and options (or pass an instance through).

    Parameters
    ----------
    likelihood : {'contrastive', 'bregman'} or PairLikelihood
    divergence : BregmanDivergence or nn.Module, optional
        Required for ``'bregman'``, rejected otherwise.
    **options
        ``margin``, ``normalize``, ``hessian_method``, ``miner``. ``margin=None`` means the
        default (1.0), or the instance's margin when ``likelihood`` is an instance.

    Returns
    -------
    likelihood : PairLikelihood

    Raises
    ------
    ValueError
        If ``likelihood`` is an instance and ``margin`` is given and differs from its margin.
    """
    margin = options.pop("margin", None)
    if isinstance(likelihood, PairLikelihood):
        if margin is not None and float(margin) != likelihood.margin:
            raise ValueError(
                f"margin={margin} differs from the margin of the likelihood passed "
                f"({likelihood.margin}); drop margin= (the likelihood's is used) or build the "
                "likelihood with the margin the encoder was trained with."
            )
        return likelihood
    if margin is not None:
        options["margin"] = margin
    name = parse_enum(MetricLikelihood, likelihood, "likelihood")
    if name == MetricLikelihood.CONTRASTIVE:
        if divergence is not None:
            raise ValueError("divergence= is only used with likelihood='bregman'.")
        return ContrastiveLikelihood(**options)
    from laplace_metric.likelihoods.bregman import BregmanLikelihood

    if divergence is None:
        raise ValueError(
            "likelihood='bregman' needs divergence=<a BregmanDivergence or potential>."
        )
    return BregmanLikelihood(divergence, **options)


__all__ = ["GraphTerms", "PairLikelihood", "PairTerms", "ContrastiveLikelihood", "build_likelihood"]
