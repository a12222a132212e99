"""The pairwise-likelihood mixin of every laplace-metric estimator.

:class:`MetricLaplaceMixin` holds the configuration (likelihood, backend, memory budget) and
the posterior curvature derived from the signed pairwise GGN. Its jobs come from one base
each: fitting (:mod:`~laplace_metric.estimators.fitting`), prediction
(:mod:`~laplace_metric.estimators.prediction`), prior precision
(:mod:`~laplace_metric.estimators.prior`) and serialisation
(:mod:`~laplace_metric.estimators.serialization`).
"""

from __future__ import annotations

from typing import Any

import torch
from laplace.lllaplace import LLLaplace
from laplace.utils.enums import HessianStructure, Likelihood, SubsetOfWeights
from torch import nn
from torch.nn.utils import parameters_to_vector

from laplace_metric.curvature.base import PairCurvatureInterface
from laplace_metric.curvature.projection import (
    decompose_psd_kron,
    normalise_kron,
    project_psd_diag,
    project_psd_matrix,
)
from laplace_metric.encoders import check_encoder_output, check_input_dtype
from laplace_metric.enums import HessianMethod, LikelihoodScale, parse_enum
from laplace_metric.estimators.fitting import FitMixin
from laplace_metric.estimators.prediction import PredictionMixin
from laplace_metric.estimators.prior import PriorPrecisionMixin
from laplace_metric.estimators.serialization import SerializationMixin
from laplace_metric.estimators.view import predictive_view
from laplace_metric.likelihoods import PairLikelihood, build_likelihood
from laplace_metric.memory import resolve_budget
from laplace_metric.predictive import PredictiveView, check_posterior_memory


