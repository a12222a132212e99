"""Scalar uncertainty scores from predictive (co)variances of embeddings."""

from __future__ import annotations

import torch

from laplace_metric.enums import UncertaintyScore, parse_enum


def uncertainty_score(
    cov: torch.Tensor, score: UncertaintyScore | str = UncertaintyScore.TRACE, jitter: float = 1e-12
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
    score : UncertaintyScore or str, default='trace'
    jitter : float, default=1e-12
        Added to the diagonal for ``'logdet'`` (normalised embeddings have rank ``D - 1``).

    Returns
    -------
    scores : torch.Tensor
        ``(batch,)``.
    """
    score = parse_enum(UncertaintyScore, score, "score")
    if cov.ndim not in (2, 3):
        raise ValueError(f"cov must be (batch, D) or (batch, D, D), got {tuple(cov.shape)}.")
    variances = cov if cov.ndim == 2 else torch.diagonal(cov, dim1=-2, dim2=-1)
    if score == UncertaintyScore.TRACE:
        return variances.sum(-1)
    if score == UncertaintyScore.STD_SUM:
        return variances.clamp(min=0).sqrt().sum(-1)
    if cov.ndim != 3:
        raise ValueError("score='logdet' needs full covariances (batch, D, D).")
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return torch.logdet(cov + jitter * eye)
