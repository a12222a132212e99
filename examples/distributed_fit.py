"""Distributed post-hoc Laplace fit of a metric-learning encoder on digits.

Run on two CPU processes (gloo)::

    torchrun --nproc_per_node=2 examples/distributed_fit.py

Rank 0 trains a small contrastive encoder, broadcasts its weights, then every rank fits the
Laplace approximation on its shard of the training set (``DistributedSampler``). ``fit`` sums
the curvature, loss and counts over the ranks with one all-reduce, so every rank holds the same
posterior. With ``--check``, rank 0 also fits the whole training set alone and prints the
largest relative difference.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from laplace import Laplace
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import laplace_metric  # noqa: F401  (registers likelihood='contrastive')
from laplace_metric import ContrastiveLikelihood


def digits() -> TensorDataset:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    keep = y < 6  # in-distribution classes 0-5
    return TensorDataset(x[keep], y[keep])


def train(model: nn.Module, dataset: TensorDataset, epochs: int) -> None:
    likelihood = ContrastiveLikelihood(margin=1.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            optimiser.zero_grad()
            likelihood.loss(model(x), y, reduction="mean").backward()
            optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structure", default="kron", choices=["diag", "kron", "full"])
    parser.add_argument("--subset", default="all", choices=["all", "last_layer"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="compare with a one-process fit")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dataset = digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh())
    model.append(nn.Linear(128, 16))
    if rank == 0:
        train(model, dataset, args.epochs)
    for param in model.parameters():  # every rank must fit the same weights
        dist.broadcast(param.data, src=0)

    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler)
    la = Laplace(model, "contrastive", args.subset, args.structure)
    la.fit(loader)  # all-reduces over the ranks
    la.optimize_prior_precision(method="marglik", n_steps=50)
    scores = la.predictive_uncertainty(dataset.tensors[0][:5])
    print(
        f"rank {rank}/{world}: {la.n_data} samples, {la.n_pairs} pairs, "
        f"prior precision {float(la.prior_precision.mean()):.4g}, scores {scores.tolist()}",
        flush=True,
    )

    if args.check and rank == 0:
        # the same batches the ranks saw, in one process
        batches = []
        for r in range(world):
            shard = DistributedSampler(
                dataset, num_replicas=world, rank=r, shuffle=True, seed=0, drop_last=True
            )
            batches.extend(DataLoader(dataset, batch_size=64, sampler=shard))
        alone = Laplace(model, "contrastive", args.subset, args.structure)
        alone.fit(batches, distributed=False)
        ours = la.H_signed.kfacs if args.structure == "kron" else [[la.H_signed]]
        ref = alone.H_signed.kfacs if args.structure == "kron" else [[alone.H_signed]]
        worst = max(
            float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
            for fa, fb in zip(ours, ref)
            for a, b in zip(fa, fb)
        )
        print(f"max relative difference to a one-process fit: {worst:.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
