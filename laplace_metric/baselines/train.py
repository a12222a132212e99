"""Training an encoder with a metric-learning loss (the baselines' deterministic encoders)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from laplace_metric.baselines.embedding import _module_device
from laplace_metric.likelihoods import ContrastiveLikelihood

__all__ = ["LossFn", "train_encoder"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(embeddings (B, D), labels (B,)) -> scalar``."""


def _contrastive_loss(g: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """Mean contrastive loss over all in-batch pairs (the package's :class:`ContrastiveLikelihood`)."""
    return ContrastiveLikelihood(margin=margin).loss(g, labels, reduction="mean")


def _check_training_args(encoder: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    if len(loader) == 0:
        raise ValueError("The loader yields no batches.")


def _train_epoch(
    encoder: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> float:
    """One pass over ``loader``; returns the mean batch loss."""
    total, batches = 0.0, 0
    for x, labels in loader:
        x, labels = x.to(device), labels.to(device)
        loss = loss_fn(encoder(x), labels)
        if not torch.isfinite(loss):
            raise ValueError(
                "The training loss became NaN or inf; check the inputs, loss_fn and lr."
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, batches = total + loss.item(), batches + 1
    return total / batches


def train_encoder(
    encoder: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
    progress_bar: bool = True,
) -> list[float]:
    """Train an encoder in place with Adam on a metric-learning loss.

    Parameters
    ----------
    encoder : nn.Module
        Maps inputs ``(B, ...)`` to raw embeddings ``(B, D)``.
    loader : DataLoader
        Yields ``(x, labels)`` batches.
    loss_fn : callable, optional
        ``loss_fn(embeddings, labels) -> scalar``; default: contrastive loss with margin 1 on
        the squared distance of L2-normalised embeddings, averaged over all in-batch pairs.
    epochs : int, default=30
    lr : float, default=1e-3
    seed : int, default=0
        Seeds the global torch RNG (data order, dropout) before training.
    progress_bar : bool, default=True
        Show a tqdm bar over epochs with the running loss.

    Returns
    -------
    losses : list of float
        Mean batch loss of every epoch. The encoder is left in ``eval`` mode.
    """
    _check_training_args(encoder, loader, epochs, lr)
    loss_fn = _contrastive_loss if loss_fn is None else loss_fn
    torch.manual_seed(seed)
    device = _module_device(encoder)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    encoder.train()
    history: list[float] = []
    bar = tqdm(range(epochs), desc="train", disable=not progress_bar, leave=False)
    for _ in bar:
        history.append(_train_epoch(encoder, loader, loss_fn, optimizer, device))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    encoder.eval()
    return history
