"""Sampling helpers for embedding predictives."""

from __future__ import annotations

import torch


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a batch of PSD matrices ``(..., D, D)`` (eigenvalues clipped).

    Unlike a Cholesky factor it exists for the rank-deficient covariances of normalised
    embeddings (no variance along the radial direction).
    """
    eigvals, eigvecs = torch.linalg.eigh((cov + cov.transpose(-1, -2)) / 2)
    # eigenvalues within round-off of zero are zero: their square roots (~1e-8 in float64)
    # would otherwise turn round-off in ``cov`` into noise in the samples
    tol = eigvals.abs().amax(-1, keepdim=True) * cov.shape[-1] * torch.finfo(cov.dtype).eps
    eigvals = torch.where(eigvals > tol, eigvals, torch.zeros_like(eigvals))
    return (eigvecs * eigvals.sqrt()[..., None, :]) @ eigvecs.transpose(-1, -2)


def gaussian_samples(
    mean: torch.Tensor,
    cov: torch.Tensor,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Independent samples ``(n_samples, batch, D)`` from ``N(mean_b, cov_b)`` per input.

    Parameters
    ----------
    mean : torch.Tensor
        ``(batch, D)``.
    cov : torch.Tensor
        ``(batch, D, D)`` covariances or ``(batch, D)`` variances.
    n_samples : int
    generator : torch.Generator, optional
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}.")
    noise = torch.randn(
        (n_samples, *mean.shape), dtype=mean.dtype, device=mean.device, generator=generator
    )
    if cov.shape == mean.shape:
        return mean + noise * cov.clamp(min=0).sqrt()
    if cov.shape != (*mean.shape, mean.shape[-1]):
        raise ValueError(
            f"Covariance shape {tuple(cov.shape)} does not fit mean {tuple(mean.shape)}."
        )
    return mean + torch.einsum("bde,sbe->sbd", psd_sqrt(cov), noise)


def project_to_sphere(samples: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (samples of normalised embeddings)."""
    return samples / samples.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(samples.dtype).tiny)
