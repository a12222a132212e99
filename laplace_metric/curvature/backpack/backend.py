"""``BackPackPairGGN``: the pairwise curvature backend built on BackPACK extensions."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from backpack import backpack, extend, hook_store_io
from laplace.utils import Kron
from torch import nn

from laplace_metric.curvature.backpack.extensions import (
    PairDiagGGN,
    PairExtension,
    PairFactor,
    PairKronGGN,
)
from laplace_metric.curvature.backpack.graph_extensions import (
    GraphDiagGGN,
    GraphExtension,
    GraphGram,
    GraphKronGGN,
)
from laplace_metric.curvature.backpack.root import PairRoot
from laplace_metric.curvature.backpack.support import needs_converter, unsupported_layers
from laplace_metric.curvature.base import PairCurvatureInterface
from laplace_metric.curvature.budget import budget_elements
from laplace_metric.curvature.folds import fold_gram
from laplace_metric.curvature.layers import pair_rows, private_copy, sync_copy
from laplace_metric.pairs.terms import GraphTerms, PairTerms


class BackPackPairGGN(PairCurvatureInterface):
    """Pairwise GGN (diag, Kronecker, full) and Jacobians from BackPACK extensions.

    The batch is regathered into a *pair batch* ``cat([x_a, x_b])`` (or ``x_b`` alone for
    one-sided pairs), one forward pass is run through a hooked copy of the model, and the
    pairs' square-root columns are back-propagated once. The diagonal and the Kronecker
    factors never form per-sample Jacobians of the whole network. The user's model is never
    extended: BackPACK's hooks live on a private copy, synchronised with the model's
    parameters and buffers at every call.

    Supported layers: Linear, Conv1d/2d (``groups=1``, zero padding), BatchNorm1d/2d and
    Dropout in evaluation mode, ReLU, LeakyReLU, Tanh, Sigmoid, ELU, GELU, Max/Avg/AdaptiveAvg
    pooling (1d/2d), Flatten, Identity, in ``Sequential`` containers; other containers (e.g.
    residual blocks) through BackPACK's converter. Everything else: use
    :class:`~laplace_metric.curvature.ReferencePairGGN`.

    Parameters
    ----------
    model, likelihood, last_layer, subnetwork_indices
        See :class:`~laplace_metric.curvature.PairCurvatureInterface`.
    """

    #: Pairs per forward/backward pass on the per-pair path (likelihoods whose pair Hessians
    #: do not factor per sample); larger batches are processed in chunks.
    max_pairs_per_pass: int = 2048
    #: Default of :attr:`max_column_elements`.
    DEFAULT_MAX_COLUMN_ELEMENTS: int = 2**27
    #: Peak working memory of a pair-graph fit in units of :attr:`max_column_elements`
    #: numbers (an estimate: the columns at every layer of one pass and the extension's
    #: products; see ``docs/encoders.rst``).
    MEMORY_PER_ELEMENT_BOUND: int = 8
    #: The estimator's ``memory_budget`` in bytes, set before each fit (``None``: not bounded
    #: by a budget).
    memory_budget: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_column_elements = self.DEFAULT_MAX_COLUMN_ELEMENTS
        self._copy: tuple[nn.Module, nn.Module, PairRoot] | None = None
        #: ``(hooked copy, per-sample input shape, largest activation)`` of the last pass
        self._activation: tuple[nn.Module, tuple[int, ...], int] | None = None

    @property
    def max_column_elements(self) -> int:
        """Upper bound on ``columns x samples x features`` of the largest activation's
        back-propagated columns in one pass of the pair-graph path; more columns are split
        over several passes (the results add up). The value set (default ``2**27``), lowered
        so that :attr:`MEMORY_PER_ELEMENT_BOUND` times it fits :attr:`memory_budget` (at least
        ``2**16``; a budget never raises it)."""
        itemsize = next(self.model.parameters()).element_size()
        return budget_elements(
            self._max_column_elements, self.memory_budget, itemsize, self.MEMORY_PER_ELEMENT_BOUND
        )

    @max_column_elements.setter
    def max_column_elements(self, value: int) -> None:
        self._max_column_elements = int(value)

    # ------------------------------------------------------------------ model copy
    def _extended(self, module: nn.Module) -> nn.Module:
        """A BackPACK-extended copy of ``module`` with its current parameters and buffers."""
        if self._copy is None or self._copy[0] is not module:
            self._copy = (module, build_extended_copy(module), extend(PairRoot()))
        _, twin, root = self._copy
        restore_hooks(twin)
        restore_hooks(root)
        sync_copy(module, twin)
        return twin

    # ------------------------------------------------------------------ one pass
    def _run(self, module: nn.Module, rows: torch.Tensor, ext: PairExtension) -> torch.Tensor:
        """Forward ``rows`` through the hooked copy and back-propagate ``ext.root`` (set it
        after the forward if it is ``None`` when called: see :meth:`_raw_jacobians`)."""
        twin = self._extended(module)
        root_module = self._copy[2]
        with torch.enable_grad():
            out = twin(rows)
            if ext.root is None:
                ext.root = identity_columns(out)
            with backpack(ext), warnings.catch_warnings():
                # the first layer's input never requires grad: expected, not a problem
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                root_module(out).backward()
        return out.detach()

    def _collect(self, module: nn.Module, savefield: str) -> list[Any]:
        """The extension's results, one per inferred parameter, in ``module`` order."""
        twin_params = dict(self._copy[1].named_parameters())
        results = []
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            twin = twin_params[name]
            if not hasattr(twin, savefield):
                raise RuntimeError(
                    f"BackPACK computed nothing for parameter '{name}': it is not used by the "
                    "model's forward pass through a supported layer; use ReferencePairGGN."
                )
            results.append(getattr(twin, savefield))
            delattr(twin, savefield)
            twin.grad = None
        return results

    def _passes(
        self, module: nn.Module, inputs: Any, terms: PairTerms, ext_cls: type[PairExtension]
    ) -> Iterator[list[Any]]:
        """Run ``ext_cls`` on chunks of at most :attr:`max_pairs_per_pass` pairs."""
        check_tensor_inputs(inputs)
        n_pairs = len(terms.signs)
        step = self.max_pairs_per_pass
        for start in range(0, n_pairs, step):
            chunk = slice(start, min(start + step, n_pairs))
            rows, factor, n_sides = pair_rows(inputs, terms, chunk)
            ext = ext_cls(terms.signs[chunk], n_sides, factor.permute(2, 0, 1))
            self._run(module, rows, ext)
            yield self._collect(module, ext.savefield)

    # ------------------------------------------------------------------ hooks
    def _diag(self, module, inputs, g, terms):
        total = None
        for parts in self._passes(module, inputs, terms, PairDiagGGN):
            flat = torch.cat([p.flatten() for p in parts])
            total = flat if total is None else total + flat
        return total

    def _kron(self, module, inputs, g, terms):
        total = None
        for parts in self._passes(module, inputs, terms, PairKronGGN):
            if total is None:
                total = parts
            else:
                total = [[a + b for a, b in zip(old, new)] for old, new in zip(total, parts)]
        return Kron(total)

    def _full(self, module, inputs, g, terms):
        total = None
        start = 0
        for parts in self._passes(module, inputs, terms, PairFactor):
            factors = torch.cat(parts, dim=2)  # [R, M, P]
            signs = terms.signs[start : start + factors.shape[1]]
            start += factors.shape[1]
            flat = factors.flatten(end_dim=1)  # [R*M, P]
            weights = signs.repeat(factors.shape[0])[:, None]
            part = (flat * weights).T @ flat
            total = part if total is None else total + part
        return total

    # ------------------------------------------------------------------ pair graph
    def _graph_pass(
        self, module: nn.Module, inputs: Any, terms: GraphTerms, ext_cls: type[GraphExtension]
    ) -> list[Any]:
        """One pass of ``ext_cls`` over the batch itself with the per-sample columns."""
        check_tensor_inputs(inputs)
        ext = ext_cls(terms.graph, terms.factor.permute(2, 0, 1))
        self._run(module, inputs, ext)
        return self._collect(module, ext.savefield)

    def _graph_diag(self, module, inputs, g, terms):
        return torch.cat(
            [p.flatten() for p in self._graph_pass(module, inputs, terms, GraphDiagGGN)]
        )

    def _graph_kron(self, module, inputs, g, terms):
        return Kron(self._graph_pass(module, inputs, terms, GraphKronGGN))

    def _graph_full(self, module, inputs, g, terms):
        factors = torch.cat(self._graph_pass(module, inputs, terms, GraphGram), dim=2)
        return fold_gram(factors, terms.graph)

    def _column_chunks(self, module, inputs, terms):
        """Columns per pass such that the back-propagated columns of the largest activation
        stay under :attr:`max_column_elements`."""
        n_cols = terms.factor.shape[2]
        twin = self._extended(module)
        key = tuple(inputs.shape[1:])
        if self._activation is None or self._activation[:2] != (twin, key):
            self._activation = (twin, key, largest_activation(twin, inputs))
        per_column = terms.factor.shape[0] * self._activation[2]
        step = max(1, min(n_cols, self.max_column_elements // max(per_column, 1)))
        return [slice(s, min(s + step, n_cols)) for s in range(0, n_cols, step)]

    def _raw_jacobians(self, module: nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor_inputs(inputs)
        signs = torch.ones(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
        ext = PairFactor(signs, n_sides=1)
        g = self._run(module, inputs, ext)
        jac = torch.cat(self._collect(module, ext.savefield), dim=2)  # [D, B, P]
        return jac.transpose(0, 1), g


# ---------------------------------------------------------------------- helpers
def check_tensor_inputs(inputs: Any) -> None:
    """BackPACK needs a tensor batch."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"BackPackPairGGN needs tensor inputs, got {type(inputs).__name__}; use "
            "ReferencePairGGN for dict-like inputs."
        )


def largest_activation(module: nn.Module, inputs: torch.Tensor) -> int:
    """Elements per sample of the largest output of any submodule (one probe forward pass on
    one sample)."""
    sizes = [inputs[0].numel()]

    def hook(mod, args, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out[0].numel() if out.ndim > 1 else out.numel())

    handles = [sub.register_forward_hook(hook) for sub in module.modules()]
    modes = [sub.training for sub in module.modules()]
    try:
        module.eval()  # one sample through train-mode batch norm would fail
        with torch.no_grad():
            module(inputs[:1])
    finally:
        for handle in handles:
            handle.remove()
        for sub, mode in zip(module.modules(), modes):
            sub.training = mode
    return max(sizes)


def identity_columns(out: torch.Tensor) -> torch.Tensor:
    """Columns ``[D, B, D]`` with ``[d, b, :] = e_d`` (per-sample Jacobians of the output)."""
    batch, dim = out.shape
    eye = torch.eye(dim, dtype=out.dtype, device=out.device)
    return eye[:, None, :].expand(dim, batch, dim)


def build_extended_copy(module: nn.Module) -> nn.Module:
    """A hooked deep copy of ``module`` (through BackPACK's converter when needed).

    Raises
    ------
    ValueError
        If the model has a layer the pairwise extensions do not support.
    """
    bad = unsupported_layers(module)
    if bad:
        raise ValueError(
            f"BackPackPairGGN does not support the layer(s) {', '.join(bad)}; ReferencePairGGN "
            "supports every layer torch.func differentiates, AsdlPairGGN every parameter-free "
            "layer."
        )
    twin = private_copy(module)
    if not needs_converter(twin):
        return extend(twin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            converted = extend(twin, use_converter=True)
        except Exception as err:  # noqa: BLE001 - the converter raises many types
            raise ValueError(
                f"BackPACK's converter cannot trace {type(module).__name__} ({err}); use "
                "ReferencePairGGN."
            ) from err
    for warning in caught:
        if "may break second-order extensions" in str(warning.message):
            raise ValueError(
                f"BackPackPairGGN cannot handle an operation in {type(module).__name__}."
                f"forward: {warning.message}; use ReferencePairGGN."
            )
    bad = unsupported_layers(converted)
    if bad:
        raise ValueError(
            f"BackPackPairGGN does not support the layer(s) {', '.join(bad)}; use ReferencePairGGN."
        )
    missing = {n for n, _ in module.named_parameters()} - {
        n for n, _ in converted.named_parameters()
    }
    if missing:
        raise ValueError(f"BackPACK's converter renamed parameters {sorted(missing)}.")
    return converted


def restore_hooks(module: nn.Module) -> None:
    """Re-register BackPACK's hooks on the extended modules of ``module`` that lost them.

    Stock laplace-torch's ``BackPackGGN`` calls BackPACK's global ``CTX.remove_hooks()`` after
    every Jacobian (GLM prediction), which removes the hooks of *every* extended module in the
    process, the private copy's included; the copy would then compute nothing.
    """
    stale = [
        sub
        for sub in module.modules()
        if getattr(sub, "_backpack_extend", False)
        and not any(hook is hook_store_io for hook in sub._forward_hooks.values())
    ]
    for sub in stale:
        sub._backpack_extend = False
    if stale:
        extend(module)


def backpack_support_error(model: nn.Module) -> str | None:
    """Why :class:`BackPackPairGGN` cannot handle ``model`` (``None`` if it can).

    Builds the hooked copy once (for containers with a custom ``forward`` this traces the
    model with BackPACK's converter), so it also catches functional operations.
    """
    try:
        build_extended_copy(model)
    except ValueError as err:
        return str(err)
    return None
