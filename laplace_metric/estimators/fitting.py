"""Fitting: the pairwise GGN summed over a loader's batches, in named steps.

:meth:`FitMixin.fit` reads top to bottom: validate the batches and accumulate their signed
curvature (:meth:`~FitMixin._accumulate`), sum it over ``torch.distributed`` ranks
(:meth:`~FitMixin._reduce`), check the result (:meth:`~FitMixin._check_result`), and commit it
with a rollback if deriving the posterior fails (:meth:`~FitMixin._commit`). The running sums
live in one :class:`FitProgress`, so a pass that fails half-way still joins the all-reduce.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from laplace.lllaplace import LLLaplace
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace_metric.curvature.base import BatchCurvature
from laplace_metric.curvature.projection import add_curvature
from laplace_metric.distributed import (
    FitState,
    curvature_tensors,
    is_distributed,
    reduce_fit_state,
)
from laplace_metric.encoders import keeps_module_modes
from laplace_metric.enums import HessianMethod
from laplace_metric.estimators.batches import check_batch, checked_batches, first_batch
from laplace_metric.predictive import check_posterior_memory
from laplace_metric.progress import progress as show_progress


@dataclass
class FitProgress:
    """What one ``fit`` pass has accumulated so far (mutated batch by batch).

    Attributes
    ----------
    curvature : torch.Tensor or laplace.utils.Kron or None
        Signed pairwise curvature summed over the contributing batches.
    loss : torch.Tensor or float
        Summed negative log-likelihood of the mined pairs.
    n_pairs, n_data : int
        Contributing pairs and samples.
    n_candidates : int
        Pairs the batches offered, ``sum_b B_b (B_b - 1) / 2`` (for ``likelihood_scale``).
    n_batches, skipped, single_class : int
        Batches seen, batches without a contributing pair, and single-class batches.
    probe : torch.Tensor, optional
        Inputs of the first batch, to read the embedding dimension at commit.
    """

    curvature: torch.Tensor | Any | None = None
    loss: torch.Tensor | float = 0.0
    n_pairs: int = 0
    n_data: int = 0
    n_candidates: int = 0
    n_batches: int = 0
    skipped: int = 0
    single_class: int = 0
    probe: torch.Tensor | None = None

    @classmethod
    def continuing(cls, estimator: Any) -> FitProgress:
        """Progress seeded with the estimator's current fit (``fit(override=False)``)."""
        return cls(
            estimator.H_signed,
            estimator.loss,
            estimator.n_pairs,
            estimator.n_data,
            estimator.n_candidate_pairs,
        )

    def fit_state(self) -> FitState:
        """The sums that a distributed fit reduces over ranks."""
        return FitState(self.curvature, self.loss, self.n_pairs, self.n_data, self.n_candidates)


#: What a fit sets, restored when committing it fails.
_FIT_ATTRIBUTES = (
    "H_signed",
    "n_pairs",
    "loss",
    "n_data",
    "n_candidate_pairs",
    "n_outputs",
    "mean",
    "H",
    "H_facs",
    "_posterior_scale",
)


