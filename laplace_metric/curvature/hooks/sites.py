"""Recording the layers of any module graph: the *sites* the hook backend differentiates at.

A site is one call of a layer whose parameter gradient is a contraction of the layer's input
with the gradient at its output (``q``): Linear and Conv1d/Conv2d weights and biases
(``G = sum_t q_t x_t^T``), the elementwise affine of LayerNorm and eval-mode BatchNorm
(``G = sum_t q_t * xhat_t``), and the packed input projection of ``nn.MultiheadAttention``
(recomputed in plain operations on the hooked copy, so its ``in_proj_weight`` and its
``out_proj`` become ordinary Linear sites). Forward hooks record the inputs; the outputs are
kept with their autograd graph so that one ``torch.autograd.grad`` call returns ``q`` at every
site for a batch of back-propagated columns. Any module graph works (residual connections,
attention, functional code), because nothing here knows how a layer propagates derivatives.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from laplace_metric.curvature.layers import unfold_input

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class SiteKind(str, Enum):
    """How a site's parameter gradient is formed from its input and output gradient."""

    #: ``weight (out, in)`` applied to the last dimension of ``(B, *, in)``.
    LINEAR = "linear"
    #: Convolution weight ``(out, in, *kernel)``; the input is unfolded into locations.
    CONV = "conv"
    #: Elementwise ``xhat * weight + bias`` (LayerNorm, eval-mode BatchNorm).
    AFFINE = "affine"


@dataclass
class Site:
    """One recorded layer call.

    Attributes
    ----------
    kind : SiteKind
    layer : torch.nn.Module
        The layer (for the convolution geometry).
    weight, bias : str or None
        Names of the inferred parameters in the target module (``None``: absent or frozen).
    inputs : torch.Tensor
        Detached input ``(B, T, in)`` (LINEAR: flattened leading dims; AFFINE: ``xhat`` with the
        parameter's elements last); the raw input for CONV (unfolded on first use).
    output : torch.Tensor or None
        The layer output, attached to the autograd graph of the hooked forward pass (set to
        ``None`` once its gradient is taken).
    """

    kind: SiteKind
    layer: nn.Module
    weight: str | None
    bias: str | None
    inputs: torch.Tensor
    output: torch.Tensor | None
    _unfolded: torch.Tensor | None = None

    @property
    def x(self) -> torch.Tensor:
        """Layer input as ``(B, T, in)``, matching ``weight.flatten(1)`` (or the affine's size)."""
        if self.kind == SiteKind.CONV:
            if self._unfolded is None:
                self._unfolded = unfold_input(self.layer, self.inputs)
            return self._unfolded
        return self.inputs

    def columns(self, q: torch.Tensor) -> torch.Tensor:
        """Output gradients ``[c, B, *out_shape]`` as ``[c, B, T, out]``."""
        c, b = q.shape[:2]
        if self.kind == SiteKind.CONV:
            return q.flatten(start_dim=3).transpose(2, 3)
        if self.kind == SiteKind.AFFINE and isinstance(self.layer, _BATCH_NORMS):
            return q.movedim(2, -1).reshape(c, b, -1, q.shape[2])
        return q.reshape(
            c, b, -1, self.inputs.shape[-1] if self.kind == SiteKind.AFFINE else q.shape[-1]
        )

    @property
    def n_locations(self) -> int:
        """Number of locations ``T`` (tokens, positions) the weight is shared over."""
        return self.x.shape[1]


def conv_site_reason(layer: nn.Module) -> str | None:
    """Why a convolution cannot be a site (its parameters then get per-sample gradients)."""
    if layer.groups != 1:
        return f"groups={layer.groups}"
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return "non-zero or string padding"
    return None


def batchnorm_reason(layer: nn.Module) -> str | None:
    """Why a BatchNorm cannot be linearised per sample (``None`` if it can)."""
    if not layer.track_running_stats:
        return f"{type(layer).__name__}(track_running_stats=False) couples the samples of a batch"
    if layer.training:
        return (
            f"{type(layer).__name__} in training mode couples the samples of a batch through "
            "its batch statistics; call model.eval() before fitting"
        )
    return None


