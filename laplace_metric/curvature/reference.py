"""Exact reference curvature from explicit per-sample Jacobians (``torch.func``).

Materialises the per-pair factors ``V_m`` of shape ``(M, P, R)``: use it for small networks,
as the ground truth in tests, and as the fallback for layers the fast backends do not support.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from laplace.utils import Kron
from torch import nn
from torch.func import functional_call, jacrev

from laplace_metric.curvature.base import PairCurvatureInterface
from laplace_metric.curvature.folds import (
    fold_diag,
    fold_gram,
    fold_input_factor,
    fold_output_factor,
)
from laplace_metric.curvature.layers import unfold_input
from laplace_metric.pairs.terms import GraphTerms, PairTerms

KRON_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def pair_factors(jac: torch.Tensor, terms: PairTerms) -> torch.Tensor:
    """``V_m = J_a^T S_a + J_b^T S_b`` for every pair, shape ``(M, P, R)``."""
    first, second = terms.pairs.first, terms.pairs.second
    return torch.einsum("mdp,mdr->mpr", jac[first], terms.first_factor) + torch.einsum(
        "mdp,mdr->mpr", jac[second], terms.second_factor
    )


def signed_gram(factors: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``sum_m s_m V_m V_m^T`` for ``V`` of shape ``(M, P, R)`` as two matrix products."""
    result = 0
    for sign, keep in ((1.0, signs > 0), (-1.0, signs < 0)):
        scaled = factors[keep] * signs[keep].abs().sqrt()[:, None, None]
        rows = scaled.transpose(1, 2).reshape(-1, factors.shape[1])
        if rows.numel():
            result = result + sign * (rows.T @ rows)
    if isinstance(result, int):
        return factors.new_zeros(factors.shape[1], factors.shape[1])
    return result


