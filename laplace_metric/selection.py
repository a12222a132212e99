"""Choose the posterior configuration on validation data, each beside its curvature-off control.

Which posterior earns its keep depends on the data (``docs/posterior_controls.rst``): on LAM's
CNN the all-layer diagonal posterior beats its curvature-off control with a 3-d embedding and
loses with a 32-d one, where a last-layer Kronecker posterior at the ``'composite'`` scale wins.
:func:`select_posterior` fits every candidate :class:`PosteriorConfig`, scores validation queries
against a database (the training set) with the default score, and keeps the candidate with the
best validation criterion. Every candidate is also scored with its curvature off
(:func:`laplace_metric.controls.curvature_off`), so the report says whether the curvature helps
on this data. Test and OOD data never enter the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from laplace_metric.controls import curvature_off
from laplace_metric.enums import LikelihoodScale, SelectionCriterion, parse_enum
from laplace_metric.metrics import ood_auroc, retrieval_ece
from laplace_metric.registry import metric_laplace
from laplace_metric.scores import UncertaintyScorer

__all__ = [
    "CANDIDATES",
    "CandidateResult",
    "PosteriorConfig",
    "PosteriorSelection",
    "select_posterior",
]


@dataclass(frozen=True)
class PosteriorConfig:
    """One posterior configuration: which weights, which structure, likelihood scale, prior.

    Attributes
    ----------
    subset_of_weights : {'all', 'last_layer', 'subnetwork'}, default='all'
    hessian_structure : {'diag', 'kron', 'full'}, default='diag'
    likelihood_scale : {'dataset', 'composite', 'batch'} or float, default='dataset'
        How many pairs the curvature stands for (see :class:`~laplace_metric.enums.LikelihoodScale`).
    prior_precision : 'marglik' or float, default='marglik'
        ``'marglik'`` tunes it with ``optimize_prior_precision(method='marglik')`` after the fit.
    """

    subset_of_weights: str = "all"
    hessian_structure: str = "diag"
    likelihood_scale: str | float = "dataset"
    prior_precision: str | float = "marglik"

    def __post_init__(self) -> None:
        if isinstance(self.likelihood_scale, str):
            parse_enum(LikelihoodScale, self.likelihood_scale, "likelihood_scale")
        prior = self.prior_precision
        if isinstance(prior, str) and prior != "marglik":
            raise ValueError(f"prior_precision must be 'marglik' or a number, got {prior!r}.")
        if not isinstance(prior, str) and not (float(prior) > 0 and math.isfinite(float(prior))):
            raise ValueError(f"prior_precision must be positive and finite, got {prior!r}.")

    @property
    def name(self) -> str:
        """A readable name, e.g. ``'all-layer diag, dataset scale, marglik'``."""
        subset = {"all": "all-layer", "last_layer": "last-layer"}.get(
            self.subset_of_weights, self.subset_of_weights
        )
        prior = self.prior_precision
        prior = "marglik" if prior == "marglik" else f"prior {float(prior):g}"
        scale = self.likelihood_scale
        scale = f"{scale} scale" if isinstance(scale, str) else f"{float(scale):g} pairs"
        return f"{subset} {self.hessian_structure}, {scale}, {prior}"

    def fit(self, model: torch.nn.Module, train_loader, likelihood: Any = "contrastive", **kwargs):
        """The fitted estimator of this configuration (``kwargs``: estimator options)."""
        la = metric_laplace(
            model,
            likelihood,
            self.subset_of_weights,
            self.hessian_structure,
            likelihood_scale=self.likelihood_scale,
            **kwargs,
        )
        la.fit(train_loader)
        if self.prior_precision == "marglik":
            la.optimize_prior_precision(method="marglik")
        else:
            la.prior_precision = float(self.prior_precision)
        return la


#: The candidates :func:`select_posterior` tries by default, in order of preference on a tie:
#: the estimator's default (all-layer diag, ``'dataset'`` scale, marglik prior) and the
#: cheaper last-layer Kronecker posterior at the ``'composite'`` scale.
CANDIDATES = (
    PosteriorConfig("all", "diag", "dataset", "marglik"),
    PosteriorConfig("last_layer", "kron", "composite", "marglik"),
)


@dataclass
class CandidateResult:
    """Validation figures of one candidate: fitted, and with its curvature off.

    Attributes
    ----------
    config : PosteriorConfig
    fitted, curvature_off : float
        The criterion (validation ECE, lower is better; or validation AUROC, higher is better).
    ece, ece_curvature_off : float
        Validation retrieval ECE, fitted and curvature off (also when the criterion is AUROC).
    auroc, auroc_curvature_off : float
        Validation AUROC against ``x_ood_val`` (NaN when none was given).
    prior_precision : float
        The fitted prior precision (mean over its entries).
    """

    config: PosteriorConfig
    fitted: float
    curvature_off: float
    ece: float
    ece_curvature_off: float
    auroc: float
    auroc_curvature_off: float
    prior_precision: float


@dataclass
class PosteriorSelection:
    """What :func:`select_posterior` returns.

    Attributes
    ----------
    la : MetricLaplaceMixin
        The fitted estimator of the chosen configuration.
    config : PosteriorConfig
        The chosen configuration.
    criterion : SelectionCriterion
    results : list of CandidateResult
        Every candidate's validation figures, in the order tried.
    """

    la: Any
    config: PosteriorConfig
    criterion: SelectionCriterion
    results: list[CandidateResult]

    @property
    def curvature_helps(self) -> bool:
        """Whether the chosen posterior beats its own curvature-off control on validation."""
        best = next(r for r in self.results if r.config == self.config)
        return _better(best.fitted, best.curvature_off, self.criterion)

    def to_markdown(self) -> str:
        """A table of every candidate's validation figures, the chosen one marked."""
        lines = [
            "| configuration | val ECE | val ECE, curvature off | val AUROC | "
            "val AUROC, curvature off | prior precision |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.results:
            mark = " (chosen)" if r.config == self.config else ""
            cells = [r.ece, r.ece_curvature_off, r.auroc, r.auroc_curvature_off]
            text = " | ".join("-" if math.isnan(v) else f"{v:.4f}" for v in cells)
            lines.append(f"| {r.config.name}{mark} | {text} | {r.prior_precision:.3g} |")
        return "\n".join(lines)


def _better(a: float, b: float, criterion: SelectionCriterion) -> bool:
    return a < b if criterion == SelectionCriterion.ECE else a > b


def _validation_figures(
    la, x_val, y_val, x_ood_val, database, database_labels, n_samples, seed
) -> tuple[float, float]:
    """Validation ECE and AUROC (NaN without ``x_ood_val``) of the default score."""
    gen = torch.Generator(device=la._device).manual_seed(seed)
    scorer = UncertaintyScorer(
        la, database, database_labels, n_samples=n_samples, generator=gen, progress_bar=False
    )
    retrieval = scorer.retrieval(x_val)
    correct = (retrieval.predicted == y_val.to(retrieval.predicted.device)).cpu()
    ece = retrieval_ece(retrieval.confidence.cpu(), correct)
    if x_ood_val is None:
        return ece, math.nan
    return ece, ood_auroc(retrieval.knn_distance.cpu(), scorer(x_ood_val).cpu())


def _check_inputs(x_val, y_val, x_ood_val, database, database_labels, criterion) -> None:
    if len(x_val) != len(y_val):
        raise ValueError(f"x_val has {len(x_val)} rows but y_val has {len(y_val)}.")
    if len(database) != len(database_labels):
        raise ValueError(
            f"database has {len(database)} rows but database_labels has {len(database_labels)}."
        )
    if criterion == SelectionCriterion.AUROC and x_ood_val is None:
        raise ValueError("criterion='auroc' needs x_ood_val (an OOD proxy, e.g. uniform noise).")
    for name, x in (("x_val", x_val), ("database", database), ("x_ood_val", x_ood_val)):
        if x is not None and x.is_floating_point() and not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values.")


def _check_options(
    criterion: SelectionCriterion | str, candidates: tuple[PosteriorConfig, ...], laplace_kwargs
) -> SelectionCriterion:
    owned = {"subset_of_weights", "hessian_structure", "likelihood_scale", "prior_precision"}
    clash = sorted(owned & set(laplace_kwargs))
    if clash:
        raise ValueError(
            f"{', '.join(clash)} belong to each candidate: pass PosteriorConfig(...) objects in "
            "candidates= instead of estimator options."
        )
    if not candidates:
        raise ValueError("select_posterior needs at least one candidate PosteriorConfig.")
    return parse_enum(SelectionCriterion, criterion, "criterion")


def _evaluate_candidate(
    la, config: PosteriorConfig, criterion: SelectionCriterion, args: tuple
) -> CandidateResult:
    """Validation ECE and AUROC of a fitted candidate, with its curvature on and off."""
    ece, auroc = _validation_figures(la, *args)
    with curvature_off(la):
        ece_off, auroc_off = _validation_figures(la, *args)
    use_ece = criterion == SelectionCriterion.ECE
    return CandidateResult(
        config,
        fitted=ece if use_ece else auroc,
        curvature_off=ece_off if use_ece else auroc_off,
        ece=ece,
        ece_curvature_off=ece_off,
        auroc=auroc,
        auroc_curvature_off=auroc_off,
        prior_precision=float(la.prior_precision.detach().float().mean()),
    )


def select_posterior(
    model: torch.nn.Module,
    train_loader,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    database: torch.Tensor,
    database_labels: torch.Tensor,
    *,
    candidates: tuple[PosteriorConfig, ...] = CANDIDATES,
    criterion: SelectionCriterion | str = SelectionCriterion.ECE,
    x_ood_val: torch.Tensor | None = None,
    likelihood: Any = "contrastive",
    n_samples: int = 30,
    seed: int = 0,
    **laplace_kwargs: Any,
) -> PosteriorSelection:
    """Fit every candidate posterior and keep the one that is best on validation data.

    Each candidate is fitted on ``train_loader``; ``x_val`` is retrieved from ``database`` with
    :class:`~laplace_metric.scores.UncertaintyScorer` (``n_samples`` weight samples, ``seed``),
    with the curvature on and off. Criterion: the ECE of the top-1 retrieval confidence
    (``'ece'``, labels only) or the default score's AUROC of ``x_val`` against an OOD proxy
    ``x_ood_val`` (``'auroc'``). A tie keeps the earlier candidate; only the chosen is kept.

    Parameters
    ----------
    model, train_loader : torch.nn.Module, DataLoader
        The trained encoder (not changed) and batches of ``(x, class_label)`` for ``la.fit``.
    x_val, y_val, database, database_labels : torch.Tensor
        Validation queries and labels (never the test or OOD set), and what they are retrieved
        from (e.g. the training set) with its labels.
    candidates : tuple of PosteriorConfig, default=:data:`CANDIDATES`
    criterion : {'ece', 'auroc'}, default='ece'
    x_ood_val : torch.Tensor, optional
        OOD proxy inputs for validation AUROC (e.g. uniform noise); reported when given.
    likelihood : {'contrastive', 'bregman'} or PairLikelihood, default='contrastive'
    n_samples, seed : int, default=30, 0
    **laplace_kwargs
        Estimator options for every candidate (``margin``, ``hessian_method``, ...).

    Returns
    -------
    PosteriorSelection

    Raises
    ------
    ValueError
        On no candidates, mismatched lengths, NaN inputs, ``'auroc'`` without ``x_ood_val``, or
        a candidate's option (``likelihood_scale``, ...) among ``laplace_kwargs``.
    """
    criterion = _check_options(criterion, candidates, laplace_kwargs)
    _check_inputs(x_val, y_val, x_ood_val, database, database_labels, criterion)
    args = (x_val, y_val, x_ood_val, database, database_labels, n_samples, seed)
    results, best_la, best_result = [], None, None
    for config in candidates:
        la = config.fit(model, train_loader, likelihood, **laplace_kwargs)
        results.append(_evaluate_candidate(la, config, criterion, args))
        if best_result is None or _better(results[-1].fitted, best_result.fitted, criterion):
            best_la, best_result = la, results[-1]
    return PosteriorSelection(best_la, best_result.config, criterion, results)
