"""Exact graph-folded diagonals of the hook backend, one form per weight chosen by cost.

A weight used once per sample (a Linear on ``(B, in)``) folds with
:func:`~laplace_metric.curvature.graph.fold_linear`. A weight shared over locations (conv
positions, tokens) takes the cheapest of three exact forms (see
:mod:`~laplace_metric.curvature.hooks.locations`):

* ``per_column``: per-sample gradients ``G_ri`` a block of output rows at a time, folded
  centred with :func:`~laplace_metric.curvature.hooks.folds.fold_diag` (cost ``R B out in T``);
* ``gram``: location Gram matrices of whole components (cost grows with ``(k T)^2`` per
  component of ``k`` samples);
* ``split``: per-sample location Grams plus explicit component sums, for graphs of
  ``a I + b 1 1^T`` components (cost independent of ``k``).

The Gram accumulators live across column chunks; together they hold at most
``4 * max_elements`` numbers (the weights saving the most work per kept number first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from laplace_metric.curvature.folds import fold_diag, fold_linear
from laplace_metric.curvature.hooks.locations import (
    CACHE_ELEMENTS,
    GraphGram,
    SplitGram,
    graph_costs,
    split_costs,
)
from laplace_metric.curvature.hooks.passes import ColumnPass, row_slices
from laplace_metric.curvature.hooks.sites import Site, SiteKind, weight_grads
from laplace_metric.pairs.graph import PairGraph

#: Fewest output rows of one block of per-sample gradients (a matrix product of fewer rows is
#: memory-bound), unless the memory budget allows fewer.
MIN_ROWS = 32
#: The forms ``location_gram`` may force (``True``: the cheaper of both).
GRAM_FORMS = ("gram", "split")


@dataclass(frozen=True)
class GramPolicy:
    """How shared weights are folded: ``location_gram`` (``None``: by cost; ``False``:
    per-column; ``True``: a Gram form; ``'gram'``/``'split'``: that form) and the bound on the
    elements of one intermediate tensor."""

    location_gram: bool | str | None
    max_elements: int

    def __post_init__(self) -> None:
        if self.location_gram not in (None, True, False, *GRAM_FORMS):
            raise ValueError(
                f"location_gram must be None, True, False, 'gram' or 'split', got "
                f"{self.location_gram!r}."
            )


@dataclass
class _Option:
    saving: float
    elements: int
    form: str
    calls: list[tuple[Site, torch.Tensor]]
    n_locations: int


def _shared(name: str, calls: list | None) -> bool:
    """Whether ``name`` is a weight shared over locations (not a Linear on ``(B, in)``)."""
    if not calls or calls[0][0].kind == SiteKind.AFFINE or name != calls[0][0].weight:
        return False
    site = calls[0][0]
    return not (len(calls) == 1 and site.kind == SiteKind.LINEAR and site.n_locations == 1)


def _options(
    force: bool | str | None, graph: PairGraph, n_columns: int, calls: list
) -> list[_Option]:
    """The Gram-type forms of one shared weight worth keeping, cheapest first."""
    if force is False:
        return []
    site, q = calls[0]
    n_locations = sum(s.n_locations for s, _ in calls)
    shape = (graph, n_columns, n_locations, q.shape[-1], site.x.shape[-1])
    per_column, gram, elements = graph_costs(*shape)
    forms = [(gram, elements, "gram")]
    split = split_costs(*shape)
    if split is not None:
        forms.append((split[0], split[1], "split"))
    if force in GRAM_FORMS:
        forms = [f for f in forms if f[2] == force]
    elif force is None:
        forms = [f for f in forms if f[0] < per_column]
    return [
        _Option((per_column - cost) / max(n, 1), n, form, calls, n_locations)
        for cost, n, form in sorted(forms, key=lambda f: f[0])
    ]


def plan_location_grams(
    column_pass: ColumnPass, graph: PairGraph, n_columns: int, policy: GramPolicy
) -> dict[str, tuple[GraphGram | SplitGram, torch.Tensor]]:
    """Gram accumulators (and inputs) of the shared weights folded in a Gram form.

    Each weight's cheapest form is tried first (largest saving per kept number first), then
    its second form for the weights left out; together they keep at most
    ``4 * max_elements`` numbers. Weights without a plan take the per-column form.
    """
    options = {}
    for name, _ in column_pass.named_params():
        calls = column_pass.entries.get(name)
        if _shared(name, calls):
            options[name] = _options(policy.location_gram, graph, n_columns, calls)
    room, plan = 4 * policy.max_elements, {}
    for rank in (0, 1):
        pending = [(n, o[rank]) for n, o in options.items() if n not in plan and len(o) > rank]
        for name, option in sorted(pending, key=lambda p: -p[1].saving):
            if option.elements > room:
                continue
            room -= option.elements
            x = torch.cat([s.x for s, _ in option.calls], dim=1)
            if option.form == "split":
                gram = SplitGram(graph, option.n_locations, policy.max_elements, x)
            else:
                gram = GraphGram(graph, option.n_locations, policy.max_elements)
            plan[name] = (gram, x)
    return plan


class _ColumnBuffer:
    """Output gradients of the Gram-form weights, gathered over passes until they hold
    ``max_elements`` numbers, then added to the accumulators in one rank-``c`` update: a pass
    of few columns (large batches) would otherwise stream every accumulator once per column.
    """

    def __init__(self, grams: dict[str, tuple[Any, torch.Tensor]], max_elements: int) -> None:
        self.grams, self.max_elements = grams, max_elements
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.size = 0

    def add(self, name: str, q: torch.Tensor) -> None:
        self.pending.setdefault(name, []).append(q)
        self.size += q.numel()

    def flush(self, force: bool = False) -> None:
        if not force and self.size < self.max_elements:
            return
        for name in list(self.pending):
            chunks = self.pending.pop(name)
            self.grams[name][0].add(chunks[0] if len(chunks) == 1 else torch.cat(chunks))
        self.size = 0


def graph_diag(
    passes: Iterable[ColumnPass],
    graph: PairGraph,
    n_columns: int,
    policy: GramPolicy,
    plan: Callable[..., dict[str, tuple[Any, torch.Tensor]]] | None = None,
) -> torch.Tensor:
    """The exact graph-folded diagonal of all inferred parameters (flattened, concatenated).

    ``plan(first_pass, graph, n_columns, policy)`` (default :func:`plan_location_grams`)
    picks the weights folded in a Gram form; the others are folded chunk by chunk.
    """
    plan = plan_location_grams if plan is None else plan
    total: dict[str, torch.Tensor] = {}
    grams: dict[str, tuple[Any, torch.Tensor]] | None = None
    for column_pass in passes:
        if grams is None:
            grams = plan(column_pass, graph, n_columns, policy)
            buffer = _ColumnBuffer(grams, policy.max_elements)
        for name, param in column_pass.named_params():
            if name in grams:
                buffer.add(name, torch.cat([q for _, q in column_pass.entries[name]], dim=2))
                continue
            part = diag_block(column_pass, name, param, graph, policy.max_elements)
            total[name] = part if name not in total else total[name] + part
        buffer.flush()
    buffer.flush(force=True)
    params = column_pass.named_params()
    for name, param in params:
        if name in grams:
            gram, x = grams[name]
            total[name] = gram.diag(x).reshape(param.shape)
    return torch.cat([total[n].flatten() for n, _ in params])


def diag_block(
    column_pass: ColumnPass,
    name: str,
    param: torch.Tensor,
    graph: PairGraph,
    max_elements: int,
) -> torch.Tensor:
    """One column chunk's folded diagonal of one parameter (not in a Gram form)."""
    entries, others = column_pass.entries, column_pass.others
    if name in others:
        return fold_diag(others[name], graph)
    calls = entries.get(name)
    if calls is None:  # no recorded call reaches the output: zero curvature
        return torch.zeros_like(param)
    site, q = calls[0]
    if name == site.bias or site.kind == SiteKind.AFFINE:
        return fold_diag(column_pass.param_grads(name, param), graph).reshape(param.shape)
    if not _shared(name, calls):
        return fold_linear(q[:, :, 0], site.x[:, 0], graph)[0].reshape(param.shape)
    return per_column_diag(calls, graph, max_elements).reshape(param.shape)


