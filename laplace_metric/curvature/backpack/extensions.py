"""BackPACK extensions for pairwise GGNs: diagonal, Kronecker factors and per-pair factors.

Each extension is run on a *pair batch* (see :mod:`.base`): the pairs' first samples followed
by their second samples (``n_sides=2``) or the second samples alone (``n_sides=1``). The
square-root columns ``[R, rows, D]`` enter at :class:`~.root.PairRoot` and are back-propagated
through the network by BackPACK's hooks. At a layer with parameters, the per-sample pieces of a
pair are added *before* squaring, which makes the result the exact pairwise GGN
``sum_m s_m V_m V_m^T`` with ``V_m = J_a^T S_a + J_b^T S_b``.
"""

from __future__ import annotations

from typing import Any

import torch
from backpack.extensions.backprop_extension import BackpropExtension
from torch import nn

from laplace_metric.curvature.backpack.activations import activation_extensions
from laplace_metric.curvature.backpack.base import PairModuleExtension, ParamModuleExtension
from laplace_metric.curvature.backpack.batchnorm import PairBatchNorm
from laplace_metric.curvature.backpack.conv import PairConv1d, PairConv2d
from laplace_metric.curvature.backpack.linear import PairLinear
from laplace_metric.curvature.backpack.pooling import pooling_extensions
from laplace_metric.curvature.backpack.root import PairRoot, PairRootExtension
from laplace_metric.curvature.backpack.shape import shape_extensions

#: Layers with a Kronecker-factored weight.
KRON_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def module_extensions() -> dict[type[nn.Module], PairModuleExtension]:
    """Module class -> pairwise module extension, for every supported layer."""
    return {
        PairRoot: PairRootExtension(),
        nn.Linear: PairLinear(),
        nn.Conv1d: PairConv1d(),
        nn.Conv2d: PairConv2d(),
        nn.BatchNorm1d: PairBatchNorm(),
        nn.BatchNorm2d: PairBatchNorm(),
        **activation_extensions(),
        **pooling_extensions(),
        **shape_extensions(),
    }


#: Every module class the pairwise extensions support (besides containers).
SUPPORTED_MODULES: tuple[type[nn.Module], ...] = tuple(
    cls for cls in module_extensions() if cls is not PairRoot
)


class PairExtension(BackpropExtension):
    """Base of the pairwise extensions.

    Parameters
    ----------
    savefield : str
        Attribute of each parameter the result is stored in.
    signs : torch.Tensor
        Pair signs ``s_m``, shape ``(M,)``.
    n_sides : {1, 2}
        Samples per pair in the pair batch.
    root : torch.Tensor, optional
        Square-root columns ``[R, n_sides * M, D]``; may be set after the forward pass.
    """

    def __init__(
        self,
        savefield: str,
        signs: torch.Tensor,
        n_sides: int,
        root: torch.Tensor | None = None,
    ) -> None:
        if n_sides not in (1, 2):
            raise ValueError(f"n_sides must be 1 or 2, got {n_sides}.")
        super().__init__(savefield=savefield, module_exts=module_extensions(), fail_mode="ERROR")
        self.signs = signs
        self.n_sides = n_sides
        self.root = root

    def expects_backpropagation_quantities(self) -> bool:
        """Second-order: the columns travel through the graph."""
        return True

    def accumulate_backpropagated_quantities(
        self, existing: torch.Tensor, other: torch.Tensor
    ) -> torch.Tensor:
        """Columns reaching a tensor along several branches add up."""
        return existing + other

    def parameter_quantity(
        self, layer: ParamModuleExtension, module: nn.Module, name: str, bp: torch.Tensor
    ) -> Any:
        """The quantity stored for ``module.<name>`` given the columns at the layer output."""
        raise NotImplementedError


