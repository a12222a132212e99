"""Shared fixtures: devices, small float64 encoders and pair-labelled data."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import laplace_metric  # noqa: F401  (registers the likelihoods)

# Tiny test tensors: one intra-op thread avoids oversubscription on small CI machines.
torch.set_num_threads(int(os.environ.get("LAPLACE_METRIC_TEST_THREADS", "1")))

DEVICES = [pytest.param("cpu", id="cpu")]
if torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def make_mlp(in_dim: int = 5, hidden: int = 7, out_dim: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, out_dim),
    ).double()


def make_cnn(out_dim: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(2, 3, 2, stride=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, out_dim),
    ).double()


def labelled_data(n: int, input_shape: tuple[int, ...], n_classes: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *input_shape), generator=gen, dtype=torch.float64)
    y = torch.arange(n) % n_classes
    y = y[torch.randperm(n, generator=gen)]
    return x, y


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """Tests that run the demo or a benchmark in-process set torch's thread count; restore it
    so that later tests (bit-for-bit comparisons with a one-thread child process) are
    unaffected."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
