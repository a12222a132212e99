"""``AsdlPairGGN``: pairwise curvature from ASDL's per-example gradients.

``asdl.gradient.batch_gradient(model, closure, batch_size=K)`` returns per-example gradients
and, when the batch has ``K * c`` rows, sums each run of ``c`` consecutive rows. Arranging the
pair batch as ``(column r, pair m, side)`` rows, ``[x_a, x_b]`` per pair repeated for every
square-root column, and back-propagating the pair's columns ``S_a[:, r], S_b[:, r]`` from the
output, the consecutive sum gives ``V_m[:, r] = J_a^T S_a[:, r] + J_b^T S_b[:, r]`` directly
(``J_a - J_b`` for the contrastive ``S = (I, -I)``). The factors are formed for a chunk of
columns at a time, so memory is bounded by :attr:`AsdlPairGGN.max_gradient_elements`.

Kronecker factors are built from the layer inputs and output gradients ASDL saves
(``asdl.core.save_inputs_outgrads``) for Linear and Conv2d layers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from laplace.utils import Kron
from torch import nn

from laplace_metric.curvature.base import PairCurvatureInterface
from laplace_metric.curvature.folds import (
    fold_diag,
    fold_gram,
    fold_input_factor,
    fold_output_factor,
)
from laplace_metric.curvature.layers import (
    conv_unsupported_reason,
    pair_rows,
    private_copy,
    sync_copy,
    unfold_input,
)
from laplace_metric.pairs.terms import GraphTerms, PairTerms

#: Layers whose parameters ASDL computes per-example gradients for.
ASDL_PARAM_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
#: Layers with Kronecker-factored weights in :class:`AsdlPairGGN`.
ASDL_KRON_LAYERS = (nn.Linear, nn.Conv2d)


def asdl_unsupported_layers(model: nn.Module) -> list[str]:
    """Modules with trainable parameters whose gradients ASDL does not compute."""
    found = []
    for name, sub in model.named_modules():
        if not any(p.requires_grad for p in sub.parameters(recurse=False)):
            continue
        if not isinstance(sub, ASDL_PARAM_LAYERS):
            found.append(f"{name or type(model).__name__} ({type(sub).__name__})")
        elif isinstance(sub, nn.Conv2d) and conv_unsupported_reason(sub):
            found.append(f"{name} (Conv2d {conv_unsupported_reason(sub)})")
        elif isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d)) and (
            sub.training or not sub.affine or sub.running_var is None
        ):
            found.append(f"{name} ({type(sub).__name__} not in affine evaluation mode)")
    return found


class AsdlPairGGN(PairCurvatureInterface):
    """Pairwise GGN (diag, Kronecker, full) and Jacobians with ASDL (``asdfghjkl``).

    Parameters with per-example gradients: Linear, Conv2d (``groups=1``, zero padding),
    BatchNorm1d/2d (affine, evaluation mode), LayerNorm; any parameter-free layer. Kronecker
    structure: Linear and Conv2d weights and biases. Other layers raise a ``ValueError``
    naming them (use :class:`~laplace_metric.curvature.BackPackPairGGN` or
    :class:`~laplace_metric.curvature.ReferencePairGGN`).

    Parameters
    ----------
    model, likelihood, last_layer, subnetwork_indices
        See :class:`~laplace_metric.curvature.PairCurvatureInterface`.
    """

    #: Upper bound on the elements of the per-example gradients formed at once.
    max_gradient_elements: int = 2**26

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._copy: tuple[nn.Module, nn.Module] | None = None

    def _private(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` synchronised with it: ASDL's temporary hooks never touch the
        user's model (a removed old-style hook would still block BackPACK and full hooks)."""
        if self._copy is None or self._copy[0] is not module:
            self._copy = (module, private_copy(module))
        sync_copy(module, self._copy[1])
        return self._copy[1]

    # ------------------------------------------------------------------ checks
    def _check(self, module: nn.Module, inputs: Any) -> None:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(
                f"AsdlPairGGN needs tensor inputs, got {type(inputs).__name__}; use "
                "ReferencePairGGN for dict-like inputs."
            )
        bad = asdl_unsupported_layers(module)
        if bad:
            raise ValueError(
                f"AsdlPairGGN does not support the layer(s) {', '.join(bad)}: ASDL computes "
                "per-example gradients for Linear, Conv2d, BatchNorm (eval) and LayerNorm only; "
                "use BackPackPairGGN (Conv1d too) or ReferencePairGGN (any layer)."
            )

    # ------------------------------------------------------------------ factors
    def _gradient_chunks(self, n_columns: int, n_rows: int) -> Iterator[slice]:
        per_column = max(n_rows * self._n_params(), 1)
        step = max(1, min(n_columns, self.max_gradient_elements // per_column))
        for start in range(0, n_columns, step):
            yield slice(start, min(start + step, n_columns))

    def _column_gradients(
        self, module: nn.Module, rows: torch.Tensor, root: torch.Tensor, n_groups: int
    ) -> Iterator[torch.Tensor]:
        """Per-group gradients of the columns ``root [R, rows, D]`` back-propagated from the
        output of the private copy, for chunks of columns, each ``[r, n_groups, P]``."""
        module = self._private(module)
        for cols in self._gradient_chunks(root.shape[0], rows.shape[0]):
            grad_out = root[cols].flatten(end_dim=1)
            yield grouped_gradients(module, rows, grad_out, cols.stop - cols.start, n_groups)

    def _factor_chunks(
        self, module: nn.Module, inputs: torch.Tensor, terms: PairTerms
    ) -> Iterator[torch.Tensor]:
        """``V`` for chunks of columns, each ``[r, M, P]``."""
        self._check(module, inputs)
        rows, factor, _ = pair_rows(inputs, terms, interleave=True)  # [M*S, ...], [M*S, D, R]
        return self._column_gradients(module, rows, factor.permute(2, 0, 1), len(terms.signs))

    def _diag(self, module, inputs, g, terms):
        total = None
        for factors in self._factor_chunks(module, inputs, terms):
            part = torch.einsum("m,rmp->p", terms.signs, factors.square())
            total = part if total is None else total + part
        return total

    def _full(self, module, inputs, g, terms):
        total = None
        for factors in self._factor_chunks(module, inputs, terms):
            flat = factors.flatten(end_dim=1)
            weights = terms.signs.repeat(factors.shape[0])[:, None]
            part = (flat * weights).T @ flat
            total = part if total is None else total + part
        return total

    # ------------------------------------------------------------------ pair graph
    def _sample_factor_chunks(
        self, module: nn.Module, inputs: torch.Tensor, terms: GraphTerms
    ) -> Iterator[torch.Tensor]:
        """``u_i = J_i^T S_i`` for chunks of columns, each ``[r, B, P]``."""
        self._check(module, inputs)
        return self._column_gradients(module, inputs, terms.factor.permute(2, 0, 1), len(inputs))

    def _graph_diag(self, module, inputs, g, terms):
        parts = self._sample_factor_chunks(module, inputs, terms)
        return sum(fold_diag(factors, terms.graph) for factors in parts)

    def _graph_full(self, module, inputs, g, terms):
        parts = self._sample_factor_chunks(module, inputs, terms)
        return sum(fold_gram(factors, terms.graph) for factors in parts)

    def _graph_kron(self, module, inputs, g, terms):
        layers, module = self._kron_layers(module, inputs)
        out_grads = self._out_grads(module, layers, inputs, terms.factor.permute(2, 0, 1))
        kfacs = []
        for name, layer in layers:
            x, q = out_grads[name]
            cols, q = layer_locations(layer, x, q)  # [B, T, in], [R, B, T, out]
            if layer.weight.requires_grad:
                kfacs.append(
                    [fold_output_factor(q, terms.graph), fold_input_factor(cols, terms.graph)]
                )
            if layer.bias is not None and layer.bias.requires_grad:
                kfacs.append([fold_gram(q.sum(dim=2), terms.graph)])
        return Kron(kfacs)

    def _raw_jacobians(self, module: nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(module, inputs)
        module = self._private(module)
        with torch.no_grad():
            g = module(inputs)
        batch, dim = g.shape
        blocks = []
        for cols in self._gradient_chunks(dim, batch):
            n_cols = cols.stop - cols.start
            eye = torch.eye(dim, dtype=g.dtype, device=g.device)[cols]
            grad_out = eye[:, None, :].expand(n_cols, batch, dim).flatten(end_dim=1)
            blocks.append(grouped_gradients(module, inputs, grad_out, n_cols, batch))
        return torch.cat(blocks).transpose(0, 1), g

    # ------------------------------------------------------------------ Kronecker
    def _kron_layers(
        self, module: nn.Module, inputs: Any
    ) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
        """The layers with inferred parameters (Linear/Conv2d only) in the private copy."""
        self._check(module, inputs)
        layers = [
            (name, sub)
            for name, sub in module.named_modules()
            if any(p.requires_grad for p in sub.parameters(recurse=False))
        ]
        bad = [
            f"{n} ({type(s).__name__})" for n, s in layers if not isinstance(s, ASDL_KRON_LAYERS)
        ]
        if bad:
            raise ValueError(
                f"AsdlPairGGN builds Kronecker factors for Linear and Conv2d layers only, not "
                f"{', '.join(bad)}; use BackPackPairGGN or ReferencePairGGN."
            )
        module = self._private(module)
        return [(name, dict(module.named_modules())[name]) for name, _ in layers], module

    def _out_grads(
        self,
        module: nn.Module,
        layers: list[tuple[str, nn.Module]],
        rows: torch.Tensor,
        root: torch.Tensor,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Inputs and output gradients ``[R, rows, *out]`` of every layer for the columns."""
        from asdl.core import save_inputs_outgrads

        n_cols = root.shape[0]
        with quiet_asdl(), save_inputs_outgrads(module) as cxt:
            out = module(rows)
            for r in range(n_cols):  # one backward per square-root column
                out.backward(gradient=root[r], retain_graph=r + 1 < n_cols)
            saved = {
                name: (cxt.in_data(layer)[0], torch.stack(cxt.out_grads(layer)))
                for name, layer in layers
            }
        module.zero_grad(set_to_none=True)
        return saved

    def _kron(self, module, inputs, g, terms):
        layers, module = self._kron_layers(module, inputs)
        rows, factor, sides = pair_rows(inputs, terms, interleave=True)
        out_grads = self._out_grads(module, layers, rows, factor.permute(2, 0, 1))
        kfacs = []
        for name, layer in layers:
            x, q = out_grads[name]
            weight_factors, bias_block = pair_kron_layer(
                layer, x, q, terms.signs, sides, len(terms.signs)
            )
            if layer.weight.requires_grad:
                kfacs.append(weight_factors)
            if layer.bias is not None and layer.bias.requires_grad:
                kfacs.append([bias_block])
        return Kron(kfacs)


# ---------------------------------------------------------------------- helpers
@contextlib.contextmanager
def quiet_asdl() -> Iterator[None]:
    """Gradients on, and ASDL's expected warnings (old-style backward hooks) silenced."""
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a non-full backward hook")
        warnings.filterwarnings("ignore", message="Failed to lookup operations")
        yield


def grouped_gradients(
    module: nn.Module, rows: torch.Tensor, grad_out: torch.Tensor, n_cols: int, n_groups: int
) -> torch.Tensor:
    """ASDL per-group parameter gradients of ``module`` on ``rows`` repeated ``n_cols`` times.

    ``grad_out`` ``[n_cols * len(rows), D]`` is back-propagated; ASDL sums consecutive rows
    into ``n_cols * n_groups`` groups (one group a pair, or one sample). Returns
    ``[n_cols, n_groups, P]``.
    """
    from asdl.gradient import batch_gradient

    batch = rows.repeat(n_cols, *([1] * (rows.ndim - 1)))

    def closure():
        out = module(batch)
        out.backward(gradient=grad_out)
        return out

    with quiet_asdl():
        grads = batch_gradient(module, closure, batch_size=n_cols * n_groups)
    module.zero_grad(set_to_none=True)
    return grads.reshape(n_cols, n_groups, -1)


def layer_locations(
    layer: nn.Module, x: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer inputs ``[rows, T, fan_in]`` and output gradients ``[r, rows, T, out]``."""
    if isinstance(layer, nn.Conv2d):
        cols = unfold_input(layer, x)
        q = q.flatten(start_dim=3).transpose(-1, -2)
    else:
        cols = x.reshape(x.shape[0], -1, x.shape[-1])
        q = q.reshape(q.shape[0], q.shape[1], cols.shape[1], -1)
    return cols, q


def pair_kron_layer(
    layer: nn.Module,
    x: torch.Tensor,
    q: torch.Tensor,
    signs: torch.Tensor,
    sides: int,
    n_pairs: int,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([B, A], bias block)`` of one layer from its inputs ``x`` (rows) and output gradients
    ``q`` ``[r, rows, *out]`` of the interleaved pair batch."""
    cols, q = layer_locations(layer, x, q)
    cols = cols.reshape(n_pairs, sides, *cols.shape[1:])
    q = q.reshape(q.shape[0], n_pairs, sides, *q.shape[2:])
    if sides == 2:
        diff, e = q[:, :, 0] - q[:, :, 1], (cols[:, 0] - cols[:, 1]) / 2
    else:
        diff, e = q[:, :, 0], cols[:, 0]
    b = torch.einsum("m,rmto,rmtp->op", signs, diff, diff)
    a = torch.einsum("mti,mtj->ij", e, e) / e.shape[1]
    bias = q.sum(dim=(2, 3))  # [r, M, out]: the bias gradient of each pair
    bias_block = torch.einsum("m,rmo,rmp->op", signs, bias, bias)
    return [b, a], bias_block
