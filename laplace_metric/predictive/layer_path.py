"""The GLM predictive of all-layer diag and kron posteriors, layer by layer.

:func:`layer_predictor` is what computes ``J Sigma J^T`` layer by layer through the hooks of a
:class:`~laplace_metric.curvature.HookPairGGN` (the estimator's backend, or one made over the
same model when another backend fitted it), so no ``B x D x P`` Jacobian is formed;
:func:`layer_variances` takes the variances of several posteriors of one model (e.g. with the
curvature on and off) from one set of backward passes.
"""

from __future__ import annotations

import torch
from laplace.utils.enums import HessianStructure, SubsetOfWeights

from laplace_metric.memory import check_fits, chunk_size, dtype_bytes, split
from laplace_metric.predictive.view import PredictiveView, as_view


def layer_predictor(la: PredictiveView) -> object | None:
    """What computes ``J Sigma J^T`` layer by layer for ``la``, or ``None``.

    The estimator's backend if it has ``predictive_covariance``
    (:class:`~laplace_metric.curvature.HookPairGGN`); otherwise a ``HookPairGGN`` over the
    same model and likelihood, made once and kept on the estimator, if it supports the model
    (the posterior's parameter order is the model's either way).
    """
    la = as_view(la)
    if hasattr(la.backend, "predictive_covariance"):
        predictor = la.backend
    else:
        if "layer_predictor" not in la.cache:
            from laplace_metric.curvature import HookPairGGN
            from laplace_metric.curvature.hooks.support import hooks_support_error

            supported = hooks_support_error(la.model, la.structure.value) is None
            helper = HookPairGGN(la.model, la.backend.likelihood) if supported else None
            la.cache["layer_predictor"] = helper
        predictor = la.cache["layer_predictor"]
    if predictor is not None and hasattr(type(predictor), "memory_budget"):
        predictor.memory_budget = la.memory_budget
    return predictor


def layer_posterior(la: PredictiveView) -> torch.Tensor | object:
    """What the layer-by-layer predictive takes as ``posterior``: the variances of a diag
    posterior, the (Kronecker-decomposed) precision of a kron one, as of now."""
    la = as_view(la)
    if la.structure == HessianStructure.DIAG:
        return la.posterior_variance
    return la.posterior_precision


def uses_layer_path(la: PredictiveView, x: object = None, joint: bool = False) -> bool:
    """Whether the GLM predictive of ``la`` goes layer by layer (:func:`layer_predictor`),
    never forming ``D x P`` Jacobians: all-layer diag or kron posteriors of models the hook
    backend supports, tensor inputs, not ``joint``."""
    la = as_view(la)
    return (
        not joint
        and la.subset == SubsetOfWeights.ALL
        and la.structure in (HessianStructure.DIAG, HessianStructure.KRON)
        and la.backend.subnetwork_indices is None
        and (x is None or isinstance(x, torch.Tensor))
        and layer_predictor(la) is not None
    )


def layer_variances(
    la: PredictiveView, x: torch.Tensor, posteriors: list, batch_size: int | None = None
) -> list[torch.Tensor]:
    """The GLM variances ``(n, D)`` of ``x`` under each of several posteriors of the same
    model (e.g. :func:`layer_posterior` with the curvature on and off), from one set of
    backward passes per chunk of queries (only where :func:`uses_layer_path`).

    Raises
    ------
    laplace_metric.memory.MemoryBudgetError
        If a single query does not fit the budget.
    """
    la = as_view(la)
    if not uses_layer_path(la, x):
        raise ValueError("layer_variances needs an all-layer diag or kron posterior on tensors.")
    per_query = layer_path_bytes(la)
    if batch_size is None:
        check_fits(per_query, la.memory_budget, "The GLM predictive of one query", [])
    size = chunk_size(len(x), per_query, la.memory_budget, batch_size)
    parts: list[list[torch.Tensor]] = [[] for _ in posteriors]
    for chunk in split(x, size):
        _, variances = layer_predictor(la).predictive_variances(chunk, posteriors)
        for part, var in zip(parts, variances):
            part.append(var.detach())
    return [torch.cat(part) for part in parts]


def layer_path_bytes(la: PredictiveView) -> int:
    """Working memory per query of the layer-by-layer predictive: the largest layer's
    per-query Jacobian block, twice, but at most the backend's own bound on its intermediate
    tensors (``4 max_elements``: it forms blocks of output rows or location Gram matrices),
    plus the ``D x D`` result."""
    D = int(la.n_outputs)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in la.model.modules())
    working = 2 * D * int(largest)
    bound = getattr(layer_predictor(la), "max_elements", None)
    if bound is not None:
        working = min(working, 4 * int(bound))
    return (working + 4 * D * D) * dtype_bytes(la.dtype)


__all__ = [
    "layer_path_bytes",
    "layer_posterior",
    "layer_predictor",
    "layer_variances",
    "uses_layer_path",
]
