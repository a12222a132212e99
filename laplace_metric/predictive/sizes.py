"""Posterior size checks: does a posterior's curvature fit the estimator's ``memory_budget``?

Before a dense ``P x P`` curvature is allocated, :func:`check_posterior_memory` compares its
size with the budget and names the structures and subsets that would fit.
"""

from __future__ import annotations

import torch
from laplace.utils.enums import HessianStructure, SubsetOfWeights
from torch import nn

from laplace_metric.memory import check_fits, dtype_bytes, format_bytes
from laplace_metric.predictive.view import PredictiveView, as_view

#: Dense ``P x P`` matrices alive at once for a full structure (signed curvature, PSD
#: curvature and posterior precision or scale).
FULL_COPIES = 3


def _kron_bytes(shapes: list[torch.Size], itemsize: int) -> int:
    """Kronecker factors (signed, PSD, eigenvectors and eigenvalues) of parameters ``shapes``."""
    total = 0
    for shape in shapes:
        if len(shape) == 1:
            total += shape[0] ** 2
        else:
            n_in = int(torch.Size(shape[1:]).numel())
            total += shape[0] ** 2 + n_in**2
    return 4 * total * itemsize


def structure_bytes(structure: HessianStructure, shapes: list[torch.Size], itemsize: int) -> int:
    """Memory of a posterior of ``structure`` over parameters of ``shapes``.

    ``diag``: six length-``P`` vectors; ``kron``: four copies of every Kronecker factor;
    ``full``: :data:`FULL_COPIES` dense ``P x P`` matrices.
    """
    n_params = sum(int(torch.Size(s).numel()) for s in shapes)
    if structure == HessianStructure.DIAG:
        return 6 * n_params * itemsize
    if structure == HessianStructure.KRON:
        return _kron_bytes(shapes, itemsize)
    return FULL_COPIES * n_params**2 * itemsize


def _last_module_with_parameters(model: nn.Module) -> tuple[str, nn.Module] | None:
    found = None
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            found = (name, module)
    return found


def _posterior_shapes(la: PredictiveView) -> list[torch.Size] | None:
    if la.last_layer:
        if la.model.last_layer is None:
            return None
        return [p.shape for p in la.model.last_layer.parameters()]
    if la.subnetwork:
        return [torch.Size([int(la.n_params)])]
    return [p.shape for p in la.params]


def _largest_kron_factor(la: PredictiveView) -> tuple[str, int, int] | None:
    """``(name, factor width, bytes of its four copies)`` of the all-layer parameter whose
    Kronecker factors are largest (a ``(1, ...)`` position embedding's dense block, typically)."""
    if la.last_layer or la.subnetwork:
        return None
    itemsize = dtype_bytes(la.dtype)
    sizes = [
        (_kron_bytes([p.shape], itemsize), name, p.shape)
        for name, p in la.model.named_parameters()
        if p.requires_grad
    ]
    if not sizes:
        return None
    size, name, shape = max(sizes)
    width = max(shape[0], int(shape[1:].numel())) if len(shape) > 1 else shape[0]
    return name, width, size


def _kron_without_widest(la: PredictiveView, needed: int, budget: int) -> tuple[str, str]:
    """A note on the widest factor's share of ``needed`` and, if leaving it out fits, that
    alternative (empty strings when the widest factor is not most of the size)."""
    widest = _largest_kron_factor(la)
    if widest is None or widest[2] < needed / 2:
        return "", ""
    name, width, size = widest
    note = f" ({format_bytes(size)} of it for the dense {width:,} x {width:,} factor of '{name}')"
    if needed - size > budget:
        return note, ""
    return note, (
        f"hessian_structure='kron' without '{name}' ({format_bytes(needed - size)}: "
        f"freeze it with requires_grad_(False) before building the estimator)"
    )


def check_posterior_memory(la: PredictiveView) -> None:
    """Raise :class:`~laplace_metric.memory.MemoryBudgetError` if the posterior's curvature
    does not fit ``la.memory_budget``, naming the structures and subsets that would.

    A no-op while a last-layer estimator has not located its last layer yet.
    """
    la = as_view(la)
    shapes = _posterior_shapes(la)
    if shapes is None:
        return
    itemsize = dtype_bytes(la.dtype)
    budget = la.memory_budget
    structure = la.structure
    needed = structure_bytes(structure, shapes, itemsize)
    if needed <= budget:
        return
    n_params = sum(int(torch.Size(s).numel()) for s in shapes)
    is_subnet = la.subnetwork
    allowed = (
        (HessianStructure.DIAG, HessianStructure.FULL)
        if is_subnet
        else (HessianStructure.DIAG, HessianStructure.KRON, HessianStructure.FULL)
    )
    alternatives = []
    note = ""
    if structure == HessianStructure.KRON:
        note, without_widest = _kron_without_widest(la, needed, budget)
        alternatives += [without_widest] if without_widest else []
    for other in allowed:
        if other == structure:
            continue
        size = structure_bytes(other, shapes, itemsize)
        if size <= budget:
            alternatives.append(f"hessian_structure='{other.value}' ({format_bytes(size)})")
    if la.subset == SubsetOfWeights.ALL:
        last = _last_module_with_parameters(la.model)
        if last is not None:
            last_shapes = [p.shape for p in last[1].parameters(recurse=False)]
            for option in (structure, HessianStructure.KRON, HessianStructure.DIAG):
                size = structure_bytes(option, last_shapes, itemsize)
                if size <= budget:
                    n_last = sum(int(torch.Size(s).numel()) for s in last_shapes)
                    alternatives.append(
                        f"subset_of_weights='last_layer' with hessian_structure="
                        f"'{option.value}' ({n_last:,} parameters in '{last[0]}', "
                        f"{format_bytes(size)})"
                    )
                    break
    what = f"A {structure.value} posterior over {n_params:,} parameters{note}"
    if structure == HessianStructure.FULL:
        what += (
            f" ({FULL_COPIES} dense P x P matrices in {str(la.dtype).removeprefix('torch.')}, "
            f"{format_bytes(n_params**2 * itemsize)} each)"
        )
    check_fits(needed, budget, what, alternatives)


__all__ = ["FULL_COPIES", "check_posterior_memory", "structure_bytes"]
