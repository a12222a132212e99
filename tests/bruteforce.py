"""Brute-force float64 references, written independently of the package's backends.

Everything here uses plain autograd on explicit per-sample quantities and explicit pair loops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from laplace.utils import Kron
from torch import nn
from torch.func import functional_call


def embedding_jacobian(
    module: nn.Module, inputs: torch.Tensor, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dz/dtheta`` of every sample, ``(B, D, P)``, with ``torch.autograd.functional``."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in module.named_parameters() if p.requires_grad]
    theta = torch.cat(
        [p.detach().flatten() for n, p in module.named_parameters() if p.requires_grad]
    )

    def embed(vector: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            params[name] = vector[offset : offset + size].view(shape)
            offset += size
        g = functional_call(module, params, (inputs,))
        return g / g.norm(dim=-1, keepdim=True) if normalize else g

    jac = torch.autograd.functional.jacobian(embed, theta)
    return jac, embed(theta).detach()


def pair_signs(z, y, margin, method):
    first, second = torch.triu_indices(len(y), len(y), offset=1)
    positive = y[first] == y[second]
    dist = (z[first] - z[second]).square().sum(-1)
    active = positive | (margin - dist > 0)
    signs = torch.where(positive, 1.0, -1.0).double() * active.double()
    if method == "positives":
        signs = signs * positive.double()
    return first, second, signs


def pairwise_ggn(jac, z, y, margin, method):
    """``sum_m s_m G_m`` with the explicit 2D x 2D pair Hessian, ``(P, P)``."""
    first, second, signs = pair_signs(z, y, margin, method)
    dim = z.shape[1]
    eye = torch.eye(dim, dtype=jac.dtype)
    if method == "fixed":
        hess = torch.block_diag(torch.zeros(dim, dim, dtype=jac.dtype), eye)
    else:
        hess = torch.cat([torch.cat([eye, -eye], 1), torch.cat([-eye, eye], 1)], 0)
    ggn = torch.zeros(jac.shape[-1], jac.shape[-1], dtype=jac.dtype)
    for a, b, s in zip(first.tolist(), second.tolist(), signs.tolist()):
        stacked = torch.cat([jac[a], jac[b]], 0)  # (2D, P)
        ggn += s * stacked.T @ hess @ stacked
    return ggn


def clip_psd(matrix):
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vecs @ torch.diag(vals.clamp(min=0)) @ vecs.T


def layer_quantities(module, inputs, normalize):
    """Per layer: inputs ``(B, *in)`` and ``dg_n/d out_n`` ``(B, D, *out)`` by autograd loops,
    plus the normalisation Jacobians ``P_n`` ``(B, D, D)``."""
    layers = {
        n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    }
    store_in, store_out = {}, {}

    def make_hook(name):
        def hook(mod, args, out):
            store_in[name] = args[0].detach()
            store_out[name] = out

        return hook

    hooks = [m.register_forward_hook(make_hook(n)) for n, m in layers.items()]
    g = module(inputs)
    for h in hooks:
        h.remove()
    batch, dim = g.shape
    sens = {n: torch.zeros((batch, dim, *store_out[n].shape[1:]), dtype=g.dtype) for n in layers}
    for b in range(batch):
        for d in range(dim):
            grads = torch.autograd.grad(g[b, d], [store_out[n] for n in layers], retain_graph=True)
            for n, grad in zip(layers, grads):
                sens[n][b, d] = grad[b]
    g = g.detach()
    eye = torch.eye(dim, dtype=g.dtype)
    if normalize:
        z = g / g.norm(dim=-1, keepdim=True)
        proj = (eye - z[:, :, None] * z[:, None, :]) / g.norm(dim=-1)[:, None, None]
    else:
        z, proj = g, eye.expand(batch, dim, dim)
    return layers, store_in, sens, z, proj


def unfold(layer, x):
    if isinstance(layer, nn.Linear):
        return x[:, None, :]
    if isinstance(layer, nn.Conv1d):
        return F.unfold(
            x[:, :, None, :],
            (1, layer.kernel_size[0]),
            padding=(0, layer.padding[0]),
            stride=(1, layer.stride[0]),
        ).transpose(1, 2)
    return F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride).transpose(
        1, 2
    )


def kron_factors(module, inputs, y, margin, method, normalize):
    """Difference-only Kronecker factors ``{layer: (B, A)}`` by explicit pair loops."""
    layers, store_in, sens, z, proj = layer_quantities(module, inputs, normalize)
    first, second, signs = pair_signs(z, y, margin, method)
    keep = signs != 0
    first, second, signs = first[keep], second[keep], signs[keep]
    out = {}
    for name, layer in layers.items():
        cols = unfold(layer, store_in[name])  # (B, T, fan_in)
        n_out = layer.weight.shape[0]
        b_fac = torch.zeros(n_out, n_out, dtype=z.dtype)
        a_fac = torch.zeros(cols.shape[-1], cols.shape[-1], dtype=z.dtype)
        for a, b, s in zip(first.tolist(), second.tolist(), signs.tolist()):
            s_a = sens[name][a].reshape(z.shape[1], n_out, -1)  # (D, out, T)
            s_b = sens[name][b].reshape(z.shape[1], n_out, -1)
            col_a = torch.einsum("dot,dr->tor", s_a, proj[a])  # W_a = I
            col_b = torch.einsum("dot,dr->tor", s_b, -proj[b])  # W_b = -I
            if method == "fixed":
                q, e = -col_b, cols[b]
            else:
                q, e = col_a - col_b, (cols[a] - cols[b]) / 2
            for t in range(q.shape[0]):
                b_fac += s * q[t] @ q[t].T
                a_fac += torch.outer(e[t], e[t]) / cols.shape[1]
        out[name] = (b_fac, a_fac / len(signs))
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_close(a, b, tol: float) -> None:
    """Diag/full tensors or Kron factors (layout included) within ``tol`` relative."""
    if isinstance(b, Kron):
        assert isinstance(a, Kron)
        assert [len(f) for f in a.kfacs] == [len(f) for f in b.kfacs]
        for fa, fb in zip(a.kfacs, b.kfacs):
            for ta, tb in zip(fa, fb):
                assert ta.shape == tb.shape
                assert rel_error(ta, tb) < tol
    else:
        assert a.shape == b.shape
        assert rel_error(a, b) < tol
