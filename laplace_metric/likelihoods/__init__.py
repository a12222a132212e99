"""Pairwise likelihoods: the contrastive likelihood (LAM), the Bregman likelihood, and the
factory that builds them from ``laplace.Laplace`` arguments."""

from __future__ import annotations

from typing import Any

from laplace_metric.enums import MetricLikelihood, parse_enum
from laplace_metric.likelihoods.base import PairLikelihood
from laplace_metric.likelihoods.bregman import BregmanLikelihood as BregmanLikelihood
from laplace_metric.likelihoods.contrastive import ContrastiveLikelihood
from laplace_metric.pairs.terms import GraphTerms, PairTerms


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
        ``margin``, ``normalize``, ``hessian_method``, ``miner``; options that are ``None``
        take the likelihood's default. With a ``PairLikelihood`` instance, an option that
        differs from the instance's own value raises a ``ValueError`` (it would be ignored).

    Returns
    -------
    likelihood : PairLikelihood

    Raises
    ------
    ValueError
        If ``likelihood`` is an instance and an option is given that differs from its own.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if isinstance(likelihood, PairLikelihood):
        _check_instance_options(likelihood, options)
        return likelihood
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


def _check_instance_options(likelihood: PairLikelihood, options: dict[str, Any]) -> None:
    """Raise if an option given beside a likelihood instance differs from the instance's."""
    config = likelihood.config()
    ignored = []
    for key, value in options.items():
        current = getattr(likelihood, key, config.get(key))
        given = getattr(value, "value", value)
        if getattr(current, "value", current) != given:
            ignored.append(
                f"{key}={given!r} (the instance has {getattr(current, 'value', current)!r})"
            )
    if ignored:
        raise ValueError(
            f"likelihood is a {type(likelihood).__name__} instance, so its own options apply and "
            f"{', '.join(ignored)} would be ignored: set them on the instance, e.g. "
            f"{type(likelihood).__name__}(margin=..., hessian_method=...), or pass "
            "likelihood='contrastive' with the options."
        )


__all__ = ["GraphTerms", "PairLikelihood", "PairTerms", "ContrastiveLikelihood", "build_likelihood"]
