"""Settings of the demo: its configuration, its encoder, its posterior configurations, stages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

__all__ = ["DemoConfig", "POSTHOC_CONFIGS", "STAGES", "make_encoder"]

#: Post-hoc LAM configurations: (row name, subset_of_weights, hessian_structure, trace row).
#: The all-layer Kronecker GLM trace is skipped: its covariance is the slowest to evaluate.
POSTHOC_CONFIGS = (
    ("LAM last-layer kron", "last_layer", "kron", True),
    ("LAM last-layer full", "last_layer", "full", True),
    ("LAM all-layer diag", "all", "diag", True),
    ("LAM all-layer kron", "all", "kron", False),
)

#: The stages of :func:`~laplace_metric.demo.run_seed`, in order (one progress-bar step each).
STAGES = (
    "train encoder",
    "kNN, Mahalanobis",
    "MC dropout",
    "deep ensemble",
    *(name for name, *_ in POSTHOC_CONFIGS),
    "online LAM",
)


@dataclass
class DemoConfig:
    """Settings of :func:`~laplace_metric.demo.run_demo` (the CLI flags).

    Attributes
    ----------
    dataset : str
        ``'digits'`` (bundled), ``'mnist'`` or ``'fashion_mnist'`` (downloaded by torchvision).
    id_classes : sequence of int
        In-distribution classes; the other classes are the held-out OOD set.
    seeds : sequence of int
    epochs : int
        Training epochs of every encoder.
    batch_size : int
    margin : float
        Contrastive margin on the squared distance.
    n_members : int
        Deep-ensemble size.
    n_samples : int
        Posterior / dropout samples per score.
    output_dir : Path
        Where plots and ``results.json`` / ``results.md`` are written.
    device : str
    threads : int
        Torch intra-op threads (small MLPs run fastest on one).
    progress : bool
        Show a progress bar.
    data_root : Path
        torchvision data folder.
    """

    dataset: str = "digits"
    id_classes: Sequence[int] = (0, 1, 2, 3, 4, 5)
    seeds: Sequence[int] = (0, 1, 2)
    epochs: int = 30
    batch_size: int = 64
    margin: float = 1.0
    n_members: int = 5
    n_samples: int = 30
    output_dir: Path = Path("laplace_metric_output")
    device: str = "cpu"
    threads: int = 1
    progress: bool = True
    data_root: Path = Path("data")


def make_encoder(
    in_dim: int, dropout: float = 0.0, hidden: int = 128, out_dim: int = 16
) -> nn.Sequential:
    """The demo encoder: MLP ``in-128-128-16`` with tanh (optional dropout after hidden layers)."""
    layers: list[nn.Module] = []
    for d_in, d_out in ((in_dim, hidden), (hidden, hidden)):
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, out_dim))
