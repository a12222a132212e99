"""The estimator's side of the one-way pipeline: its frozen :class:`PredictiveView`."""

from __future__ import annotations

from typing import Any

from laplace.baselaplace import BaseLaplace
from laplace.lllaplace import LLLaplace
from laplace.subnetlaplace import SubnetLaplace

from laplace_metric.predictive.view import PredictiveView

__all__ = ["predictive_view"]


def predictive_view(la: Any) -> PredictiveView:
    """The frozen view of ``la`` that :mod:`laplace_metric.predictive` works on.

    The layer-wise predictor cache lives on the estimator, so views share it.
    """
    if not isinstance(la, BaseLaplace):
        raise TypeError(f"predictive_view needs a laplace-torch estimator, got {type(la)}.")
    return PredictiveView(
        model=la.model,
        likelihood=la.pair_likelihood,
        get_backend=lambda: la.backend,
        structure=la._structure,
        subset=la._subset,
        dtype=la._dtype,
        device=la._device,
        memory_budget=la.memory_budget,
        n_outputs=getattr(la, "n_outputs", None),
        n_params=getattr(la, "n_params", None),
        enable_backprop=la.enable_backprop,
        last_layer=isinstance(la, LLLaplace),
        subnetwork=isinstance(la, SubnetLaplace),
        params=getattr(la, "params", []),
        posterior=la,
        check_fitted=la._check_fitted,
        posterior_parameters=la._posterior_parameters,
        cache=la.__dict__.setdefault("_predictive_cache", {}),
    )
