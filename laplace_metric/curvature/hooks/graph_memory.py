"""The memory of the forward graph that :class:`~laplace_metric.curvature.hooks.HookPairGGN`
keeps for its backward passes.

A fit runs one forward pass of the batch and keeps its graph while every column is
back-propagated; the predictive repeats each sample once per output dimension. The tensors
that graph saves (activations, attention weights, normalisation statistics) are measured on a
one-sample probe pass with :func:`torch.autograd.graph.saved_tensors_hooks`, together with the
recorded layer inputs and outputs that the backend keeps besides, and scaled by the number of
rows: on a ViT-Tiny-size encoder 18 MB per image (10.3 MB saved by autograd, 6.7 MB of layer
outputs, 1.3 MB of layer inputs), 1.2 GB for a batch of 64, which a fit used on top of its
budget before it was counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

from laplace_metric.memory import check_fits, format_bytes


class SampleProbe(NamedTuple):
    """What the backend learns from one recorded forward pass of one sample."""

    #: Elements of the sample's site outputs and embedding (sizes the column chunks).
    elements: int
    #: Parameters some site covers (the others need ``torch.func`` or row expansion).
    covered: frozenset[str]
    #: Bytes the pass keeps per row: saved for backward, and the recorded site tensors.
    kept_bytes: int


def saved_bytes(module: nn.Module, run: Callable[[], Iterable[torch.Tensor] | None]) -> int:
    """Bytes of the distinct storages that ``run()`` saves for backward, and of the tensors it
    returns (what the caller keeps besides: recorded layer inputs and outputs), parameters
    and buffers excluded.

    Parameters
    ----------
    module : torch.nn.Module
        The module whose parameters (and buffers) exist anyway and are not counted.
    run : callable
        The forward pass to measure; it returns the other tensors it keeps alive, or ``None``.
    """
    exist = {t.untyped_storage().data_ptr() for t in module.parameters()}
    exist |= {t.untyped_storage().data_ptr() for t in module.buffers()}
    seen: dict[int, int] = {}

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exist:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        kept = run()
    for tensor in kept if kept is not None else ():
        count(tensor)
    return sum(seen.values())


def check_graph_fits(
    per_row: int, n_rows: int, budget: int | None, what: str, unit: str | None = None
) -> None:
    """A :class:`~laplace_metric.memory.MemoryBudgetError` if the graph of ``n_rows`` rows of
    ``per_row`` bytes each exceeds ``budget``, naming how many rows would fit.

    A graph within the budget leaves the rest to the passes, which never go below their
    smallest chunking (:data:`~laplace_metric.curvature.budget.MIN_ELEMENTS`).

    Parameters
    ----------
    per_row : int
        Bytes the forward graph saves per row.
    n_rows : int
        Rows of the forward pass.
    budget : int or None
        The memory budget (``None``: no check).
    what : str
        What keeps the graph, e.g. ``"the forward graph of a batch of 64 samples"``.
    unit : str, optional
        The advice, with ``{k}`` the rows that would fit, e.g.
        ``"batches of at most {k} samples"`` (``None``: no advice on the rows).
    """
    if budget is None:
        return
    fits = int(budget // max(per_row, 1))
    alternatives = [unit.format(k=fits)] if unit and 0 < fits < n_rows else []
    check_fits(
        per_row * n_rows,
        budget,
        f"{what} ({format_bytes(per_row)} per row, kept for the backward passes)",
        alternatives,
    )
