"""Training an encoder with a metric-learning loss (the baselines' deterministic encoders)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from laplace_metric.baselines.embedding import _module_device
from laplace_metric.likelihoods import ContrastiveLikelihood, PairLikelihood
from laplace_metric.progress import progress as show_progress

__all__ = ["LossFn", "TrainingHistory", "train_encoder"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(embeddings (B, D), labels (B,)) -> scalar``."""


class TrainingHistory(list):
    """The mean batch loss of every epoch (a ``list`` of float), and the pairwise likelihood
    the encoder was trained with, so that the Laplace step uses the same margin::

        history = train_encoder(encoder, loader, margin=0.5)
        la = Laplace(encoder, history.likelihood, subset_of_weights="all",
                     hessian_structure="diag")

    Attributes
    ----------
    likelihood : PairLikelihood or None
        The likelihood whose loss was minimised (``None`` for a custom ``loss_fn``).
    """

    def __init__(self, losses: list[float], likelihood: PairLikelihood | None) -> None:
        super().__init__(losses)
        self.likelihood = likelihood

    @property
    def margin(self) -> float | None:
        """The training margin (``None`` for a custom ``loss_fn``)."""
        return None if self.likelihood is None else self.likelihood.margin


def _training_loss(
    loss_fn: LossFn | PairLikelihood | None, margin: float | None
) -> tuple[LossFn, PairLikelihood | None]:
    """The loss to minimise and the likelihood it belongs to (``None`` for a custom loss)."""
    if loss_fn is None:
        likelihood = ContrastiveLikelihood(margin=1.0 if margin is None else margin)
    elif isinstance(loss_fn, PairLikelihood):
        likelihood = loss_fn
        if margin is not None and float(margin) != likelihood.margin:
            raise ValueError(
                f"margin={margin} differs from the margin of loss_fn ({likelihood.margin}); "
                "pass only one of them."
            )
    else:
        if margin is not None:
            raise ValueError(
                "margin= sets the margin of the default contrastive loss; with a custom "
                "loss_fn, set the margin inside it (or pass loss_fn=ContrastiveLikelihood("
                "margin=...), whose margin the Laplace step can then reuse)."
            )
        return loss_fn, None
    return (lambda g, labels: likelihood.loss(g, labels, reduction="mean")), likelihood


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
    loss_fn: LossFn | PairLikelihood | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
    progress_bar: bool | None = None,
    margin: float | None = None,
) -> TrainingHistory:
    """Train an encoder in place with Adam on a metric-learning loss.

    Parameters
    ----------
    encoder : nn.Module
        Maps inputs ``(B, ...)`` to raw embeddings ``(B, D)``.
    loader : DataLoader
        Yields ``(x, labels)`` batches.
    loss_fn : callable or PairLikelihood, optional
        ``loss_fn(embeddings, labels) -> scalar``, or a pairwise likelihood (e.g.
        ``ContrastiveLikelihood(margin=0.5)``) whose mean pair loss is minimised; default:
        the contrastive loss with margin ``margin`` on the squared distance of L2-normalised
        embeddings, averaged over all in-batch pairs.
    epochs : int, default=30
    lr : float, default=1e-3
    seed : int, default=0
        Seeds the global torch RNG (data order, dropout) before training.
    progress_bar : bool, optional
        A tqdm bar over epochs with the running loss; ``None`` (default): shown when
        standard error is a terminal (see :mod:`laplace_metric.progress`).
    margin : float, optional
        Margin of the default contrastive loss (default 1.0).

    Returns
    -------
    losses : TrainingHistory
        Mean batch loss of every epoch (a list), with the likelihood trained with
        (``losses.likelihood``, ``losses.margin``): pass ``losses.likelihood`` to
        ``Laplace(...)`` so that the posterior uses the training margin. The encoder is left
        in ``eval`` mode.
    """
    _check_training_args(encoder, loader, epochs, lr)
    loss_fn, likelihood = _training_loss(loss_fn, margin)
    torch.manual_seed(seed)
    device = _module_device(encoder)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr)
    encoder.train()
    history: list[float] = []
    bar = show_progress(range(epochs), desc="train", unit="epoch", progress_bar=progress_bar)
    for _ in bar:
        history.append(_train_epoch(encoder, loader, loss_fn, optimizer, device))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    encoder.eval()
    return TrainingHistory(history, likelihood)
