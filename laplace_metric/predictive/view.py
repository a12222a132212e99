"""The frozen view of a fitted estimator that prediction works on.

The estimator hands prediction code a :class:`PredictiveView` (its
``predictive_view()`` method): the model, likelihood, backend and posterior structure as plain
fields, and the posterior's public operations (mean, samples, factors, functional variance)
through :class:`PosteriorOps`. Prediction code never reads the estimator's private state and
imports nothing from :mod:`laplace_metric.estimators`; the pipeline runs one way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from laplace.utils.enums import HessianStructure, SubsetOfWeights
from torch import nn

__all__ = ["PosteriorOps", "PredictiveView", "as_view"]


class PosteriorOps(Protocol):
    """The public posterior operations of a laplace-torch estimator that prediction uses."""

    mean: torch.Tensor

    @property
    def posterior_variance(self) -> Any:
        """The variance factor of a diagonal posterior."""

    @property
    def posterior_precision(self) -> Any:
        """The posterior precision (Kronecker-decomposed for ``kron``)."""

    @property
    def posterior_scale(self) -> torch.Tensor:
        """``S`` with ``Sigma = S S^T``."""

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Any:
        """``n_samples`` weight vectors."""

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        """``J Sigma J^T`` per query."""

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        """The joint ``J Sigma J^T``."""


@dataclass(frozen=True)
class PredictiveView:
    """What prediction needs from a fitted estimator, frozen at the time of the call.

    Attributes
    ----------
    model : nn.Module
        The estimator's model (a feature extractor for last-layer posteriors).
    likelihood : PairLikelihood
        Its pairwise likelihood (``embed``, ``normalize``).
    get_backend : callable
        Returns its curvature backend (made on first use), also as :attr:`backend`.
    structure : HessianStructure
    subset : SubsetOfWeights
    dtype : torch.dtype
    device : torch.device
    memory_budget : int
        Bytes, resolved when the view was made.
    n_outputs : int or None
        Embedding dimension ``D`` (``None`` before fitting).
    n_params : int or None
        Posterior parameters (``None`` before fitting).
    enable_backprop : bool
    last_layer, subnetwork : bool
        Whether the posterior is a last-layer or a subnetwork one.
    params : list of Tensor
        The parameters of an all-layer posterior (laplace-torch's ``params``).
    posterior : PosteriorOps
        The posterior's public operations (the estimator itself).
    check_fitted : callable
        Raises a clear error when the estimator is not fitted.
    posterior_parameters : callable
        The parameters the posterior is over, in the posterior's order.
    cache : dict
        Kept by the estimator across views (the layer-wise predictor, made once).
    """

    model: nn.Module
    likelihood: Any
    get_backend: Callable[[], Any]
    structure: HessianStructure
    subset: SubsetOfWeights
    dtype: torch.dtype
    device: torch.device
    memory_budget: int
    n_outputs: int | None
    n_params: int | None
    enable_backprop: bool
    last_layer: bool
    subnetwork: bool
    params: list
    posterior: PosteriorOps
    check_fitted: Callable[[], None]
    posterior_parameters: Callable[[], list]
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def backend(self) -> Any:
        """The curvature backend (Jacobians, layer-wise predictive covariance)."""
        return self.get_backend()

    @property
    def mean(self) -> torch.Tensor:
        """The posterior mean (a weight vector)."""
        return self.posterior.mean

    @property
    def posterior_variance(self) -> Any:
        """The posterior's variance factor (diagonal posteriors)."""
        return self.posterior.posterior_variance

    @property
    def posterior_precision(self) -> Any:
        """The posterior precision (Kronecker-decomposed for ``kron``)."""
        return self.posterior.posterior_precision

    @property
    def posterior_scale(self) -> torch.Tensor:
        """``S`` with ``Sigma = S S^T`` (dense posteriors)."""
        return self.posterior.posterior_scale

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Any:
        """``n_samples`` weight vectors from the posterior."""
        return self.posterior.sample(n_samples, generator)

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        """``J Sigma J^T`` per query from Jacobians ``(B, D, P)``."""
        return self.posterior.functional_variance(Js)

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        """The joint ``J Sigma J^T`` from Jacobians ``(B, D, P)``."""
        return self.posterior.functional_covariance(Js)


def as_view(la: Any) -> PredictiveView:
    """``la`` itself if it is a :class:`PredictiveView`, else ``la.predictive_view()``."""
    if isinstance(la, PredictiveView):
        return la
    make = getattr(la, "predictive_view", None)
    if make is None:
        raise TypeError(
            f"Prediction needs a laplace-metric estimator or a PredictiveView, got "
            f"{type(la).__name__}; build one with laplace_metric.metric_laplace(...)."
        )
    return make()
