"""The per-pair path of the hook backend: a pair batch whose graph reproduces the pair sums."""

from __future__ import annotations

import torch

from laplace_metric.likelihoods.base import PairTerms
from laplace_metric.pairs.graph import PairGraph


def pair_batch(
    inputs: torch.Tensor, terms: PairTerms
) -> tuple[torch.Tensor, torch.Tensor, PairGraph]:
    """The pair batch ``cat([x_a, x_b])`` and a graph that reproduces the per-pair sums on it
    (each pair a two-sample component)."""
    first, second, signs = terms.pairs.first, terms.pairs.second, terms.signs
    graph = PairGraph.of_pair_batch(signs, terms.one_sided)
    if terms.one_sided:
        return inputs[second], terms.second_factor, graph
    rows = torch.cat([inputs[first], inputs[second]])
    return rows, torch.cat([terms.first_factor, terms.second_factor]), graph
