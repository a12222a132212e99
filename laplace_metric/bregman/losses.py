"""Training losses on a learned Bregman divergence, and a small joint training loop.

Both losses train the encoder and the potential ``phi`` jointly. The contrastive loss is the
negative log-likelihood of :class:`~laplace_metric.likelihoods.bregman.BregmanLikelihood`, so a
Laplace posterior fitted afterwards uses exactly the training objective.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from laplace_metric.bregman.divergence import BregmanDivergence, as_divergence
from laplace_metric.bregman.potentials import ConvexPotential
from laplace_metric.enums import HessianMethod, parse_enum
from laplace_metric.likelihoods.bregman import BregmanLikelihood
from laplace_metric.mining import check_labels


class Reduction(str, Enum):
    """How per-pair or per-triplet losses are combined."""

    SUM = "sum"
    """Sum (the negative log-likelihood, for the contrastive loss)."""

    MEAN = "mean"
    """Average over all mined pairs or triplets."""


class BregmanLossName(str, Enum):
    """Built-in training losses of :func:`fit_bregman`."""

    CONTRASTIVE = "contrastive"
    """:class:`BregmanContrastiveLoss`."""

    TRIPLET = "triplet"
    """:class:`BregmanTripletLoss`."""


class BregmanContrastiveLoss(nn.Module):
    """Contrastive loss on ``D_phi``: ``D/2`` for positives, ``max(0, margin - D)/2`` for
    negatives, exactly the NLL of :class:`BregmanLikelihood`.

    Parameters
    ----------
    divergence : BregmanDivergence or ConvexPotential
        The divergence to train jointly with the encoder (its parameters are this module's).
    margin : float, default=1.0
        Hinge margin for negative pairs.
    normalize : bool, default=True
        L2-normalise the encoder outputs first.
    miner : callable, optional
        A pytorch-metric-learning miner; ``None`` uses all pairs of the batch.
    reduction : {'mean', 'sum'}, default='mean'
        ``'sum'`` is the negative log-likelihood; ``'mean'`` averages over the mined pairs.
    ordered_pairs : bool, default=True
        Without a miner, use every ordered pair ``(i, j)``, ``i != j`` (both directions of
        the asymmetric divergence); ``False`` uses ``i < j`` only.
    """

    def __init__(
        self,
        divergence: BregmanDivergence | ConvexPotential,
        margin: float = 1.0,
        normalize: bool = True,
        miner: Any | None = None,
        reduction: Reduction | str = Reduction.MEAN,
        ordered_pairs: bool = True,
    ) -> None:
        super().__init__()
        self.divergence = as_divergence(divergence)
        self.reduction = parse_enum(Reduction, reduction, "reduction")
        self.likelihood = BregmanLikelihood(
            self.divergence,
            margin=margin,
            normalize=normalize,
            miner=miner,
            ordered_pairs=ordered_pairs,
        )

    def forward(self, g: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of raw encoder outputs ``g`` ``(batch, D)`` with class ``labels``."""
        return self.likelihood.loss(g, labels, reduction=self.reduction.value)

    def to_likelihood(
        self, hessian_method: HessianMethod | str = HessianMethod.POSITIVES
    ) -> BregmanLikelihood:
        """The matching :class:`BregmanLikelihood` (deprecated: use :attr:`likelihood`, or build
        a ``BregmanLikelihood`` with another ``hessian_method``)."""
        warnings.warn(
            "BregmanContrastiveLoss.to_likelihood is deprecated and will be removed; use the "
            "loss's .likelihood or build a BregmanLikelihood directly.",
            DeprecationWarning,
            stacklevel=2,
        )
        lik = self.likelihood
        return BregmanLikelihood(
            self.divergence,
            margin=lik.margin,
            normalize=lik.normalize,
            hessian_method=parse_enum(HessianMethod, hessian_method, "hessian_method"),
            miner=lik.miner,
            ordered_pairs=lik.ordered_pairs,
        )


def all_triplets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every valid triplet ``(anchor, positive, negative)`` of a batch.

    Parameters
    ----------
    labels : torch.Tensor
        Class labels, shape ``(batch,)``.

    Returns
    -------
    anchor, positive, negative : torch.Tensor
        Index tensors of equal length.
    """
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    valid = pos[:, :, None] & ~same[:, None, :]
    return valid.nonzero(as_tuple=True)


class BregmanTripletLoss(nn.Module):
    """Triplet loss on ``D_phi``: ``max(0, D(a, p) - D(a, n) + margin)``.

    The anchor is the query (first argument) of both divergences, the retrieval convention of
    :mod:`laplace_metric.bregman.divergence`.

    Parameters
    ----------
    divergence : BregmanDivergence or ConvexPotential
        The divergence to train jointly with the encoder.
    margin : float, default=0.5
        Triplet margin, ``> 0``.
    normalize : bool, default=True
        L2-normalise the encoder outputs first.
    miner : callable, optional
        A pytorch-metric-learning triplet miner returning ``(anchor, positive, negative)``;
        ``None`` uses every valid triplet of the batch.
    reduction : {'mean', 'sum'}, default='mean'
    """

    def __init__(
        self,
        divergence: BregmanDivergence | ConvexPotential,
        margin: float = 0.5,
        normalize: bool = True,
        miner: Any | None = None,
        reduction: Reduction | str = Reduction.MEAN,
    ) -> None:
        super().__init__()
        margin = float(margin)
        if not margin > 0:
            raise ValueError(f"margin must be a positive number, got {margin}.")
        self.divergence = as_divergence(divergence)
        self.margin = margin
        self.normalize = bool(normalize)
        self.miner = miner
        self.reduction = parse_enum(Reduction, reduction, "reduction")

    def forward(self, g: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of raw encoder outputs ``g`` ``(batch, D)`` with class ``labels``."""
        labels = check_labels(labels, g.shape[0])
        z = nn.functional.normalize(g, dim=1) if self.normalize else g
        if self.miner is None:
            a, p, n = all_triplets(labels)
        else:
            with torch.no_grad():
                mined = self.miner(z.detach(), labels)
            if len(mined) != 3:
                raise ValueError(
                    "BregmanTripletLoss needs a triplet miner returning (anchor, positive, "
                    f"negative); got a tuple of {len(mined)}."
                )
            a, p, n = mined
        mat = self.divergence.pairwise(z)
        losses = (mat[a, p] - mat[a, n] + self.margin).clamp(min=0)
        if self.reduction == Reduction.SUM or len(losses) == 0:
            return losses.sum()
        return losses.mean()


def fit_bregman(
    encoder: nn.Module,
    divergence: BregmanDivergence | ConvexPotential,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int = 10,
    lr: float = 1e-3,
    loss: BregmanLossName | str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        BregmanLossName.CONTRASTIVE
    ),
    device: torch.device | str | None = None,
    progress_bar: bool = True,
    **loss_kwargs: Any,
) -> list[float]:
    """Train an encoder and a Bregman potential jointly with Adam.

    Parameters
    ----------
    encoder : torch.nn.Module
        Maps a batch of inputs to raw embeddings ``(batch, D)``.
    divergence : BregmanDivergence or ConvexPotential
        The divergence whose potential is trained alongside the encoder.
    loader : iterable of (inputs, labels)
        Training batches, e.g. a ``torch.utils.data.DataLoader``.
    epochs : int, default=10
    lr : float, default=1e-3
        Adam learning rate for all parameters.
    loss : {'contrastive', 'triplet'} or callable, default='contrastive'
        A built-in loss (built on ``divergence`` with ``loss_kwargs``) or a callable
        ``loss(g, labels)``; a callable ``nn.Module``'s own parameters are trained too.
    device : torch.device or str, optional
        Where batches are moved; the modules are expected to be there already.
    progress_bar : bool, default=True
        Show a tqdm progress bar over epochs.
    **loss_kwargs
        Passed to the built-in loss (``margin``, ``normalize``, ``miner``, ``reduction``).

    Returns
    -------
    history : list of float
        Mean batch loss per epoch.
    """
    divergence = as_divergence(divergence)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}.")
    if not float(lr) > 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    loss_fn = _build_loss(loss, divergence, loss_kwargs)
    optimizer = torch.optim.Adam(_trainable(encoder, divergence, loss_fn), lr=float(lr))
    encoder.train()
    history: list[float] = []
    bar = tqdm(range(epochs), desc="fit_bregman", disable=not progress_bar)
    for _ in bar:
        history.append(_train_epoch(encoder, loss_fn, loader, optimizer, device))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    encoder.eval()
    return history