class FitMixin:
    """Fitting of the signed pairwise GGN (a base of
    :class:`~laplace_metric.estimators.MetricLaplaceMixin`)."""

    def _batch_curvature(self, x: torch.Tensor, y: torch.Tensor) -> BatchCurvature:
        if hasattr(type(self.backend), "memory_budget"):  # backends that plan by the budget
            self.backend.memory_budget = self.memory_budget
        return getattr(self.backend, self._structure.value)(x, y)

    @keeps_module_modes
    def fit(
        self,
        train_loader: DataLoader | Iterable,
        override: bool = True,
        progress_bar: bool | None = None,
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
        progress_bar : bool, optional
            A tqdm bar over the batches (with their total when the loader has a length).
            ``None`` (default): shown when standard error is a terminal and the fit has run
            a few seconds; ``True``: always; ``False``: never (see
            :mod:`laplace_metric.progress`).
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
        if not override and isinstance(self, LLLaplace):
            raise ValueError("Last-layer Laplace approximations do not support `override=False`.")
        accumulate = not override and self.H_signed is not None
        reduce = is_distributed(distributed)
        # Single process: continue from a previous fit (override=False). Distributed: reduce
        # this rank's contribution alone, and add the previous fit once, after reducing.
        progress = FitProgress.continuing(self) if accumulate and not reduce else FitProgress()
        error: Exception | None = None
        try:
            self._accumulate(train_loader, progress, progress_bar)
        except Exception as err:
            if not reduce:
                raise
            error = err  # join the all-reduce anyway, so that no rank waits forever
        if reduce:
            self._reduce(progress, error, add_previous=accumulate)
        self._check_result(progress)
        self._commit(progress)

    # ------------------------------------------------------------------ steps of fit
    def _validated_batches(
        self, train_loader: DataLoader | Iterable
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """Check the first batch and prepare for it (encoder output, last layer, posterior
        memory); return it and an iterator over all batches, each checked as it is drawn."""
        first, rest = first_batch(train_loader)
        param_dtype = next(self.model.parameters()).dtype
        first = check_batch(first, self._device, param_dtype)
        self._check_output(first[0])
        self.model.eval()
        self._prepare_last_layer(first)
        check_posterior_memory(self.predictive_view())
        return first, checked_batches(first, rest, self._device, param_dtype)

    def _accumulate(
        self,
        train_loader: DataLoader | Iterable,
        progress: FitProgress,
        progress_bar: bool | None,
    ) -> None:
        """Add every batch's signed curvature, loss and counts to ``progress``."""
        first, batches = self._validated_batches(train_loader)
        progress.probe = first[0]
        try:
            total = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        bar = show_progress(
            batches, total=total, desc="Laplace fit", unit="batch", progress_bar=progress_bar
        )
        for x, y in bar:
            self._accumulate_batch(x, y, progress)

    def _accumulate_batch(self, x: torch.Tensor, y: torch.Tensor, progress: FitProgress) -> None:
        """Add one batch; batches without a contributing pair are counted as skipped."""
        progress.n_batches += 1
        progress.n_data += len(y)
        progress.n_candidates += len(y) * (len(y) - 1) // 2
        if len(y) < 2:
            progress.skipped += 1
            return
        if bool((y == y.reshape(-1)[0]).all()):
            progress.single_class += 1
        self.model.zero_grad()
        curvature = self._batch_curvature(x, y)
        progress.loss = progress.loss + curvature.loss
        if curvature.n_pairs == 0:
            progress.skipped += 1
            return
        progress.curvature = add_curvature(progress.curvature, curvature.hessian)
        progress.n_pairs += curvature.n_pairs

    def _reduce(self, progress: FitProgress, error: Exception | None, add_previous: bool) -> None:
        """Sum ``progress`` over all ranks (one all-reduce, raising everywhere if any rank
        failed), then add the previous fit once when continuing it."""
        total, loss, n_pairs, n_data, n_candidates = reduce_fit_state(
            self, progress.fit_state(), error
        )
        if add_previous:
            total = self.H_signed if total is None else add_curvature(self.H_signed, total)
            loss = self.loss + loss
            n_pairs += self.n_pairs
            n_data += self.n_data
            n_candidates += self.n_candidate_pairs
        progress.curvature, progress.loss = total, loss
        progress.n_pairs, progress.n_data = n_pairs, n_data
        progress.n_candidates = n_candidates

    def _check_result(self, progress: FitProgress) -> None:
        """Raise if no pair contributed or the curvature is not finite; warn about skipped
        and single-class batches."""
        n_batches = progress.n_batches
        if progress.n_pairs == 0 or progress.curvature is None:
            raise ValueError(
                f"No pair contributed curvature in {n_batches} batches (hessian_method="
                f"'{self.hessian_method.value}'): batches need at least two samples and, "
                "for 'positives', two samples of one class. Use larger, shuffled batches."
            )
        if progress.skipped:
            warnings.warn(
                f"{progress.skipped} of {n_batches} batches contributed no pair and were skipped.",
                stacklevel=4,  # past fit and keeps_module_modes, to the caller
            )
        if progress.single_class and self.hessian_method != HessianMethod.POSITIVES:
            warnings.warn(
                f"{progress.single_class} of {n_batches} batches had a single class, so no "
                "negative pairs; shuffle the loader so batches mix classes.",
                stacklevel=4,  # past fit and keeps_module_modes, to the caller
            )
        if not all(bool(torch.isfinite(t).all()) for t in curvature_tensors(progress.curvature)):
            raise ValueError(
                "The accumulated curvature contains NaN or inf (overflow of extreme inputs or "
                "weights?); the fit was not updated. Rescale the inputs or fit in float64."
            )

    def _commit(self, progress: FitProgress) -> None:
        """Store the fit and derive the posterior curvature; on failure, restore the previous
        fit (so a failed fit leaves the estimator unchanged)."""
        previous = {k: self.__dict__[k] for k in _FIT_ATTRIBUTES if k in self.__dict__}
        try:
            self.H_signed = progress.curvature
            self.n_pairs = progress.n_pairs
            loss = progress.loss
            self.loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
            self.n_data = progress.n_data
            self.n_candidate_pairs = progress.n_candidates
            with torch.no_grad():
                self.n_outputs = self.model(progress.probe[:1]).shape[-1]
            self.mean = parameters_to_vector(self._posterior_parameters()).detach()
            self._set_posterior_curvature()
        except BaseException:
            self.__dict__.update(previous)
            raise


__all__ = ["FitMixin", "FitProgress"]