class PairDiagGGN(PairExtension):
    """Diagonal of the signed pairwise GGN, stored in ``param.pair_diag_ggn``.

    For a weight used once per sample (a Linear layer on ``(batch, features)``), the square
    of the pair's gradient ``S_a x_a^T + S_b x_b^T`` is expanded as
    ``S_a^2 x_a^2 + S_b^2 x_b^2 + 2 S_a S_b x_a x_b``, so no per-pair gradient is formed;
    otherwise the per-pair gradients of one layer are formed and squared.
    """

    def __init__(self, signs: torch.Tensor, n_sides: int, root: torch.Tensor | None = None):
        super().__init__("pair_diag_ggn", signs, n_sides, root)

    def parameter_quantity(self, layer, module, name, bp):
        if name == "weight" and isinstance(module, KRON_WEIGHT_LAYERS):
            q, x = layer.weight_views(self, module, bp)
            if q.shape[3] == 1:
                return self._folded_square(q[:, :, :, 0], x[:, :, 0]).reshape(module.weight.shape)
        grads = layer.pair_gradients(self, module, name, bp)
        return torch.einsum("m,rm...->...", self.signs, grads.square())

    def _folded_square(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``sum_m s_m sum_r (sum_side q x^T)^2`` from ``q [R, S, M, out]``, ``x [S, M, in]``."""
        s = self.signs[:, None]
        diag = (s * q[:, 0].square().sum(0)).T @ x[0].square()
        if self.n_sides == 2:
            diag = diag + (s * q[:, 1].square().sum(0)).T @ x[1].square()
            cross = (s * (q[:, 0] * q[:, 1]).sum(0)).T @ (x[0] * x[1])
            diag = diag + 2 * cross
        return diag


class PairKronGGN(PairExtension):
    """Difference-only Kronecker factors of the signed pairwise GGN (``param.pair_kron_ggn``).

    Linear/Conv weights get ``[B, A]`` with ``B = sum_m s_m sum_{t,r} Q Q^T`` and the
    unnormalised ``A = sum_m sum_t e e^T / T``, where ``Q = S'_a - S'_b`` and
    ``e = (x_a - x_b) / 2`` (or ``Q = S'_b``, ``e = x_b`` for one-sided pairs); every other
    parameter gets its exact dense signed block ``[sum_m s_m V_m V_m^T]``.
    """

    def __init__(self, signs: torch.Tensor, n_sides: int, root: torch.Tensor | None = None):
        super().__init__("pair_kron_ggn", signs, n_sides, root)

    def parameter_quantity(self, layer, module, name, bp):
        if name == "weight" and isinstance(module, KRON_WEIGHT_LAYERS):
            q, x = layer.weight_views(self, module, bp)
            if self.n_sides == 2:
                q, e = q[:, 0] - q[:, 1], (x[0] - x[1]) / 2
            else:
                q, e = q[:, 0], x[0]
            b = torch.einsum("m,rmto,rmtp->op", self.signs, q, q)
            a = torch.einsum("mti,mtj->ij", e, e) / e.shape[1]
            return [b, a]
        param = getattr(module, name)
        if param.ndim != 1:
            raise NotImplementedError(
                f"Kronecker structure does not support the {param.ndim}-D parameter '{name}' "
                f"of {type(module).__name__}; use 'diag' or 'full'."
            )
        grads = layer.pair_gradients(self, module, name, bp)
        return [torch.einsum("m,rmp,rmq->pq", self.signs, grads, grads)]


class PairFactor(PairExtension):
    """Per-pair factors ``V_m^T`` as ``[R, M, numel]`` in ``param.pair_factor``.

    With one side and identity columns this is the per-sample Jacobian of the output.
    """

    def __init__(self, signs: torch.Tensor, n_sides: int, root: torch.Tensor | None = None):
        super().__init__("pair_factor", signs, n_sides, root)

    def parameter_quantity(self, layer, module, name, bp):
        grads = layer.pair_gradients(self, module, name, bp)
        return grads.flatten(start_dim=2)
