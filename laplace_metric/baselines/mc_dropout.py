"""Monte Carlo dropout: dropout kept active at test time; score = spread of the samples."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from laplace_metric.baselines.base import OODBaseline, register_baseline
from laplace_metric.baselines.embedding import _module_device, embed, run_batches
from laplace_metric.encoders import eval_mode
from laplace_metric.enums import UncertaintyScore, parse_enum

__all__ = ["MCDropoutBaseline"]

_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _covariance_score(samples: Tensor, kind: UncertaintyScore) -> Tensor:
    """Scalar spread of samples ``(S, n, D)`` per input: trace, sum of stds or log-det."""
    if kind == UncertaintyScore.TRACE:
        return samples.var(dim=0).sum(-1)
    if kind == UncertaintyScore.STD_SUM:
        return samples.std(dim=0).sum(-1)
    centred = samples - samples.mean(0, keepdim=True)
    cov = torch.einsum("snd,sne->nde", centred, centred) / (samples.shape[0] - 1)
    jitter = 1e-6 * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return torch.logdet(cov + jitter)


@register_baseline("mc_dropout")
class MCDropoutBaseline(OODBaseline):
    """Monte Carlo dropout (Gal & Ghahramani, 2016): dropout stays active at test time.

    With ``S`` stochastic forward passes ``z^s(x)`` (L2-normalised), the score is the trace of
    their sample covariance ``sum_d Var_s[z_d^s]`` (default), the sum of per-dimension standard
    deviations, or the log-determinant. The retrieval embedding is the normalised sample mean.

    For an ``nn.Sequential`` encoder the layers before the first one holding a dropout module
    run once per input (in eval mode, their outputs cached) and only the rest runs per sample:
    for a CNN with dropout in its head, the convolutions run once. Other architectures re-run
    the whole encoder per sample; wrap them as ``nn.Sequential(backbone, head)`` to get the
    cache. Everything except dropout runs in eval mode, and every submodule's mode and buffer
    is restored afterwards.

    Parameters
    ----------
    encoder : nn.Module
        Trained encoder containing dropout layers.
    n_samples : int, default=30
    score : {'trace', 'std_sum', 'logdet'}, default='trace'
    normalize : bool, default=True
    seed : int, optional
        Seed for the dropout masks (the global RNG state is restored afterwards).
    batch_size : int, default=1024
    """

    def __init__(
        self,
        encoder: nn.Module,
        n_samples: int = 30,
        score: UncertaintyScore | str = UncertaintyScore.TRACE,
        normalize: bool = True,
        seed: int | None = 0,
        batch_size: int = 1024,
    ) -> None:
        if not any(isinstance(m, _DROPOUT_TYPES) for m in encoder.modules()):
            raise ValueError("MCDropoutBaseline needs an encoder with at least one dropout layer.")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
            raise ValueError(f"n_samples must be an int >= 2, got {n_samples!r}.")
        self.encoder = encoder
        self.n_samples = n_samples
        self.score_kind = parse_enum(UncertaintyScore, score, "score")
        self.normalize = normalize
        self.seed = seed
        self.batch_size = batch_size

    def fit(self, x_train: Tensor, y_train: Tensor | None = None) -> MCDropoutBaseline:
        """Nothing to fit (kept for a uniform interface); returns ``self``."""
        return self

    def split(self) -> tuple[nn.Module | None, nn.Module]:
        """``(deterministic prefix or None, stochastic rest)`` of the encoder: for an
        ``nn.Sequential``, the layers before the first one holding a dropout module."""
        encoder = self.encoder
        if isinstance(encoder, nn.Sequential):
            for i, child in enumerate(encoder):
                if any(isinstance(m, _DROPOUT_TYPES) for m in child.modules()):
                    return (encoder[:i] if i else None), encoder[i:]
        return None, encoder

    def samples(self, x: Tensor) -> Tensor:
        """Embedding samples ``(S, n, D)`` with dropout active and everything else in eval."""
        device = _module_device(self.encoder)
        devices = [] if device.type == "cpu" else [device]
        prefix, rest = self.split()
        with eval_mode(self.encoder):
            features = x if prefix is None else run_batches(prefix, x, self.batch_size)
            for module in self.encoder.modules():
                if isinstance(module, _DROPOUT_TYPES):
                    module.train()
            with torch.random.fork_rng(devices=devices, enabled=self.seed is not None):
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                draws = [
                    embed(rest, features, self.normalize, self.batch_size).to(x.device)
                    for _ in range(self.n_samples)
                ]
        return torch.stack(draws)

    def embed(self, x: Tensor) -> Tensor:
        """Mean of the samples (normalised if ``normalize``), ``(n, D)``."""
        mean = self.samples(x).mean(0)
        return F.normalize(mean, dim=-1) if self.normalize else mean

    def score(self, x: Tensor) -> Tensor:
        """Spread of the embedding samples, ``(n,)``."""
        return _covariance_score(self.samples(x), self.score_kind)