def _sample_calls(
    calls: list[tuple[Site, torch.Tensor]], samples: torch.Tensor
) -> list[tuple[Site, torch.Tensor]]:
    """``calls`` restricted to ``samples`` (views where the samples are contiguous)."""
    start, stop = int(samples[0]), int(samples[-1]) + 1
    if stop - start == len(samples):

        def select(t: torch.Tensor, dim: int) -> torch.Tensor:
            return t.narrow(dim, start, stop - start)
    else:

        def select(t: torch.Tensor, dim: int) -> torch.Tensor:
            return t.index_select(dim, samples)

    return [
        (replace(s, inputs=select(s.x, 0), kind=SiteKind.LINEAR), select(q, 1)) for s, q in calls
    ]


def per_column_diag(
    calls: list[tuple[Site, torch.Tensor]], graph: PairGraph, max_elements: int
) -> torch.Tensor:
    """The folded diagonal ``(out, in)`` of a shared weight from its per-sample gradients.

    The gradients are formed a block of samples (whole components of the graph) times a block
    of at least :data:`MIN_ROWS` output rows at a time, each block about
    :data:`~laplace_metric.curvature.hooks.locations.CACHE_ELEMENTS` numbers: few rows make
    the per-sample products memory-bound (at a batch of 256, a cache-sized block of all
    samples held one to seven rows of a ResNet's convolutions, twice the time per image of a
    batch of 64), and blocks far over the cache slow the elementwise folds.
    """
    c, _, _, n_out = calls[0][1].shape
    n_in = calls[0][0].x.shape[-1]
    result = calls[0][1].new_zeros(n_out, n_in)
    target = max(1, CACHE_ELEMENTS // (MIN_ROWS * c * n_in))
    for samples, part in graph.component_chunks(target):
        chunk = calls if samples is None else _sample_calls(calls, samples)
        per_row = c * part.n_samples * n_in
        block = min(max_elements, max(MIN_ROWS * per_row, CACHE_ELEMENTS))
        for rows in row_slices(n_out, per_row, block):
            result[rows] += fold_diag(weight_grads(chunk, rows), part)
    return result
