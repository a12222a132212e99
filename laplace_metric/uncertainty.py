"""Scalar uncertainty scores from predictive (co)variances of embeddings.

:func:`covariance_score` reduces a covariance by a :class:`~laplace_metric.enums.CovarianceScore`;
``uncertainty_score`` is its former name (kept; ``laplace_metric.uncertainty_score`` warns).
"""

from __future__ import annotations

import torch

from laplace_metric.enums import CovarianceScore, parse_enum


def covariance_score(
    cov: torch.Tensor, score: CovarianceScore | str = CovarianceScore.TRACE, jitter: float = 1e-12
) -> torch.Tensor:
    """One number per input from its predictive covariance; higher means less certain.

    * ``'trace'``: ``tr(Sigma) = sum_d Var[z_d]``, the expected squared distance of a sample
      from the mean embedding (the default; rotation-invariant).
    * ``'std_sum'``: ``sum_d sqrt(Var[z_d])``.
    * ``'logdet'``: ``log det(Sigma + jitter I)`` (needs full covariances).

    Parameters
    ----------
    cov : torch.Tensor
        ``(batch, D, D)`` covariances or ``(batch, D)`` variances.
    score : CovarianceScore or str, default='trace'
    jitter : float, default=1e-12
        Added to the diagonal for ``'logdet'`` (normalised embeddings have rank ``D - 1``).

    Returns
    -------
    scores : torch.Tensor
        ``(batch,)``.
    """
    score = parse_enum(CovarianceScore, score, "score")
    if cov.ndim not in (2, 3):
        raise ValueError(f"cov must be (batch, D) or (batch, D, D), got {tuple(cov.shape)}.")
    variances = cov if cov.ndim == 2 else torch.diagonal(cov, dim1=-2, dim2=-1)
    if score == CovarianceScore.TRACE:
        return variances.sum(-1)
    if score == CovarianceScore.STD_SUM:
        return variances.clamp(min=0).sqrt().sum(-1)
    if cov.ndim != 3:
        raise ValueError("score='logdet' needs full covariances (batch, D, D).")
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return torch.logdet(cov + jitter * eye)


#: The former name of :func:`covariance_score`.
uncertainty_score = covariance_score

__all__ = ["covariance_score", "uncertainty_score"]