def _build_loss(
    loss: BregmanLossName | str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    divergence: BregmanDivergence,
    loss_kwargs: dict[str, Any],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The built-in loss named ``loss`` on ``divergence``, or the callable ``loss`` itself."""
    if isinstance(loss, str | BregmanLossName):
        name = parse_enum(BregmanLossName, loss, "loss")
        cls = BregmanContrastiveLoss if name == BregmanLossName.CONTRASTIVE else BregmanTripletLoss
        return cls(divergence, **loss_kwargs)
    if callable(loss):
        if loss_kwargs:
            raise TypeError(f"loss_kwargs {sorted(loss_kwargs)} only apply to built-in losses.")
        return loss
    raise TypeError(
        f"loss must be 'contrastive', 'triplet' or a callable, got {type(loss).__name__}."
    )


def _trainable(encoder: nn.Module, divergence: BregmanDivergence, loss_fn: Any) -> list:
    """The parameters of the encoder, the potential and a module loss, each once."""
    params: dict[int, nn.Parameter] = {}
    modules = [encoder, divergence] + ([loss_fn] if isinstance(loss_fn, nn.Module) else [])
    for module in modules:
        for p in module.parameters():
            params.setdefault(id(p), p)
    return list(params.values())


def _train_epoch(
    encoder: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str | None,
) -> float:
    """One pass over ``loader``; returns the mean batch loss."""
    total, n_batches = 0.0, 0
    for x, y in loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        value = loss_fn(encoder(x), y)
        if not bool(torch.isfinite(value)):
            raise ValueError("The training loss became NaN or inf; lower lr or check the data.")
        value.backward()
        optimizer.step()
        total += float(value.detach())
        n_batches += 1
    if n_batches == 0:
        raise ValueError("The loader yielded no batches.")
    return total / n_batches
