"""Prediction: embedding means and covariances, samples and uncertainty scores.

Never a softmax: the linearised (``'glm'``) or Monte-Carlo (``'nn'``) predictive of the
(normalised) embedding, computed in memory-bounded chunks by :mod:`laplace_metric.predictive`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from laplace.utils.enums import PredType

from laplace_metric.encoders import keeps_module_modes
from laplace_metric.enums import CovarianceScore, parse_enum
from laplace_metric.estimators.batches import check_inputs
from laplace_metric.memory import dtype_bytes
from laplace_metric.predictive import (
    draw_weight_samples,
    glm_chunks,
    glm_joint,
    iter_query_chunks,
    nn_embedding_samples,
)
from laplace_metric.sampling import gaussian_samples, project_to_sphere
from laplace_metric.uncertainty import covariance_score


class PredictionMixin:
    """The embedding predictive (a base of
    :class:`~laplace_metric.estimators.MetricLaplaceMixin`)."""

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
            return glm_joint(self.predictive_view(), X)
        means, covs = zip(*glm_chunks(self.predictive_view(), X, diagonal_output, batch_size))
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

        **model_kwargs
            Ignored (deprecated: a warning names them).

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
        _warn_ignored(model_kwargs)
        self._check_output(x)
        if _checked_pred_type(pred_type, joint) == PredType.GLM:
            return self._glm_predictive_distribution(
                x, joint=joint, diagonal_output=diagonal_output, batch_size=batch_size
            )
        samples = self._nn_embedding_samples(x, n_samples, generator, batch_size)
        return _sample_moments(samples, diagonal_output)

    @keeps_module_modes
    def predictive_similarity(
        self,
        x_query: torch.Tensor,
        x_gallery: torch.Tensor,
        metric: str = "cosine",
        return_variance: bool = True,
        correction: bool = True,
        approximation: str = "ratio",
        batch_size: int | None = None,
        gallery_batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior mean and variance ``(Q, G)`` of the similarity of each query-gallery pair.

        Closed form, including the query-gallery cross-covariance (one encoder, shared
        weights); see :mod:`laplace_metric.predictive.similarity` and ``docs/mathematics.rst``.

        Parameters
        ----------
        x_query, x_gallery : torch.Tensor
            Inputs ``(Q, ...)`` and ``(G, ...)``.
        metric : {'cosine', 'sqeuclidean'}, default='cosine'
            ``'bregman'`` raises ``NotImplementedError``.
        return_variance : bool, default=True
            ``False``: skip the variance (returned as ``None``).
        correction : bool, default=True
            Second-order mean; ``False`` with ``return_variance=False`` costs one matrix product.
        approximation : {'ratio', 'delta'}, default='ratio'
            ``'ratio'``: second order in the Gaussian quadratic forms ``x^T y``, ``|x|^2``,
            ``|y|^2`` (wide and tight posteriors); ``'delta'``: second order in the outputs
            (tight posteriors only). Raw squared distances are exact either way.
        batch_size, gallery_batch_size : int, optional
            Queries and gallery items per chunk (``None``: fit ``memory_budget``).

        Returns
        -------
        mean : torch.Tensor
            ``(Q, G)``.
        variance : torch.Tensor or None
            ``(Q, G)``.
        """
        from laplace_metric.predictive.similarity import predictive_similarity

        self._check_fitted()
        x_query, x_gallery = x_query.to(self._device), x_gallery.to(self._device)
        check_inputs(x_query)
        check_inputs(x_gallery)
        self._check_output(x_query)
        return predictive_similarity(
            self, x_query, x_gallery, metric, return_variance, correction, approximation,
            batch_size, gallery_batch_size,
        )  # fmt: skip

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
        return nn_embedding_samples(
            self.predictive_view(), x, n_samples, generator, batch_size, weights
        )

    @keeps_module_modes
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
        score: CovarianceScore | str = CovarianceScore.TRACE,
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
            See :func:`laplace_metric.uncertainty.covariance_score`.
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
        score = parse_enum(CovarianceScore, score, "score")
        pred_type = parse_enum(PredType, pred_type, "pred_type")
        diagonal = score != CovarianceScore.LOGDET
        if pred_type == PredType.GLM:
            self._check_fitted()
            x = x.to(self._device)
            check_inputs(x)
            view = self.predictive_view()
            return torch.cat(
                [
                    covariance_score(cov, score)
                    for _, cov in glm_chunks(view, x, diagonal, batch_size)
                ]
            )
        if pred_type != PredType.NN:
            raise ValueError("pred_type='gp' is not available; use 'glm' or 'nn'.")
        self._check_fitted()
        self._check_generator(generator)
        view = self.predictive_view()
        weights = draw_weight_samples(view, n_samples, generator)
        D = int(self.n_outputs)
        per_query = (2 * n_samples * D + D * D) * dtype_bytes(self._dtype)
        scores = []
        for chunk in iter_query_chunks(view, x, batch_size, per_query):
            samples = self._nn_embedding_samples(chunk, n_samples, None, batch_size, weights)
            scores.append(covariance_score(_sample_moments(samples, diagonal)[1], score))
        return torch.cat(scores)


def _checked_pred_type(pred_type: PredType | str, joint: bool) -> PredType:
    pred_type = parse_enum(PredType, pred_type, "pred_type")
    if pred_type == PredType.GP:
        raise ValueError("pred_type='gp' is not available; use 'glm' or 'nn'.")
    if joint and pred_type == PredType.NN:
        raise ValueError("joint=True is only available for pred_type='glm'.")
    return pred_type


def _warn_ignored(model_kwargs: dict[str, Any]) -> None:
    if model_kwargs:
        warnings.warn(
            f"Keyword arguments {sorted(model_kwargs)} are ignored by the embedding "
            "predictive; passing them is deprecated and will raise in a future release.",
            DeprecationWarning,
            stacklevel=4,
        )


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


__all__ = ["PredictionMixin"]
