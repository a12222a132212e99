"""BackPACK extensions that fold a :class:`~laplace_metric.pairs.PairGraph` in at
every layer.

The batch is the ``B`` samples themselves (one side, no pair batch) and the back-propagated
columns are the per-sample square roots ``[R, B, D]``, the same work as stock BackPACK's
``DiagGGNExact``. At a layer with parameters, the per-sample pieces are coupled through the
graph (``sum_ij A_ij g_i g_j``) by the folds of :mod:`laplace_metric.curvature.folds`.
"""

from __future__ import annotations

import torch

from laplace_metric.curvature.backpack.extensions import KRON_WEIGHT_LAYERS, PairExtension
from laplace_metric.curvature.folds import (
    FOLD_CHUNK_ELEMENTS,
    fold_diag,
    fold_gram,
    fold_input_factor,
    fold_linear,
    fold_output_factor,
)
from laplace_metric.pairs.graph import PairGraph


class GraphExtension(PairExtension):
    """Base of the graph extensions: one side, the graph instead of pair signs.

    Parameters
    ----------
    savefield : str
        Attribute of each parameter the result is stored in.
    graph : PairGraph
        The batch's pair graph.
    root : torch.Tensor, optional
        Per-sample square-root columns ``[R, B, D]``.
    """

    def __init__(self, savefield: str, graph: PairGraph, root: torch.Tensor | None = None):
        ones = torch.ones(graph.n_samples, dtype=graph.matrix.dtype, device=graph.matrix.device)
        super().__init__(savefield, ones, 1, root)
        self.graph = graph


class GraphDiagGGN(GraphExtension):
    """Diagonal of the signed pairwise GGN, stored in ``param.graph_diag_ggn``.

    A weight used once per sample (Linear on ``(batch, features)``) is folded from its output
    columns and inputs without forming per-sample gradients; a shared weight (convolution,
    tokens) forms its per-sample gradients for a few columns at a time.
    """

    def __init__(self, graph: PairGraph, root: torch.Tensor | None = None):
        super().__init__("graph_diag_ggn", graph, root)
        self._linear: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _fold_linear(self, q: torch.Tensor, x: torch.Tensor, bp: torch.Tensor):
        """Weight and bias diagonals of the layer whose output columns are ``bp`` (computed
        once for both parameters)."""
        if self._linear is None or self._linear[0] is not bp:
            self._linear = (bp, fold_linear(q, x, self.graph))
        return self._linear[1]

    def parameter_quantity(self, layer, module, name, bp):
        if isinstance(module, KRON_WEIGHT_LAYERS):
            q, x = layer.weight_views(self, module, bp)  # [R, 1, B, T, out], [1, B, T, in]
            q, x = q[:, 0], x[0]
            if q.shape[2] == 1:
                weight, bias = self._fold_linear(q[:, :, 0], x[:, 0], bp)
                return bias if name == "bias" else weight.reshape(module.weight.shape)
        if name == "weight" and isinstance(module, KRON_WEIGHT_LAYERS):  # shared weight
            per_column = q.shape[1] * q.shape[3] * x.shape[2]
            step = max(1, FOLD_CHUNK_ELEMENTS // per_column)
            diag = None
            for start in range(0, q.shape[0], step):
                grads = torch.einsum("rbto,bti->rboi", q[start : start + step], x)
                part = fold_diag(grads, self.graph)
                diag = part if diag is None else diag + part
            return diag.reshape(module.weight.shape)
        return fold_diag(layer.pair_gradients(self, module, name, bp), self.graph)


class GraphKronGGN(GraphExtension):
    """Difference-only Kronecker factors of the signed pairwise GGN (``param.graph_kron_ggn``).

    Linear/Conv weights get ``[B, A]`` with ``B = sum_{r,t} Q_rt^T A Q_rt`` (``Q`` the output
    columns, ``A`` the pair graph) and the unnormalised ``A = sum_t X_t^T C X_t / T`` (``C``
    the unsigned input graph); this equals the per-pair ``B = sum_m s_m Q Q^T`` with
    ``Q = S'_a - S'_b`` and ``A = sum_m e e^T / T`` with ``e = (x_a - x_b) / 2``. Every 1-D
    parameter gets its exact dense signed block.
    """

    def __init__(self, graph: PairGraph, root: torch.Tensor | None = None):
        super().__init__("graph_kron_ggn", graph, root)

    def parameter_quantity(self, layer, module, name, bp):
        if name == "weight" and isinstance(module, KRON_WEIGHT_LAYERS):
            q, x = layer.weight_views(self, module, bp)
            return [fold_output_factor(q[:, 0], self.graph), fold_input_factor(x[0], self.graph)]
        param = getattr(module, name)
        if param.ndim != 1:
            raise NotImplementedError(
                f"Kronecker structure does not support the {param.ndim}-D parameter '{name}' "
                f"of {type(module).__name__}; use 'diag' or 'full'."
            )
        grads = layer.pair_gradients(self, module, name, bp)
        return [fold_gram(grads.flatten(start_dim=2), self.graph)]


class GraphGram(GraphExtension):
    """Per-sample factors ``u_i = J_i^T S_i`` as ``[R, B, numel]`` in ``param.graph_factor``
    (the dense structure folds them with :func:`~laplace_metric.curvature.folds.fold_gram`)."""

    def __init__(self, graph: PairGraph, root: torch.Tensor | None = None):
        super().__init__("graph_factor", graph, root)

    def parameter_quantity(self, layer, module, name, bp):
        return layer.pair_gradients(self, module, name, bp).flatten(start_dim=2)
