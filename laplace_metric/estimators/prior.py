"""Prior precision: marginal-likelihood or grid-search tuning on pairwise objectives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from laplace import KronLaplace, LLLaplace
from laplace.utils.enums import PredType, PriorStructure, TuningMethod
from torch.utils.data import DataLoader

from laplace_metric.enums import parse_enum
from laplace_metric.estimators.batches import check_inputs, unpack_batch
from laplace_metric.metrics.pair_nll import PositivePairGaussianNLL
from laplace_metric.progress import progress as show_progress
from laplace_metric.progress import progress_enabled


class PriorPrecisionMixin:
    """Prior-precision tuning (a base of
    :class:`~laplace_metric.estimators.MetricLaplaceMixin`)."""

    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GLM,
        method: TuningMethod | str = TuningMethod.MARGLIK,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | torch.Tensor = 1.0,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR,
        val_loader: DataLoader | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: Any = "mc",
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool | None = None,
        log_prior_prec_base: float = 10.0,
    ) -> None:
        """Tune the prior precision by marginal likelihood or grid search.

        ``method='marglik'`` maximises the Laplace log marginal likelihood built on the
        pairwise negative log-likelihood. ``method='gridsearch'`` minimises a validation
        objective ``loss(means, covariances, labels)`` over ``val_loader``; the default is
        :class:`laplace_metric.metrics.PositivePairGaussianNLL`, the Gaussian negative
        log-likelihood of the difference of positive validation pairs under the predictive.

        ``progress_bar``: a bar over the optimisation steps or grid points; ``None`` (default)
        shows it when standard error is a terminal, ``False`` never (see
        :mod:`laplace_metric.progress`). ``prior_structure``: ``'scalar'`` (default), ``'layerwise'``
        (one precision per parameter tensor; not for last-layer estimators) or ``'diag'`` (one per
        weight; not for Kronecker posteriors), as laplace-torch allows them. The other
        parameters are laplace-torch's.
        """
        self._check_fitted()
        method = parse_enum(TuningMethod, method, "method")
        prior_structure = parse_enum(PriorStructure, prior_structure, "prior_structure")
        self._check_prior_structure(prior_structure)
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
            progress_bar=progress_enabled(progress_bar),
            log_prior_prec_base=log_prior_prec_base,
        )

    def _check_prior_structure(self, prior_structure: PriorStructure) -> None:
        """Refuse, before any work, the prior structures laplace-torch cannot hold here."""
        name = type(self).__name__
        if prior_structure == PriorStructure.LAYERWISE and isinstance(self, LLLaplace):
            raise ValueError(
                f"prior_structure='layerwise' is not available for the last-layer estimator {name} "
                "(laplace-torch's last-layer posteriors take a 'scalar' or 'diag' prior); use "
                "subset_of_weights='all' for one prior precision per layer."
            )
        if prior_structure == PriorStructure.DIAG and isinstance(self, KronLaplace):
            raise ValueError(
                f"prior_structure='diag' is not available for the Kronecker posterior {name} (its "
                "prior must keep the Kronecker structure: 'scalar' or, for all-layer estimators, "
                "'layerwise'); use hessian_structure='diag' or 'full' for one precision per weight."
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
        grid = show_progress(interval, desc="Prior grid search", progress_bar=progress_bar)
        for prior_prec in grid:
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


__all__ = ["PriorPrecisionMixin"]
