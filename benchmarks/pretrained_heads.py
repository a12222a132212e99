"""Projection heads on frozen backbone features for :mod:`benchmarks.pretrained`.

* :func:`contrastive_head`: ``1280 -> 256 -> 128`` trained with the package's contrastive loss
  (L2-normalised embeddings, margin 1); also the members of the deep ensemble (other seeds);
* :func:`dropout_head`: the same with dropout before the last layer (MC dropout);
* :func:`bregman_head`: the same shape trained jointly with an ICNN Bregman potential
  (:func:`laplace_metric.bregman.fit_bregman`, contrastive loss on the divergence).
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN, DIM = 256, 128
BATCH = 128
DROPOUT = 0.2
ICNN_HIDDEN, ICNN_ALPHA = (128, 128), 0.5


def _loader(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def _mlp(n_in: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, HIDDEN), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(HIDDEN, DIM))


def contrastive_head(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """A head trained with the contrastive loss from seed ``seed`` (left in eval mode)."""
    from laplace_metric.baselines.train import train_encoder

    torch.manual_seed(seed)
    head = _mlp(x.shape[1])
    train_encoder(head, _loader(x, y, seed), epochs=epochs, lr=1e-3, seed=seed,
                  progress_bar=False)  # fmt: skip
    return head.eval()


def dropout_head(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """A contrastive head with ``Dropout(DROPOUT)`` before its last layer."""
    from laplace_metric.baselines.train import train_encoder

    torch.manual_seed(seed)
    head = _mlp(x.shape[1], DROPOUT)
    train_encoder(head, _loader(x, y, seed), epochs=epochs, lr=1e-3, seed=seed,
                  progress_bar=False)  # fmt: skip
    return head.eval()


def bregman_head(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int):
    """A head and its learned ICNN Bregman divergence, trained jointly; ``(head, divergence)``."""
    from laplace_metric.bregman import BregmanDivergence, ICNNPotential
    from laplace_metric.bregman.losses import fit_bregman

    torch.manual_seed(seed)
    head = _mlp(x.shape[1])
    div = BregmanDivergence(ICNNPotential(DIM, hidden=ICNN_HIDDEN, alpha=ICNN_ALPHA))
    fit_bregman(head, div, _loader(x, y, seed), epochs=epochs, lr=1e-3, loss="contrastive",
                margin=1.0, progress_bar=False)  # fmt: skip
    return head.eval(), div.eval()