class Recorder:
    """Context manager that records the sites of one forward pass of ``module``.

    Registers forward hooks on the Linear, Conv, LayerNorm and BatchNorm layers and replaces
    the ``forward`` of each ``nn.MultiheadAttention`` by an equivalent recomputation (self-
    attention without masks; other calls run the stock forward and their parameters get
    per-sample gradients instead). Everything is undone on exit. Use it on a private copy
    only: a recorded output is replaced by a clone so that in-place operations downstream
    (``out += identity``) cannot rebase the recorded tensor's gradient.

    Parameters
    ----------
    module : torch.nn.Module
        The (private copy of the) module whose requires-grad parameters are inferred.
    batch : int, optional
        Keep the inputs of the first ``batch`` rows only (the rows repeat one batch).
    previous : list of Site, optional
        The sites of an earlier pass over the same inputs: their (unfolded, normalised) inputs
        are reused instead of being recomputed.
    record : bool, default=True
        ``False`` only swaps in the attention recomputation (plain operations, which have
        batching rules for ``torch.func``) and records nothing.
    """

    def __init__(
        self,
        module: nn.Module,
        record: bool = True,
        batch: int | None = None,
        previous: list[Site] | None = None,
    ) -> None:
        self.module = module
        self.record = record
        self.batch = batch
        self.previous = previous
        self.sites: list[Site] = []
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []

    def _name(self, prefix: str, attr: str) -> str | None:
        full = f"{prefix}.{attr}" if prefix else attr
        param = self._params.get(full)
        return full if param is not None and param.requires_grad else None

    def __enter__(self) -> Recorder:
        self._params = dict(self.module.named_parameters())
        for prefix, sub in self.module.named_modules():
            if isinstance(sub, nn.MultiheadAttention):
                self._patch_attention(prefix, sub)
            elif not self.record:
                continue
            elif isinstance(sub, nn.Linear):
                self._hook(sub, prefix, SiteKind.LINEAR)
            elif isinstance(sub, (nn.Conv1d, nn.Conv2d)) and conv_site_reason(sub) is None:
                self._hook(sub, prefix, SiteKind.CONV)
            elif isinstance(sub, nn.LayerNorm) and sub.elementwise_affine:
                self._hook(sub, prefix, SiteKind.AFFINE)
            elif isinstance(sub, _BATCH_NORMS) and sub.affine:
                reason = batchnorm_reason(sub)
                if reason is not None:
                    raise ValueError(f"HookPairGGN: '{prefix}': {reason}.")
                self._hook(sub, prefix, SiteKind.AFFINE)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for sub in self._patched:
            del sub.forward
        self._handles, self._patched = [], []

    # ------------------------------------------------------------------ layers
    def _hook(self, sub: nn.Module, prefix: str, kind: SiteKind) -> None:
        weight, bias = self._name(prefix, "weight"), self._name(prefix, "bias")
        if weight is None and bias is None:
            return

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not out.requires_grad:
                return None
            earlier = self._earlier(mod)
            if earlier is not None:
                self.sites.append(replace(earlier, output=out))
                return out.clone()
            x = args[0].detach()[: self.batch]
            if kind == SiteKind.LINEAR:
                x = x.reshape(x.shape[0], -1, x.shape[-1])
            elif kind == SiteKind.AFFINE:
                x = normalised_input(mod, x)
            self.sites.append(Site(kind, mod, weight, bias, x, out))
            return out.clone()

        self._handles.append(sub.register_forward_hook(hook))

    def _earlier(self, layer: nn.Module) -> Site | None:
        """The earlier pass's site at this position of the call sequence, if it is ``layer``'s."""
        position = len(self.sites)
        if self.previous is None or position >= len(self.previous):
            return None
        earlier = self.previous[position]
        return earlier if earlier.layer is layer else None

    def _patch_attention(self, prefix: str, mha: nn.MultiheadAttention) -> None:
        weight = self._name(prefix, "in_proj_weight")
        bias = self._name(prefix, "in_proj_bias")
        stock = type(mha).forward
        recorder = self

        def forward(
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            key_padding_mask: torch.Tensor | None = None,
            need_weights: bool = True,
            attn_mask: torch.Tensor | None = None,
            average_attn_weights: bool = True,
            is_causal: bool = False,
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
            masked = key_padding_mask is not None or attn_mask is not None or is_causal
            if masked or not _plain_self_attention(mha, query, key, value):
                return stock(
                    mha,
                    query,
                    key,
                    value,
                    key_padding_mask,
                    need_weights,
                    attn_mask,
                    average_attn_weights,
                    is_causal,
                )
            x = query if mha.batch_first else query.transpose(0, 1)
            batch, tokens, width = x.shape
            heads = mha.num_heads
            proj = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
            if recorder.record and proj.requires_grad and (weight is not None or bias is not None):
                kept = x.detach()[: recorder.batch]
                recorder.sites.append(Site(SiteKind.LINEAR, mha, weight, bias, kept, proj))
            q, k, v = proj.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(width // heads)
            attn = scores.softmax(dim=-1)
            mixed = (attn @ v).transpose(1, 2).reshape(batch, tokens, width)
            out = mha.out_proj(mixed)
            if not mha.batch_first:
                out = out.transpose(0, 1)
            weights = None
            if need_weights:
                weights = attn.mean(dim=1) if average_attn_weights else attn
            return out, weights

        mha.forward = forward
        self._patched.append(mha)


def _plain_self_attention(
    mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> bool:
    """Whether an unmasked call is plain self-attention that the recomputation reproduces."""
    return (
        query is key
        and key is value
        and query.dim() == 3
        and mha._qkv_same_embed_dim
        and mha.in_proj_weight is not None
        and mha.bias_k is None
        and mha.bias_v is None
        and not mha.add_zero_attn
        and (mha.dropout == 0.0 or not mha.training)
    )


def normalised_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``xhat`` of a LayerNorm or eval-mode BatchNorm, shape ``(B, T, n_affine)``."""
    if isinstance(layer, nn.LayerNorm):
        xhat = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
        size = math.prod(layer.normalized_shape)
        return xhat.reshape(x.shape[0], -1, size)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = layer.running_mean.view(shape)
    var = layer.running_var.view(shape)
    xhat = (x - mean) / torch.sqrt(var + layer.eps)
    return xhat.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


# ---------------------------------------------------------------------- per-sample gradients
def weight_grads(
    entries: list[tuple[Site, torch.Tensor]], rows: slice | None = None
) -> torch.Tensor:
    """Per-sample weight gradients ``[c, B, rows, in]`` summed over the calls of one weight.

    ``entries`` pairs each call's site with its output gradients ``[c, B, T, out]``.
    AFFINE weights give ``[c, B, n]`` (``rows`` is ignored).
    """
    total = None
    for site, q in entries:
        if site.kind == SiteKind.AFFINE:
            part = (q * site.x).sum(dim=2)
        else:
            q_rows = q if rows is None else q[..., rows]
            part = torch.einsum("cbto,bti->cboi", q_rows, site.x)
        total = part if total is None else total + part
    return total


def bias_grads(entries: list[tuple[Site, torch.Tensor]]) -> torch.Tensor:
    """Per-sample bias gradients ``[c, B, out]`` summed over the calls of one bias."""
    return sum(q.sum(dim=2) for _, q in entries)


def functional_grads(
    module: nn.Module,
    inputs: torch.Tensor,
    names: list[str],
    columns: torch.Tensor,
    per_sample_elements: int,
    max_elements: int,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients ``[c, B, *shape]`` of the parameters ``names`` along ``columns``.

    ``torch.func``: a vector-Jacobian product per sample, vmapped over samples and columns
    ``[c, B, D]``, on a hook-free ``module``; samples are processed in chunks such that
    ``chunk * c * per_sample_elements <= max_elements``.
    """
    every = {n: p.detach() for n, p in module.named_parameters()}
    primal = {n: every[n] for n in names}
    rest = {n: p for n, p in every.items() if n not in primal}
    n_cols, batch = columns.shape[:2]

    def per_sample(x: torch.Tensor, cols: torch.Tensor) -> dict[str, torch.Tensor]:
        def embed(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(module, {**rest, **p}, (x[None],))[0]

        _, pullback = torch.func.vjp(embed, primal)
        return torch.func.vmap(pullback)(cols)[0]

    step = max(1, min(batch, max_elements // max(n_cols * per_sample_elements, 1)))
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.enable_grad(), Recorder(module, record=False), warnings.catch_warnings():
        # attention's backward has no vmap batching rule yet: torch falls back to a loop
        warnings.filterwarnings("ignore", message="There is a performance drop")
        for start in range(0, batch, step):
            part = slice(start, min(start + step, batch))
            grads = torch.func.vmap(per_sample)(inputs[part], columns[:, part].transpose(0, 1))
            for name in names:
                parts[name].append(grads[name].detach().transpose(0, 1))
    return {name: torch.cat(chunks, dim=1) for name, chunks in parts.items()}
