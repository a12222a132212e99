"""The per-pair path of the hook backend: a pair batch whose graph reproduces the pair sums."""

from __future__ import annotations

import torch

from laplace_metric.curvature.graph import PairGraph
from laplace_metric.likelihoods.base import PairTerms


def pair_batch(
    inputs: torch.Tensor, terms: PairTerms
) -> tuple[torch.Tensor, torch.Tensor, PairGraph]:
    """The pair batch ``cat([x_a, x_b])`` and a graph that reproduces the per-pair sums on it
    (each pair a two-sample component)."""
    first, second, signs = terms.pairs.first, terms.pairs.second, terms.signs
    m = len(signs)
    idx = torch.arange(m, device=signs.device)
    if terms.one_sided:
        matrix = torch.diag(signs)
        graph = PairGraph(matrix, torch.diag(torch.ones_like(signs)), matrix, m)
        return inputs[second], terms.second_factor, graph
    a, b = idx, idx + m
    # the GGN of V_m = u_a + u_b; the Kronecker factors of Q_m = q_a - q_b and
    # e_m = (x_a - x_b) / 2, as in the reference's per-pair path (the second factor
    # carries the pair's minus sign)
    matrix = signs.new_zeros(2 * m, 2 * m)
    outputs = signs.new_zeros(2 * m, 2 * m)
    diff = signs.new_zeros(2 * m, 2 * m)
    for i, j, cross in ((a, a, 1.0), (b, b, 1.0), (a, b, -1.0), (b, a, -1.0)):
        matrix[i, j] = signs
        outputs[i, j] = cross * signs
        diff[i, j] = cross / 4
    rows = torch.cat([inputs[first], inputs[second]])
    factor = torch.cat([terms.first_factor, terms.second_factor])
    return rows, factor, PairGraph(matrix, diff, outputs, m)
