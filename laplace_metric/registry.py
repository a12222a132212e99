"""Routing ``laplace.Laplace(..., likelihood='contrastive' | 'bregman')`` to the plugin estimators.

laplace-torch's factory only knows its own likelihoods. :func:`install` wraps it once (in
``laplace`` and ``laplace.laplace``): the pairwise likelihoods go to
:data:`laplace_metric.estimators.ESTIMATORS`; every other call is passed to the stock factory
unchanged.

A ``from laplace import Laplace`` executed *before* ``import laplace_metric`` (as isort orders
imports) keeps the stock function. So that it works too, ``BaseLaplace`` gets a ``__new__`` that
swaps a stock class for its plugin twin when, and only when, the likelihood is a pairwise one
(a call the stock class would reject); every other construction is untouched.
"""

from __future__ import annotations

import functools
from typing import Any

import laplace
import laplace.laplace as laplace_module
from laplace.baselaplace import BaseLaplace
from laplace.utils.enums import HessianStructure, Likelihood, SubsetOfWeights
from torch import nn

from laplace_metric.enums import MetricLikelihood, parse_enum
from laplace_metric.estimators import ESTIMATORS, MetricLaplaceMixin
from laplace_metric.likelihoods import PairLikelihood

_WRAPPED_FLAG = "_laplace_metric_wrapper"


def is_metric_likelihood(likelihood: Any) -> bool:
    """Whether ``likelihood`` names (or is) a pairwise likelihood of this package."""
    if isinstance(likelihood, PairLikelihood):
        return True
    return isinstance(likelihood, str) and likelihood in {m.value for m in MetricLikelihood}


def check_likelihood_name(likelihood: Any) -> None:
    """Raise a ``ValueError`` listing every option when a likelihood *name* is neither
    laplace-torch's nor this package's (valid names and objects pass untouched)."""
    name = getattr(likelihood, "value", likelihood)
    if not isinstance(name, str):
        return
    stock = [item.value for item in Likelihood]
    ours = [item.value for item in MetricLikelihood]
    if name in stock or name in ours:
        return
    import difflib

    close = difflib.get_close_matches(name, stock + ours, n=1)
    hint = f" Did you mean likelihood={close[0]!r}?" if close else ""
    raise ValueError(
        f"Invalid likelihood type {name!r}.{hint} Choose one of {ours} (pairwise, "
        f"laplace-metric) or {stock} (laplace-torch)."
    )


def _unsupported(subset: SubsetOfWeights | str, structure: HessianStructure | str) -> ValueError:
    supported = ", ".join(f"({s.value!r}, {h.value!r})" for s, h in ESTIMATORS)
    return ValueError(
        f"subset_of_weights={getattr(subset, 'value', subset)!r} with hessian_structure="
        f"{getattr(structure, 'value', structure)!r} is not supported for pairwise likelihoods; "
        f"supported: {supported}."
    )


def plugin_class(stock_cls: type) -> type[MetricLaplaceMixin]:
    """The plugin estimator with the same ``(subset_of_weights, hessian_structure)`` as ``stock_cls``."""
    key = getattr(stock_cls, "_key", None)
    for (subset, structure), cls in ESTIMATORS.items():
        if key == (subset.value, structure.value):
            return cls
    raise _unsupported(*(key or ("?", "?")))


def _routing_new(cls: type, *args: Any, **kwargs: Any) -> Any:
    likelihood = args[1] if len(args) > 1 else kwargs.get("likelihood")
    if is_metric_likelihood(likelihood) and not issubclass(cls, MetricLaplaceMixin):
        cls = plugin_class(cls)
    return object.__new__(cls)


def metric_laplace(
    model: nn.Module,
    likelihood: str | PairLikelihood,
    subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.LAST_LAYER,
    hessian_structure: HessianStructure | str = HessianStructure.KRON,
    **kwargs: Any,
) -> Any:
    """Build the laplace-metric estimator for a pairwise likelihood.

    Parameters
    ----------
    model : torch.nn.Module
        The encoder.
    likelihood : {'contrastive', 'bregman'} or PairLikelihood
    subset_of_weights : {'all', 'last_layer', 'subnetwork'}, default='last_layer'
    hessian_structure : {'diag', 'kron', 'full'}, default='kron'
    **kwargs
        Estimator options (see :class:`laplace_metric.estimators.MetricLaplaceMixin`).

    Returns
    -------
    laplace : MetricLaplaceMixin
    """
    subset = parse_enum(SubsetOfWeights, subset_of_weights, "subset_of_weights")
    structure = parse_enum(HessianStructure, hessian_structure, "hessian_structure")
    try:
        cls = ESTIMATORS[(subset, structure)]
    except KeyError:
        raise _unsupported(subset, structure) from None
    return cls(model, likelihood, **kwargs)


def install() -> None:
    """Wrap ``laplace.Laplace`` so it routes pairwise likelihoods here (idempotent)."""
    if "__new__" not in BaseLaplace.__dict__:
        BaseLaplace.__new__ = _routing_new
    current = laplace_module.Laplace
    if getattr(current, _WRAPPED_FLAG, False):
        laplace.Laplace = current
        return
    stock = current

    @functools.wraps(stock)
    def Laplace(  # noqa: N802 - mirrors laplace.Laplace
        model: nn.Module,
        likelihood: Any,
        subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.LAST_LAYER,
        hessian_structure: HessianStructure | str = HessianStructure.KRON,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        check_likelihood_name(likelihood)
        if is_metric_likelihood(likelihood):
            if args:
                raise TypeError(
                    "Pass estimator options by keyword for pairwise likelihoods, "
                    f"got {len(args)} extra positional arguments."
                )
            return metric_laplace(model, likelihood, subset_of_weights, hessian_structure, **kwargs)
        return stock(model, likelihood, subset_of_weights, hessian_structure, *args, **kwargs)

    setattr(Laplace, _WRAPPED_FLAG, True)
    Laplace.stock = stock
    laplace_module.Laplace = Laplace
    laplace.Laplace = Laplace
