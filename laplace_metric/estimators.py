"""laplace-torch estimators for pairwise (metric-learning) likelihoods.

One mixin, :class:`MetricLaplaceMixin`, adapts laplace-torch's parametric estimators to the
pairwise likelihoods: it fits the signed pairwise GGN from mined pairs, projects it to PSD, and
predicts embedding means and covariances (never a softmax). The concrete classes combine it
with the stock ``(subset_of_weights, hessian_structure)`` classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import torch
from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.lllaplace import DiagLLLaplace, FullLLLaplace, KronLLLaplace, LLLaplace
from laplace.subnetlaplace import DiagSubnetLaplace, FullSubnetLaplace
from laplace.utils.enums import (
    HessianStructure,
    Likelihood,
    PredType,
    SubsetOfWeights,
    TuningMethod,
)
from torch import nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace_metric.curvature.base import BatchCurvature, PairCurvatureInterface
from laplace_metric.curvature.projection import (
    add_curvature,
    normalise_kron,
    project_psd_diag,
    project_psd_kron,
    project_psd_matrix,
)
from laplace_metric.distributed import (
    FitState,
    curvature_tensors,
    is_distributed,
    reduce_fit_state,
)
from laplace_metric.encoders import check_encoder_output, check_input_dtype, keeps_module_modes
from laplace_metric.enums import HessianMethod, UncertaintyScore, parse_enum
from laplace_metric.likelihoods import PairLikelihood, build_likelihood
from laplace_metric.memory import dtype_bytes, resolve_budget
from laplace_metric.mining import check_labels
from laplace_metric.predictive import (
    check_posterior_memory,
    draw_weight_samples,
    glm_chunks,
    glm_joint,
    iter_query_chunks,
    nn_embedding_samples,
)
from laplace_metric.sampling import gaussian_samples, project_to_sphere
from laplace_metric.uncertainty import uncertainty_score
from laplace_metric.validation import PositivePairGaussianNLL


def check_inputs(x: Any) -> None:
    """Raise a clear error for non-finite input tensors."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("The input batch contains NaN or inf values.")


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a loader batch into inputs and class labels."""
    if isinstance(batch, MutableMapping):
        raise TypeError(
            "Pairwise likelihoods take (inputs, labels) batches; dict-like batches are not supported."
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("Each batch must be a pair (inputs, class_labels).")
    return batch[0], batch[1]


class MetricLaplaceMixin:
    """Pairwise-likelihood behaviour shared by every laplace-metric estimator.

    Parameters
    ----------
    model : torch.nn.Module
        Encoder mapping inputs to embeddings ``(batch, D)``.
    likelihood : {'contrastive', 'bregman'} or PairLikelihood, default='contrastive'
    margin : float, default=1.0
        Hinge margin of negative pairs (on the squared distance for ``'contrastive'``).
    normalize : bool, default=True
        L2-normalise embeddings (the posterior is over embeddings on the unit sphere).
    hessian_method : {'positives', 'fixed', 'full'}, default='positives'
        How the indefinite pairwise Hessian is made PSD (see :class:`HessianMethod`).
    miner : callable, optional
        A pytorch-metric-learning miner; ``None`` uses all pairs of each batch.
    divergence : BregmanDivergence or nn.Module, optional
        The (fixed) convex potential for ``likelihood='bregman'``.
    likelihood_kwargs : dict, optional
        Further likelihood options, e.g. ``{'hessian_point': 'second', 'ordered_pairs': True}``
        for ``'bregman'``.
    backend : type[PairCurvatureInterface], optional
        Curvature backend; ``None`` picks the fastest one that supports the model.
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
        margin: float = 1.0,
        normalize: bool = True,
        hessian_method: HessianMethod | str = HessianMethod.POSITIVES,
        miner: Any | None = None,
        divergence: nn.Module | None = None,
        likelihood_kwargs: dict[str, Any] | None = None,
        backend: type[PairCurvatureInterface] | None = None,
        memory_budget: int | float | str | None = None,
        **kwargs: Any,
    ) -> None:
        self.memory_budget = memory_budget
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
        self.H_signed: torch.Tensor | Any | None = None
        self.n_pairs: int = 0
        # laplace-torch only accepts its own likelihoods: initialise as 'classification', then
        # record the real one (every likelihood-dependent path is overridden below).
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

    def _init_H(self) -> None:
        """Check the posterior against the memory budget, then let laplace-torch allocate it."""
        check_posterior_memory(self)
        super()._init_H()

    @property
    def hessian_method(self) -> HessianMethod:
        """The PSD method of the pairwise likelihood."""
        return self.pair_likelihood.hessian_method

    def _posterior_parameters(self) -> list[torch.Tensor]:
        if isinstance(self, LLLaplace):
            return list(self.model.last_layer.parameters())
        return self.params

    def _check_output(self, x: torch.Tensor) -> None:
        """Check (once per estimator) that the encoder returns one (batch, D) tensor."""
        check_input_dtype(self.model, x)
        if getattr(self, "_output_checked", False):
            return
        last_layer = isinstance(self, LLLaplace)
        encoder = getattr(self.model, "model", self.model) if last_layer else self.model
        check_encoder_output(encoder, x[:1].to(self._device), last_layer=last_layer)
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

    # ------------------------------------------------------------------ fitting
    def _batch_curvature(self, x: torch.Tensor, y: torch.Tensor) -> BatchCurvature:
        return getattr(self.backend, self._structure.value)(x, y)

    @keeps_module_modes
    def fit(
        self,
        train_loader: DataLoader | Iterable,
        override: bool = True,
        progress_bar: bool = False,
        distributed: bool | None = None,
    ) -> None:
        """Fit the Laplace approximation at the current weights from mined pairs.

        Parameters
        ----------
        train_loader : torch.utils.data.DataLoader
            Batches ``(inputs, class_labels)``. Pairs are mined inside each batch, so batches
            should mix classes (shuffle the loader). Inputs are moved to the model's device.
        override : bool, default=True
            Start afresh. ``False`` adds the new data's curvature to the current fit (not for
            last-layer Laplace); the result equals one fit over both loaders.
        progress_bar : bool, default=False
            Show a tqdm progress bar over the batches.
        distributed : bool, optional
            Sum the curvature, loss and counts over all ``torch.distributed`` ranks, each
            fitting its own shard, with one all-reduce (see :mod:`laplace_metric.distributed`).
            ``None`` (default) does so when a process group with several ranks is
            initialised; ``False`` fits this rank's data alone.

        Raises
        ------
        ValueError
            If the loader is empty, a batch is malformed or non-finite, or no pair
            contributes curvature. A failed fit leaves the estimator unchanged.
        TypeError
            If the loader is not iterable, a batch is not two tensors, the labels are not
            integers, or the inputs' dtype differs from the model's.
        """
        import tqdm

        if not override and isinstance(self, LLLaplace):
            raise ValueError("Last-layer Laplace approximations do not support `override=False`.")
        accumulate = not override and self.H_signed is not None
        reduce = is_distributed(distributed)
        # Single process: continue from a previous fit (override=False). Distributed: reduce
        # this rank's contribution alone, and add the previous fit once, after reducing.
        seed_previous = accumulate and not reduce
        total = self.H_signed if seed_previous else None
        loss = self.loss if seed_previous else 0.0
        n_pairs = self.n_pairs if seed_previous else 0
        n_data = self.n_data if seed_previous else 0
        skipped, single_class, n_batches = 0, 0, 0
        error: Exception | None = None
        try:
            try:
                batches = iter(train_loader)
            except TypeError:
                raise TypeError(
                    "train_loader must be an iterable of (inputs, class_labels) batches, got "
                    f"{type(train_loader).__name__}."
                ) from None
            try:
                first = next(batches)
            except StopIteration:
                raise ValueError("The training loader is empty; nothing to fit.") from None
            param_dtype = next(self.model.parameters()).dtype

            def checked(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                x, y = unpack_batch(batch)
                if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                    raise TypeError(
                        "Each batch must be a pair of tensors (inputs, class_labels), got "
                        f"({type(x).__name__}, {type(y).__name__})."
                    )
                if x.ndim == 0:
                    raise ValueError("Batch inputs need a batch dimension, got a 0-d tensor.")
                x, y = x.to(self._device), y.to(self._device)
                y = check_labels(y, x.shape[0])
                if (
                    x.is_floating_point()
                    and param_dtype.is_floating_point
                    and x.dtype != param_dtype
                ):
                    raise TypeError(
                        f"The inputs have dtype {x.dtype} but the model's parameters have dtype "
                        f"{param_dtype}; cast the data or the model so that they match."
                    )
                check_inputs(x)
                return x, y

            first = checked(first)
            self._check_output(first[0])
            self.model.eval()
            self._prepare_last_layer(first)
            check_posterior_memory(self)

            def all_batches():
                yield first
                for batch in batches:
                    yield checked(batch)

            for x, y in tqdm.tqdm(all_batches(), disable=not progress_bar, desc="[Pairwise GGN]"):
                n_batches += 1
                n_data += len(y)
                if len(y) < 2:
                    skipped += 1
                    continue
                if bool((y == y.reshape(-1)[0]).all()):
                    single_class += 1
                self.model.zero_grad()
                curvature = self._batch_curvature(x, y)
                loss = loss + curvature.loss
                if curvature.n_pairs == 0:
                    skipped += 1
                    continue
                total = add_curvature(total, curvature.hessian)
                n_pairs += curvature.n_pairs
        except Exception as err:
            if not reduce:
                raise
            error = err  # join the all-reduce anyway, so that no rank waits forever
        if reduce:
            total, loss, n_pairs, n_data = reduce_fit_state(
                self, FitState(total, loss, n_pairs, n_data), error
            )
            if accumulate:
                total = self.H_signed if total is None else add_curvature(self.H_signed, total)
                loss = self.loss + loss
                n_pairs += self.n_pairs
                n_data += self.n_data

        if n_pairs == 0 or total is None:
            raise ValueError(
                f"No pair contributed curvature in {n_batches} batches (hessian_method="
                f"'{self.hessian_method.value}'): batches need at least two samples and, "
                "for 'positives', two samples of one class. Use larger, shuffled batches."
            )
        if skipped:
            warnings.warn(
                f"{skipped} of {n_batches} batches contributed no pair and were skipped.",
                stacklevel=3,  # past keeps_module_modes, to the caller
            )
        if single_class and self.hessian_method != HessianMethod.POSITIVES:
            warnings.warn(
                f"{single_class} of {n_batches} batches had a single class, so no negative "
                "pairs; shuffle the loader so batches mix classes.",
                stacklevel=3,  # past keeps_module_modes, to the caller
            )
        if not all(bool(torch.isfinite(t).all()) for t in curvature_tensors(total)):
            raise ValueError(
                "The accumulated curvature contains NaN or inf (overflow of extreme inputs or "
                "weights?); the fit was not updated. Rescale the inputs or fit in float64."
            )

        # commit only now, so that a failed fit leaves a previous fit untouched; roll back if
        # deriving the posterior curvature fails
        kept = ("H_signed", "n_pairs", "loss", "n_data", "n_outputs", "mean", "H", "H_facs")
        previous = {k: self.__dict__[k] for k in (*kept, "_posterior_scale") if k in self.__dict__}
        try:
            self.H_signed = total
            self.n_pairs = n_pairs
            self.loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
            self.n_data = n_data
            with torch.no_grad():
                self.n_outputs = self.model(first[0][:1]).shape[-1]
            self.mean = parameters_to_vector(self._posterior_parameters()).detach()
            self._set_posterior_curvature()
        except BaseException:
            self.__dict__.update(previous)
            raise

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
            self.H_facs = kron if keep else project_psd_kron(kron)
            self.H = self.H_facs.decompose(damping=self.damping)
        elif self._structure == HessianStructure.DIAG:
            self.H = signed.clone() if keep else project_psd_diag(signed)
        else:
            self.H = signed.clone() if keep else project_psd_matrix(signed)
        self._posterior_scale = None

    # ------------------------------------------------------------------ prediction
    def _glm_predictive_distribution(
        self,
        X: torch.Tensor,
        joint: bool = False,
        diagonal_output: bool = False,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Linearised predictive, in memory-bounded chunks (see :mod:`laplace_metric.predictive`)."""
        self._check_fitted()
        X = X.to(self._device)
        check_inputs(X)
        if joint:
            return glm_joint(self, X)
        means, covs = zip(*glm_chunks(self, X, diagonal_output, batch_size))
        return torch.cat(means), torch.cat(covs)

    @keeps_module_modes
    def __call__(
        self,
        x: torch.Tensor,
        pred_type: PredType | str = PredType.GLM,
        joint: bool = False,
        link_approx: Any = None,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        batch_size: int | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictive distribution of the embedding.

        Parameters
        ----------
        x : torch.Tensor
            Inputs ``(batch, ...)``.
        pred_type : {'glm', 'nn'}, default='glm'
            ``'glm'``: linearised predictive, mean ``z(x)`` and covariance ``J Sigma J^T`` of
            the (normalised) embedding. ``'nn'``: Monte-Carlo over weight samples, the mean
            and covariance of the sampled (normalised) embeddings.
        joint : bool, default=False
            ``'glm'`` only: the joint ``(batch*D, batch*D)`` covariance.
        link_approx : ignored
            Accepted for laplace-torch compatibility; embeddings have no link function.
        n_samples : int, default=100
            Weight samples for ``'nn'``.
        diagonal_output : bool, default=False
            Return per-dimension variances ``(batch, D)`` instead of ``(batch, D, D)``.
        generator : torch.Generator, optional
        batch_size : int, optional
            Queries per chunk. ``None``: as many as fit ``memory_budget``. Results do not
            depend on it.

        Returns
        -------
        mean : torch.Tensor
            ``(batch, D)`` (flattened ``(batch*D,)`` when ``joint``).
        covariance : torch.Tensor
            ``(batch, D, D)``, ``(batch, D)`` or ``(batch*D, batch*D)``.

        Raises
        ------
        MemoryBudgetError
            If one query (or the joint covariance) does not fit ``memory_budget``.
        """
        self._check_output(x)
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        if pred_type == PredType.GP:
            raise ValueError("pred_type='gp' is not available; use 'glm' or 'nn'.")
        if pred_type == PredType.GLM:
            return self._glm_predictive_distribution(
                x, joint=joint, diagonal_output=diagonal_output, batch_size=batch_size
            )
        if joint:
            raise ValueError("joint=True is only available for pred_type='glm'.")
        samples = self._nn_embedding_samples(x, n_samples, generator, batch_size)
        return _sample_moments(samples, diagonal_output)

    def _check_generator(self, generator: torch.Generator | None) -> None:
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device != self._device
        ):
            raise ValueError("Invalid random generator (check type and device).")

    def _nn_embedding_samples(
        self,
        x: torch.Tensor,
        n_samples: int,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        weights: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Embeddings under weight samples; a last-layer posterior runs its backbone once."""
        self._check_fitted()
        self._check_generator(generator)
        x = x.to(self._device)
        check_inputs(x)
        return nn_embedding_samples(self, x, n_samples, generator, batch_size, weights)

    def functional_samples(
        self,
        x: torch.Tensor,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Samples ``(n_samples, batch, D)`` of the embedding before projecting to the sphere.

        ``'glm'`` draws from the linearised Gaussian; ``'nn'`` pushes weight samples through
        the network (already normalised when the likelihood normalises). ``batch_size``:
        queries per chunk of the predictive (``None``: fit ``memory_budget``).
        """
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        if pred_type == PredType.NN:
            return self._nn_embedding_samples(x, n_samples, generator, batch_size)
        self._check_generator(generator)
        f_mu, f_var = self._glm_predictive_distribution(
            x, diagonal_output=diagonal_output, batch_size=batch_size
        )
        return gaussian_samples(f_mu, f_var, n_samples, generator)

    @keeps_module_modes
    def predictive_samples(
        self,
        x: torch.Tensor,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Embedding samples ``(n_samples, batch, D)``, on the unit sphere when normalising."""
        self._check_output(x)
        samples = self.functional_samples(
            x, pred_type, n_samples, diagonal_output, generator, batch_size
        )
        return project_to_sphere(samples) if self.pair_likelihood.normalize else samples

    @keeps_module_modes
    def predictive_uncertainty(
        self,
        x: torch.Tensor,
        score: UncertaintyScore | str = UncertaintyScore.TRACE,
        pred_type: PredType | str = PredType.GLM,
        n_samples: int = 100,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A scalar uncertainty per input (higher = less certain), e.g. for OOD detection.

        Parameters
        ----------
        x : torch.Tensor
        score : {'trace', 'std_sum', 'logdet'}, default='trace'
            See :func:`laplace_metric.uncertainty.uncertainty_score`.
        pred_type : {'glm', 'nn'}, default='glm'
        n_samples : int, default=100
        batch_size : int, optional
            Queries per chunk (``None``: as many as fit ``memory_budget``); the scores do not
            depend on it (for ``'nn'``, every chunk uses the same weight samples).
        generator : torch.Generator, optional
            For ``'nn'``.

        Returns
        -------
        scores : torch.Tensor
            ``(batch,)``.
        """
        self._check_output(x)
        score = parse_enum(UncertaintyScore, score, "score")
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        diagonal = score != UncertaintyScore.LOGDET
        if pred_type == PredType.GLM:
            self._check_fitted()
            x = x.to(self._device)
            check_inputs(x)
            return torch.cat(
                [
                    uncertainty_score(cov, score)
                    for _, cov in glm_chunks(self, x, diagonal, batch_size)
                ]
            )
        if pred_type != PredType.NN:
            raise ValueError("pred_type='gp' is not available; use 'glm' or 'nn'.")
        self._check_fitted()
        self._check_generator(generator)
        weights = draw_weight_samples(self, n_samples, generator)
        D = int(self.n_outputs)
        per_query = (2 * n_samples * D + D * D) * dtype_bytes(self._dtype)
        scores = []
        for chunk in iter_query_chunks(self, x, batch_size, per_query):
            samples = self._nn_embedding_samples(chunk, n_samples, None, batch_size, weights)
            scores.append(uncertainty_score(_sample_moments(samples, diagonal)[1], score))
        return torch.cat(scores)

    # ------------------------------------------------------------------ prior precision
    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GLM,
        method: TuningMethod | str = TuningMethod.MARGLIK,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | torch.Tensor = 1.0,
        prior_structure: Any = "scalar",
        val_loader: DataLoader | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: Any = "mc",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Tune the prior precision by marginal likelihood or grid search.

        ``method='marglik'`` maximises the Laplace log marginal likelihood built on the
        pairwise negative log-likelihood. ``method='gridsearch'`` minimises a validation
        objective ``loss(means, covariances, labels)`` over ``val_loader``; the default is
        :class:`laplace_metric.validation.PositivePairGaussianNLL`, the Gaussian negative
        log-likelihood of the difference of positive validation pairs under the predictive.
        """
        self._check_fitted()
        method = parse_enum(TuningMethod, method, "method")
        if method == TuningMethod.GRIDSEARCH and loss is None:
            loss = PositivePairGaussianNLL()
        super().optimize_prior_precision(
            pred_type=pred_type,
            method=method,
            n_steps=n_steps,
            lr=lr,
            init_prior_prec=init_prior_prec,
            prior_structure=prior_structure,
            val_loader=val_loader,
            loss=loss,
            log_prior_prec_min=log_prior_prec_min,
            log_prior_prec_max=log_prior_prec_max,
            grid_size=grid_size,
            link_approx=link_approx,
            n_samples=n_samples,
            verbose=verbose,
            progress_bar=progress_bar,
            log_prior_prec_base=log_prior_prec_base,
        )

    def _gridsearch(
        self,
        loss: Callable,
        interval: torch.Tensor,
        val_loader: DataLoader,
        pred_type: PredType | str,
        link_approx: Any = None,
        n_samples: int = 100,
        progress_bar: bool = False,
    ) -> torch.Tensor:
        import tqdm

        if not callable(loss):
            raise TypeError("loss must be a callable loss(means, covariances, labels) -> scalar.")
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        cached = []
        if pred_type == PredType.GLM:  # Jacobians do not depend on the prior: compute once
            for batch in val_loader:
                x, y = unpack_batch(batch)
                x = x.to(self._device)
                check_inputs(x)
                Js, f_mu = self.backend.jacobians(x)
                cached.append((Js, f_mu, y.to(self._device)))
        results = []
        for prior_prec in tqdm.tqdm(interval, disable=not progress_bar, desc="[Grid search]"):
            self.prior_precision = prior_prec
            means, covs, labels = [], [], []
            try:
                if cached:
                    for Js, f_mu, y in cached:
                        means.append(f_mu)
                        covs.append(self.functional_variance(Js))
                        labels.append(y)
                else:
                    for batch in val_loader:
                        x, y = unpack_batch(batch)
                        mean, cov = self(x, pred_type=pred_type, n_samples=n_samples)
                        means.append(mean)
                        covs.append(cov)
                        labels.append(y.to(self._device))
                value = float(loss(torch.cat(means), torch.cat(covs), torch.cat(labels)))
            except (torch.linalg.LinAlgError, RuntimeError):
                value = float("inf")
            results.append(value if value == value else float("inf"))
        best = int(torch.tensor(results).argmin())
        return interval[best]

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        """Serialisable state; loadable with ``torch.load(..., weights_only=True)``.

        As in laplace-torch, the state holds the posterior (mean, curvature, prior), *not* the
        encoder: save the encoder's own ``state_dict`` beside it, and load it into the encoder
        before :meth:`load_state_dict`, which checks that the weights equal the fitted mean.
        """
        self._check_fitted()
        state = super().state_dict()
        state["likelihood"] = str(self.pair_likelihood.name)
        state["likelihood_config"] = self.pair_likelihood.config()
        state["likelihood_state"] = self.pair_likelihood.state_dict()
        signed = self.H_signed
        state["H_signed"] = signed.kfacs if self._structure == HessianStructure.KRON else signed
        state["n_pairs"] = int(self.n_pairs)
        return state

    def load_state_dict(self, state_dict: dict[str, Any], check_weights: bool = True) -> None:
        """Restore a fit saved by :meth:`state_dict` into an estimator of the same configuration.

        Parameters
        ----------
        state_dict : dict
        check_weights : bool, default=True
            Check that the model's current weights (those the posterior covers) equal the
            saved posterior mean, and raise a ``ValueError`` otherwise: the state does not hold
            the encoder, so a freshly built encoder would predict with wrong means. Restore::

                encoder.load_state_dict(torch.load("encoder.pt", weights_only=True))
                la = Laplace(encoder, "contrastive", ...)   # same configuration
                la.load_state_dict(torch.load("la.pt", weights_only=True))
        """
        saved = state_dict.get("likelihood_config")
        if saved is None:
            raise ValueError("This state_dict was not written by a laplace-metric estimator.")
        if state_dict.get("cls_name") != type(self).__name__:
            raise ValueError(
                f"This state_dict was saved from a {state_dict.get('cls_name')} and cannot be "
                f"loaded into a {type(self).__name__}: use the same subset_of_weights and "
                "hessian_structure."
            )
        current = self.pair_likelihood.config()
        if saved != current:
            diff = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current)}
            diff = {k: v for k, v in diff.items() if v[0] != v[1]}
            raise ValueError(f"Likelihood configuration differs from the saved one: {diff}.")
        previous = dict(self.__dict__)
        super().load_state_dict(state_dict)
        if check_weights:
            current = parameters_to_vector(self._posterior_parameters()).detach()
            saved_mean = self.mean.to(current)
            if current.shape != saved_mean.shape or not torch.allclose(
                current, saved_mean, rtol=1e-6, atol=1e-8
            ):
                self.__dict__.update(previous)
                gap = (
                    f"max abs difference {float((current - saved_mean).abs().max()):.3g}"
                    if current.shape == saved_mean.shape
                    else f"{current.numel()} vs {saved_mean.numel()} parameters"
                )
                raise ValueError(
                    "The model's current weights differ from the posterior mean saved in this "
                    f"state_dict ({gap}). A laplace-metric state_dict holds the posterior, not "
                    "the encoder (as in laplace-torch): load the encoder's weights first, "
                    "encoder.load_state_dict(torch.load('encoder.pt')), then build the "
                    "estimator on it and load this state_dict (check_weights=False skips "
                    "this check and keeps the model's weights)."
                )
        self.pair_likelihood.load_state_dict(state_dict.get("likelihood_state", {}))
        signed = state_dict["H_signed"]
        if self._structure == HessianStructure.KRON:
            from laplace.utils import Kron

            signed = Kron(signed)
        self.H_signed = signed
        self.n_pairs = int(state_dict["n_pairs"])
        self._set_posterior_curvature()


def _sample_moments(
    samples: torch.Tensor, diagonal_output: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, D)`` and unbiased covariance ``(B, D, D)`` (or variances) of samples."""
    n_samples = samples.shape[0]
    mean = samples.mean(0)
    centred = samples - mean
    dof = max(n_samples - 1, 1)
    if diagonal_output:
        return mean, centred.square().sum(0) / dof
    return mean, torch.einsum("sbd,sbe->bde", centred, centred) / dof


def _plugin_key(subset: SubsetOfWeights, structure: HessianStructure) -> tuple[str, str, str]:
    # A 3-tuple never equals the (subset, structure) 2-tuples of laplace.Laplace's lookup.
    return ("laplace_metric", subset.value, structure.value)


class MetricDiagLaplace(MetricLaplaceMixin, DiagLaplace):
    """All-weights Laplace with a diagonal pairwise GGN."""

    _subset, _structure = SubsetOfWeights.ALL, HessianStructure.DIAG
    _key = _plugin_key(_subset, _structure)


class MetricKronLaplace(MetricLaplaceMixin, KronLaplace):
    """All-weights Laplace with a Kronecker-factored pairwise GGN."""

    _subset, _structure = SubsetOfWeights.ALL, HessianStructure.KRON
    _key = _plugin_key(_subset, _structure)


class MetricFullLaplace(MetricLaplaceMixin, FullLaplace):
    """All-weights Laplace with a dense pairwise GGN."""

    _subset, _structure = SubsetOfWeights.ALL, HessianStructure.FULL
    _key = _plugin_key(_subset, _structure)


class MetricDiagLLLaplace(MetricLaplaceMixin, DiagLLLaplace):
    """Last-layer Laplace with a diagonal pairwise GGN."""

    _subset, _structure = SubsetOfWeights.LAST_LAYER, HessianStructure.DIAG
    _key = _plugin_key(_subset, _structure)


class MetricKronLLLaplace(MetricLaplaceMixin, KronLLLaplace):
    """Last-layer Laplace with a Kronecker-factored pairwise GGN."""

    _subset, _structure = SubsetOfWeights.LAST_LAYER, HessianStructure.KRON
    _key = _plugin_key(_subset, _structure)


class MetricFullLLLaplace(MetricLaplaceMixin, FullLLLaplace):
    """Last-layer Laplace with a dense pairwise GGN."""

    _subset, _structure = SubsetOfWeights.LAST_LAYER, HessianStructure.FULL
    _key = _plugin_key(_subset, _structure)


class MetricDiagSubnetLaplace(MetricLaplaceMixin, DiagSubnetLaplace):
    """Subnetwork Laplace with a diagonal pairwise GGN."""

    _subset, _structure = SubsetOfWeights.SUBNETWORK, HessianStructure.DIAG
    _key = _plugin_key(_subset, _structure)


class MetricFullSubnetLaplace(MetricLaplaceMixin, FullSubnetLaplace):
    """Subnetwork Laplace with a dense pairwise GGN."""

    _subset, _structure = SubsetOfWeights.SUBNETWORK, HessianStructure.FULL
    _key = _plugin_key(_subset, _structure)


#: ``(subset_of_weights, hessian_structure) -> estimator class``.
ESTIMATORS: dict[tuple[SubsetOfWeights, HessianStructure], type[MetricLaplaceMixin]] = {
    (cls._subset, cls._structure): cls
    for cls in (
        MetricDiagLaplace,
        MetricKronLaplace,
        MetricFullLaplace,
        MetricDiagLLLaplace,
        MetricKronLLLaplace,
        MetricFullLLLaplace,
        MetricDiagSubnetLaplace,
        MetricFullSubnetLaplace,
    )
}

__all__ = [
    "MetricLaplaceMixin",
    "ESTIMATORS",
    "MetricDiagLaplace",
    "MetricKronLaplace",
    "MetricFullLaplace",
    "MetricDiagLLLaplace",
    "MetricKronLLLaplace",
    "MetricFullLLLaplace",
    "MetricDiagSubnetLaplace",
    "MetricFullSubnetLaplace",
]
