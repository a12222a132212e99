"""Kronecker factors of the hook backend (KFAC-expand / KFAC-reduce for shared weights)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

import torch
from laplace.utils import Kron

from laplace_metric.curvature.folds import fold_gram, fold_input_factor, fold_output_factor
from laplace_metric.curvature.hooks.passes import ColumnPass
from laplace_metric.curvature.hooks.sites import Site, SiteKind
from laplace_metric.pairs.graph import PairGraph


class KFACApproximation(str, Enum):
    """How Kronecker factors treat a weight shared over locations (tokens, conv positions).

    Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern Neural Network
    Architectures", NeurIPS 2023.
    """

    #: Locations are extra samples: ``B = sum_t Q_t^T A+ Q_t``, ``A = sum_t X_t^T C X_t / T``.
    EXPAND = "expand"
    #: Locations are summed out first: ``Q = sum_t q_t``, ``X = mean_t x_t``.
    REDUCE = "reduce"


def kron_factors(passes: Iterable[ColumnPass], graph: PairGraph, reduce: bool = False) -> Kron:
    """Kronecker factors of every inferred parameter, summed over the column passes.

    Linear/Conv weights get ``[fold_output_factor, fold_input_factor]`` (KFAC-reduce if
    ``reduce``, else KFAC-expand; see :class:`KFACApproximation`); 1-D parameters and
    parameters of shape ``(1, ...)`` their exact dense block; other parameters raise.
    """
    factors: dict[str, list[torch.Tensor]] = {}
    for column_pass in passes:
        for name, param in column_pass.named_params():
            calls = column_pass.entries.get(name)
            if (
                calls is not None
                and calls[0][0].kind != SiteKind.AFFINE
                and name == calls[0][0].weight
            ):
                _add_weight_factors(factors, name, calls, graph, reduce)
                continue
            if param.ndim >= 2 and param.shape[0] != 1:
                raise ValueError(
                    f"Kronecker structure does not support the {param.ndim}-D parameter "
                    f"'{name}' (no Linear/Conv call uses it); supported: Linear/Conv "
                    "weights, MultiheadAttention projections, 1-D parameters and "
                    "parameters of shape (1, ...). Use 'diag' or 'full'."
                )
            if calls is None and name not in column_pass.others:
                block = param.new_zeros(param.numel(), param.numel())
            else:
                grads = column_pass.param_grads(name, param)
                block = fold_gram(grads.flatten(start_dim=2), graph)
            factors[name] = [block] if name not in factors else [factors[name][0] + block]
    return _assemble(column_pass.named_params(), factors, graph)


def _add_weight_factors(
    factors: dict[str, list[torch.Tensor]],
    name: str,
    calls: list[tuple[Site, torch.Tensor]],
    graph: PairGraph,
    reduce: bool,
) -> None:
    """Add one column chunk's output factor (and, once, the input factor) of a weight."""
    q = torch.cat([q for _, q in calls], dim=2)
    if reduce:
        q = q.sum(dim=2, keepdim=True)
    out = fold_output_factor(q, graph)
    if name in factors:
        factors[name][0] = factors[name][0] + out
        return
    x = torch.cat([s.x for s, _ in calls], dim=1)
    if reduce:
        x = x.mean(dim=1, keepdim=True)
    factors[name] = [out, fold_input_factor(x, graph)]


def _assemble(
    params: list[tuple[str, torch.Tensor]], factors: dict[str, list[torch.Tensor]], graph: PairGraph
) -> Kron:
    """laplace-torch's ``Kron``; a ``(1, ...)`` parameter's exact dense block is stored as
    ``[[n_pairs]] (x) block / n_pairs`` (the estimator divides input factors by ``n_pairs``)."""
    kfacs = []
    for name, param in params:
        parts = factors[name]
        if param.ndim >= 2 and len(parts) == 1:
            n = max(graph.n_pairs, 1)
            parts = [parts[0].new_full((1, 1), float(n)), parts[0] / n]
        kfacs.append([p.contiguous() for p in parts])
    return Kron(kfacs)