class ReferencePairGGN(PairCurvatureInterface):
    """Exact pairwise GGN from ``torch.func`` Jacobians (diag, Kronecker, full).

    The Kronecker factors use the difference-only factorisation at Linear and Conv weights:
    with ``e = (x_a - x_b) / 2`` (layer inputs, per location ``t``) and ``Q = S'_a - S'_b``
    (the pair's square-root columns back-propagated to the layer output),
    ``B = sum_m s_m sum_{t, r} Q Q^T`` and ``A = sum_m sum_t e e^T / T``. For
    ``hessian_method='fixed'`` the free sample alone is used (``Q = S'_b``, ``e = x_b``).
    1-D parameters (biases, norm scales) get their exact dense block.
    """

    def _functional(self, module: nn.Module, inputs: Any):
        params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}
        frozen = {k: v.detach() for k, v in module.named_parameters() if not v.requires_grad}
        buffers = dict(module.named_buffers())

        def forward(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            out = functional_call(module, ({**p, **frozen}, buffers), (inputs,))
            return out, out

        return forward, params

    def _raw_jacobians(self, module: nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        forward, params = self._functional(module, inputs)
        with warnings.catch_warnings():
            # attention's backward has no vmap batching rule yet: torch falls back to a loop
            warnings.filterwarnings("ignore", message="There is a performance drop")
            jac, g = jacrev(forward, has_aux=True)(params)
        jac = torch.cat([j.flatten(start_dim=2) for j in jac.values()], dim=2)
        return jac, g

    def _factors(self, module: nn.Module, inputs: Any, terms: PairTerms) -> torch.Tensor:
        jac, _ = self._raw_jacobians(module, inputs)
        return pair_factors(jac, terms)

    def _diag(self, module, inputs, g, terms):
        factors = self._factors(module, inputs, terms)
        return torch.einsum("m,mpr->p", terms.signs, factors.square())

    def _full(self, module, inputs, g, terms):
        factors = self._factors(module, inputs, terms)
        return signed_gram(factors, terms.signs)

    def _kron(self, module, inputs, g, terms):
        factors = self._factors(module, inputs, terms)
        return self._kron_blocks(
            module,
            inputs,
            lambda block: signed_gram(block, terms.signs),
            lambda sub, x, sens: kron_weight_factors(sub, x, sens, terms),
            factors,
        )

    # ------------------------------------------------------------------ pair graph
    def _sample_factors(self, module: nn.Module, inputs: Any, terms: GraphTerms) -> torch.Tensor:
        """``u_i = J_i^T S_i`` for every sample and column, ``[R, B, P]``."""
        jac, _ = self._raw_jacobians(module, inputs)
        return torch.einsum("bdp,bdr->rbp", jac, terms.factor)

    def _graph_diag(self, module, inputs, g, terms):
        return fold_diag(self._sample_factors(module, inputs, terms), terms.graph)

    def _graph_full(self, module, inputs, g, terms):
        return fold_gram(self._sample_factors(module, inputs, terms), terms.graph)

    def _graph_kron(self, module, inputs, g, terms):
        factors = self._sample_factors(module, inputs, terms).permute(1, 2, 0)  # [B, P, R]

        def weight_factors(sub, x, sens):
            q = output_columns(sub, sens, terms.factor).permute(3, 0, 1, 2)  # [R, B, T, out]
            cols = unfold_input(sub, x)
            return [fold_output_factor(q, terms.graph), fold_input_factor(cols, terms.graph)]

        return self._kron_blocks(
            module,
            inputs,
            lambda block: fold_gram(block.permute(2, 0, 1), terms.graph),
            weight_factors,
            factors,
        )

    def _kron_blocks(self, module, inputs, dense_block, weight_factors, factors) -> Kron:
        """Walk the parameters: Kronecker factors for Linear/Conv weights (``weight_factors``
        from the layer, its inputs and sensitivities), a dense block for 1-D parameters
        (``dense_block`` of the factors' columns ``[M or B, size, R]``)."""
        layer_inputs, sensitivities = layer_sensitivities(module, inputs)
        kfacs, offset = [], 0
        for name, sub in module.named_modules():
            for pname, param in sub.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                size = param.numel()
                if param.ndim == 1:
                    kfacs.append([dense_block(factors[:, offset : offset + size]).contiguous()])
                elif isinstance(sub, KRON_LAYERS) and pname == "weight":
                    parts = weight_factors(sub, layer_inputs[name], sensitivities[name])
                    kfacs.append([part.contiguous() for part in parts])
                else:
                    raise ValueError(
                        f"Kronecker structure does not support the {param.ndim}-D parameter "
                        f"'{name}.{pname}' of {type(sub).__name__}; supported: "
                        "Linear/Conv1d/Conv2d weights and 1-D parameters. Use 'diag' or 'full'."
                    )
                offset += size
        return Kron(kfacs)


def layer_sensitivities(
    module: nn.Module, inputs: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs of every Linear/Conv layer and the per-sample Jacobian of the output w.r.t. it.

    Returns
    -------
    layer_inputs : dict
        ``name -> (batch, *in_shape)``.
    sensitivities : dict
        ``name -> (batch, D, *out_shape)``, ``d g_n / d out_n`` of the layer's output.
    """
    layers = {
        name: sub
        for name, sub in module.named_modules()
        if isinstance(sub, KRON_LAYERS) and sub.weight.requires_grad
    }
    layer_inputs: dict[str, torch.Tensor] = {}
    out_shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
    probes: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(mod, args, out):
            if name in probes:
                return out + probes[name]
            layer_inputs[name] = args[0].detach()
            out_shapes[name] = (out.shape, out.dtype)
            return None

        return hook

    handles = [sub.register_forward_hook(make_hook(n)) for n, sub in layers.items()]
    try:
        with torch.no_grad():
            module(inputs)

        def forward(p: dict[str, torch.Tensor]) -> torch.Tensor:
            probes.update(p)
            return module(inputs)

        zeros = {
            # probes in the layer's output dtype: integer inputs (token ids) have no gradient
            n: torch.zeros(shape, dtype=dtype, device=inputs.device)
            for n, (shape, dtype) in out_shapes.items()
        }
        with torch.no_grad(), warnings.catch_warnings():
            # a function transform: differentiates w.r.t. the probes only; attention's
            # backward has no vmap batching rule yet (torch falls back to a loop)
            warnings.filterwarnings("ignore", message="There is a performance drop")
            jac = jacrev(forward)(zeros)
    finally:
        probes.clear()
        for handle in handles:
            handle.remove()
    batch = inputs.shape[0]
    index = torch.arange(batch, device=inputs.device)
    # jac[n]: (B, D, B, *out) -> per-sample diagonal (B, D, *out)
    sensitivities = {n: j[index, :, index] for n, j in jac.items()}
    return layer_inputs, sensitivities


def output_columns(layer: nn.Module, sens: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Back-propagated square-root columns at the layer output, ``(M, T, out, R)``.

    ``sens`` is ``(M, D, *out_shape)`` and ``factor`` is ``(M, D, R)``.
    """
    if isinstance(layer, nn.Linear):
        sens = sens.reshape(sens.shape[0], sens.shape[1], -1, sens.shape[-1])  # (M, D, T, out)
        return torch.einsum("mdto,mdr->mtor", sens, factor)
    sens = sens.flatten(start_dim=3)  # (M, D, C_out, T)
    return torch.einsum("mdot,mdr->mtor", sens, factor)


def kron_weight_factors(
    layer: nn.Module, layer_input: torch.Tensor, sens: torch.Tensor, terms: PairTerms
) -> list[torch.Tensor]:
    """``[B, A]`` of a Linear/Conv weight from the pairs' columns and inputs."""
    cols = unfold_input(layer, layer_input)  # (B, T, fan_in)
    first, second = terms.pairs.first, terms.pairs.second
    q_b = output_columns(layer, sens[second], terms.second_factor)
    if terms.one_sided:
        q, e = q_b, cols[second]
    else:
        q = output_columns(layer, sens[first], terms.first_factor) - q_b
        e = (cols[first] - cols[second]) / 2
    n_locations = cols.shape[1]
    b = torch.einsum("m,mtor,mtpr->op", terms.signs, q, q)
    a = torch.einsum("mti,mtj->ij", e, e) / n_locations
    return [b.contiguous(), a.contiguous()]