class MetricLaplaceMixin(FitMixin, PredictionMixin, PriorPrecisionMixin, SerializationMixin):
    """Pairwise-likelihood behaviour shared by every laplace-metric estimator.

    Parameters
    ----------
    model : torch.nn.Module
        Encoder mapping inputs to embeddings ``(batch, D)``.
    likelihood : {'contrastive', 'bregman'} or PairLikelihood, default='contrastive'
    margin : float, optional
        Hinge margin of negative pairs (on the squared distance for ``'contrastive'``); the
        likelihood's default (1.0) when not given. Use the margin the encoder was trained with:
        pass the likelihood it was trained with (``likelihood=history.likelihood`` from
        :func:`~laplace_metric.baselines.train_encoder`) to take it from there.
    normalize : bool, optional
        L2-normalise embeddings (the posterior is over embeddings on the unit sphere); default
        ``True``.
    hessian_method : {'positives', 'fixed', 'full'}, optional
        How the indefinite pairwise Hessian is made PSD (see :class:`HessianMethod`); default
        ``'positives'``. With a ``PairLikelihood`` instance as ``likelihood``, these three
        options come from the instance; giving a different value raises a ``ValueError``.
    miner : callable, optional
        A pytorch-metric-learning miner; ``None`` uses all pairs of each batch.
    divergence : BregmanDivergence or nn.Module, optional
        The (fixed) convex potential for ``likelihood='bregman'``.
    likelihood_kwargs : dict, optional
        Further likelihood options, e.g. ``{'hessian_point': 'second', 'ordered_pairs': True}``
        for ``'bregman'``.
    backend : type[PairCurvatureInterface], optional
        Curvature backend; ``None`` picks the fastest one that supports the model.
    likelihood_scale : {'batch', 'dataset', 'composite'} or float, default='dataset'
        How many pairs the fitted likelihood stands for (see :class:`LikelihoodScale` and
        ``docs/mathematics.rst``): ``'batch'`` keeps the curvature and loss as summed over the
        pairs the batches offered; ``'dataset'`` rescales both to all ``N (N - 1) / 2`` pairs of
        the fitted data; ``'composite'`` to ``N / 2`` pairs (all pairs, each sample counted
        once); a number rescales them to that many pairs. The marginal likelihood,
        the posterior and the predictive all use the rescaled likelihood
        (:attr:`likelihood_factor`).
    memory_budget : int, float or str, optional
        Bytes (or a size such as ``'8GB'``) that one step of fitting or prediction may
        allocate: a posterior that does not fit raises
        :class:`~laplace_metric.memory.MemoryBudgetError` before anything is allocated, and
        prediction and sampling run in chunks that fit. ``None`` (default): half of the
        free memory, see :func:`laplace_metric.memory.default_budget`.
    **kwargs
        Passed on to the laplace-torch estimator (``prior_precision``, ``temperature``,
        ``last_layer_name``, ``subnetwork_indices``, ...).
    """

    _structure: HessianStructure
    _subset: SubsetOfWeights

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | PairLikelihood = "contrastive",
        *,
        margin: float | None = None,
        normalize: bool | None = None,
        hessian_method: HessianMethod | str | None = None,
        miner: Any | None = None,
        divergence: nn.Module | None = None,
        likelihood_kwargs: dict[str, Any] | None = None,
        backend: type[PairCurvatureInterface] | None = None,
        likelihood_scale: LikelihoodScale | str | float = LikelihoodScale.DATASET,
        memory_budget: int | float | str | None = None,
        **kwargs: Any,
    ) -> None:
        self.memory_budget = memory_budget
        self.likelihood_scale = likelihood_scale
        self.n_candidate_pairs: int = 0
        if kwargs.get("sigma_noise", 1.0) != 1.0:
            raise ValueError("sigma_noise is fixed to 1 for pairwise likelihoods; use temperature.")
        self.pair_likelihood = build_likelihood(
            likelihood,
            margin=margin,
            normalize=normalize,
            hessian_method=hessian_method,
            miner=miner,
            divergence=divergence,
            **(likelihood_kwargs or {}),
        )
        if backend is None:
            from laplace_metric.curvature import default_backend

            backend = default_backend(model, self._structure, last_layer=self._is_last_layer)
        elif not (isinstance(backend, type) and issubclass(backend, PairCurvatureInterface)):
            raise TypeError(
                f"backend must be a pairwise curvature backend (a PairCurvatureInterface "
                f"subclass such as ReferencePairGGN), got {backend!r}. Stock laplace-torch "
                "backends square each sample separately and are wrong for pairwise likelihoods."
            )
        if kwargs.get("last_layer_name") is not None:
            kwargs["last_layer_name"] = resolve_last_layer_name(model, kwargs["last_layer_name"])
        self.H_signed: torch.Tensor | Any | None = None
        self.n_pairs: int = 0
        # laplace-torch only accepts its own likelihoods: initialise as 'classification', then
        # record the real one (every likelihood-dependent path is overridden by the mixins).
        super().__init__(model, Likelihood.CLASSIFICATION.value, backend=backend, **kwargs)
        self.likelihood = self.pair_likelihood.name

    # ------------------------------------------------------------------ plumbing
    @property
    def _is_last_layer(self) -> bool:
        return self._subset == SubsetOfWeights.LAST_LAYER

    @property
    def backend(self) -> PairCurvatureInterface:
        """The pairwise curvature backend, built on first use from ``backend=`` and its kwargs."""
        if self._backend is None:
            self._backend = self._backend_cls(
                self.model, self.pair_likelihood, **self._backend_kwargs
            )
        return self._backend

    @property
    def memory_budget(self) -> int:
        """Bytes that one step of fitting or prediction may allocate (see ``memory_budget=``).

        Set it to a number of bytes, a size string such as ``'8GB'``, or ``None`` for the
        default (half the free memory of the model's device, re-read at each use).
        """
        device = self._device if getattr(self, "model", None) is not None else None
        return resolve_budget(self._memory_budget, device)

    @memory_budget.setter
    def memory_budget(self, value: int | float | str | None) -> None:
        if value is not None:
            resolve_budget(value)  # validate now
        self._memory_budget = value

    @property
    def temperature(self) -> float:
        """laplace-torch's likelihood temperature (the curvature is divided by it); setting it
        drops the cached dense posterior scale, so predictions follow the new value."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = value
        self._posterior_scale = None

    @property
    def likelihood_scale(self) -> LikelihoodScale | float:
        """How many pairs the likelihood stands for: ``'batch'``, ``'dataset'``, ``'composite'``
        or a number."""
        return self._likelihood_scale

    @likelihood_scale.setter
    def likelihood_scale(self, value: LikelihoodScale | str | float) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (value > 0 and value < float("inf")):
                raise ValueError(
                    "likelihood_scale must be 'batch', 'dataset', 'composite' or a positive "
                    f"number of pairs, got {value!r}."
                )
            self._likelihood_scale = float(value)
        else:
            self._likelihood_scale = parse_enum(LikelihoodScale, value, "likelihood_scale")
        self._posterior_scale = None

    @property
    def likelihood_factor(self) -> float:
        """Factor on the summed pair curvature and loss: the pairs the likelihood stands for
        (:attr:`likelihood_scale`) over the pairs the fitted batches offered."""
        scale = self._likelihood_scale
        if scale == LikelihoodScale.BATCH:
            return 1.0
        if self.n_candidate_pairs <= 0:
            raise ValueError(
                f"likelihood_scale={getattr(scale, 'value', scale)!r} needs the number of pairs "
                "the fitted batches offered; it is known after fit() (not after a fit from an "
                "older state_dict or online LAM): use likelihood_scale='batch'."
            )
        return float(self._target_pairs(scale)) / self.n_candidate_pairs

    def _target_pairs(self, scale: LikelihoodScale | float) -> float:
        """The number of pairs ``scale`` stands for, given the fitted ``N``."""
        n = self.n_data
        if scale == LikelihoodScale.DATASET:
            return n * (n - 1) / 2
        if scale == LikelihoodScale.COMPOSITE:
            return n / 2
        return float(scale)

    @property
    def _H_factor(self) -> torch.Tensor:
        """laplace-torch's curvature factor (``1 / temperature``) times the likelihood factor;
        every posterior quantity and the marginal likelihood read it."""
        return super()._H_factor * self.likelihood_factor

    def _init_H(self) -> None:
        """Check the posterior against the memory budget, then let laplace-torch allocate it."""
        check_posterior_memory(self.predictive_view())
        super()._init_H()

    @property
    def hessian_method(self) -> HessianMethod:
        """The PSD method of the pairwise likelihood."""
        return self.pair_likelihood.hessian_method

    def _posterior_parameters(self) -> list[torch.Tensor]:
        if isinstance(self, LLLaplace):
            return list(self.model.last_layer.parameters())
        return self.params

    def predictive_view(self) -> PredictiveView:
        """The frozen view of this estimator that :mod:`laplace_metric.predictive` works on."""
        return predictive_view(self)

    def _check_output(self, x: torch.Tensor) -> None:
        """Check (once per estimator) that the encoder returns one (batch, D) tensor."""
        check_input_dtype(self.model, x)
        if getattr(self, "_output_checked", False):
            return
        last_layer = isinstance(self, LLLaplace)
        encoder = getattr(self.model, "model", self.model) if last_layer else self.model
        name = getattr(self.model, "_last_layer_name", None) if last_layer else None
        check_encoder_output(
            encoder, x[:1].to(self._device), last_layer=last_layer, last_layer_name=name
        )
        self._output_checked = True

    def _check_fitted(self) -> None:
        if self.H_signed is None:
            raise AttributeError("Laplace not fitted. Run fit() first.")

    def _prepare_last_layer(self, batch: Any) -> None:
        """Locate the last layer on the first batch (laplace-torch does this lazily)."""
        if not isinstance(self, LLLaplace) or self.model.last_layer is not None:
            return
        self.data = batch
        self._find_last_layer(batch)
        self.n_params = len(parameters_to_vector(self.model.last_layer.parameters()))
        self.n_layers = len(list(self.model.last_layer.parameters()))
        self.prior_precision = self._prior_precision
        self.prior_mean = self._prior_mean
        self._init_H()

    # ------------------------------------------------------------------ posterior curvature
    def _set_signed_curvature(self, signed: torch.Tensor | Any, n_pairs: int) -> None:
        """Replace the signed curvature (and its pair count) and refresh the posterior."""
        self.H_signed = signed
        self.n_pairs = n_pairs
        self._set_posterior_curvature()

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        """``log det P``; for a dense ``H`` and a scalar prior, from cached eigenvalues of ``H``.

        This makes marginal-likelihood tuning of a scalar prior precision cost one
        eigendecomposition instead of one log-determinant per optimisation step.
        """
        if self._structure != HessianStructure.FULL or self.prior_precision.numel() != 1:
            return super().log_det_posterior_precision
        cached = getattr(self, "_H_eigvals", None)
        if cached is None or cached[0] is not self.H:
            cached = (self.H, torch.linalg.eigvalsh(self.H))
            self._H_eigvals = cached
        return torch.log(self._H_factor * cached[1] + self.prior_precision).sum()

    def _compute_scale(self) -> None:
        """Dense posterior scale, factorised in float64 (then cast) for float32 models."""
        from laplace.utils import invsqrt_precision

        precision = self.posterior_precision
        self._posterior_scale = invsqrt_precision(precision.double()).to(precision.dtype)

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        """Per-input predictive covariance ``J Sigma J^T``; for dense posteriors as
        ``(J S)(J S)^T`` with ``Sigma = S S^T``, so it is PSD to round-off."""
        if self._structure != HessianStructure.FULL:
            return super().functional_variance(Js)
        scaled = Js @ self.posterior_scale
        return scaled @ scaled.transpose(-1, -2)

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        """Joint predictive covariance over a batch ``(batch*D, batch*D)``."""
        if self._structure != HessianStructure.FULL:
            return super().functional_covariance(Js)
        scaled = Js.reshape(-1, Js.shape[-1]) @ self.posterior_scale
        return scaled @ scaled.T

    def _set_posterior_curvature(self) -> None:
        """Derive the PSD curvature ``H`` used by laplace-torch from ``H_signed``."""
        signed = self.H_signed
        keep = self.hessian_method == HessianMethod.POSITIVES
        if self._structure == HessianStructure.KRON:
            kron = normalise_kron(signed, self.n_pairs)
            if keep:
                self.H_facs = kron
                self.H = kron.decompose(damping=self.damping)
            else:  # one eigendecomposition per factor: clipping and decomposing share it
                self.H_facs, self.H = decompose_psd_kron(kron, damping=self.damping)
        elif self._structure == HessianStructure.DIAG:
            self.H = signed.clone() if keep else project_psd_diag(signed)
        else:
            self.H = signed.clone() if keep else project_psd_matrix(signed)
        self._posterior_scale = None


def resolve_last_layer_name(model: nn.Module, name: str) -> str:
    """``name`` as a key of ``model.named_modules()``; the ``'model.'`` prefix that the
    estimator's feature extractor adds (``la.model.named_modules()``) is accepted too."""
    names = dict(model.named_modules())
    if not isinstance(name, str):
        raise TypeError(f"last_layer_name must be a str, got {type(name).__name__}.")
    if name in names:
        return name
    if name.startswith("model.") and name[len("model.") :] in names:
        return name[len("model.") :]
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    raise ValueError(
        f"last_layer_name={name!r} is not a module of the encoder; pass the name of its "
        f"embedding nn.Linear as in encoder.named_modules(), one of {linears}."
    )


__all__ = ["MetricLaplaceMixin", "resolve_last_layer_name"]
