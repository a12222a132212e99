"""Distributed fitting on ``torch.distributed``.

Every rank runs :meth:`MetricLaplaceMixin.fit` over its own shard of the data (e.g. a
``DataLoader`` with a ``DistributedSampler``) and accumulates the signed pairwise curvature,
the loss, the number of contributing pairs and the number of samples. At the end of the pass,
:func:`reduce_fit_state` sums them over all ranks with **one** ``all_reduce`` of a single
flat float64 buffer; every rank then checks, projects and commits the same global state, so
that all ranks hold the same posterior, equal (up to floating-point summation order) to a
single-process fit of the union of the shards.

The buffer also carries, per rank, a failure flag and a fingerprint of the weights, so that

* a rank whose shard fails (bad batch, non-finite input, ...) still takes part in the
  collective, and *every* rank raises instead of hanging in the all-reduce;
* ranks that fit different weights (the posterior mean would differ) are detected.

Kronecker input factors are normalised by the *global* number of contributing pairs after the
reduction, so a two-rank fit equals the one-process fit and not an average of two.

Example
-------
Launch with ``torchrun --nproc_per_node=2 examples/distributed_fit.py``; inside the script::

    torch.distributed.init_process_group("gloo")
    sampler = DistributedSampler(dataset, shuffle=False)
    la = Laplace(model, "contrastive", "all", "kron")
    la.fit(DataLoader(dataset, batch_size=64, sampler=sampler))  # reduces automatically
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from laplace.utils import Kron
from laplace.utils.enums import HessianStructure

#: Relative tolerance of the cross-rank weight-fingerprint check.
FINGERPRINT_RTOL = 1e-10


class FitState(NamedTuple):
    """What one ``fit`` pass accumulates (per rank before, global after the reduction).

    Attributes
    ----------
    curvature : torch.Tensor or laplace.utils.Kron or None
        Signed pairwise curvature (diag vector, dense matrix or Kronecker factors).
    loss : torch.Tensor or float
        Summed negative log-likelihood of all mined pairs.
    n_pairs : int
        Number of contributing pairs.
    n_data : int
        Number of samples.
    n_candidates : int
        Number of pairs the batches offered, ``sum_b B_b (B_b - 1) / 2`` (the likelihood scale).
    """

    curvature: torch.Tensor | Kron | None
    loss: torch.Tensor | float
    n_pairs: int
    n_data: int
    n_candidates: int = 0


def is_distributed(flag: bool | None = None) -> bool:
    """Whether ``fit`` should reduce over ``torch.distributed`` ranks.

    Parameters
    ----------
    flag : bool, optional
        ``None`` (default): reduce when a default process group is initialised with more than
        one rank. ``False``: never (each rank fits its own data). ``True``: require an
        initialised process group.

    Returns
    -------
    bool
    """
    available = dist.is_available() and dist.is_initialized()
    if flag is None:
        return available and dist.get_world_size() > 1
    if flag and not available:
        raise RuntimeError(
            "fit(distributed=True) needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group first (e.g. under torchrun)."
        )
    return bool(flag)


def curvature_tensors(curvature: torch.Tensor | Kron | None) -> list[torch.Tensor]:
    """The tensors of a curvature value, in a fixed order (Kronecker factors flattened)."""
    if curvature is None:
        return []
    if isinstance(curvature, Kron):
        return [factor for factors in curvature.kfacs for factor in factors]
    return [curvature]


def zero_curvature(estimator: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor | Kron:
    """Zero signed curvature in the layout of ``estimator`` (for a rank with no pair).

    Parameters
    ----------
    estimator : MetricLaplaceMixin
        A laplace-metric estimator (after its last layer was located, for last-layer Laplace).
    dtype, device
        Of the curvature.

    Returns
    -------
    torch.Tensor or laplace.utils.Kron
    """
    structure = estimator._structure
    if structure == HessianStructure.KRON:
        params = [p for p in estimator._posterior_parameters() if p.requires_grad]
        return Kron.init_from_model(params, device, dtype)
    n_params = estimator.n_params
    if n_params is None:
        raise RuntimeError(
            "This rank could not determine the parameter count (last layer not located: its "
            "shard had no batch); give every rank at least one batch."
        )
    if structure == HessianStructure.DIAG:
        return torch.zeros(n_params, dtype=dtype, device=device)
    return torch.zeros(n_params, n_params, dtype=dtype, device=device)


def weight_fingerprint(params: list[torch.Tensor]) -> torch.Tensor:
    """Two float64 numbers that identify the posterior mean: ``sum(w)`` and ``sum(w^2)``."""
    vector = torch.cat([p.detach().reshape(-1) for p in params]).double()
    return torch.stack([vector.sum(), vector.square().sum()])


def _reference_tensor(estimator: Any) -> torch.Tensor:
    params = list(estimator._posterior_parameters())
    if not params:
        raise RuntimeError("The estimator has no posterior parameters to fit.")
    return params[0]


def reduce_fit_state(
    estimator: Any,
    state: FitState,
    error: BaseException | None = None,
    group: Any | None = None,
) -> FitState:
    """Sum one rank's fit state over all ranks with a single ``all_reduce``.

    Every rank must call this exactly once per ``fit``, also a rank whose pass failed (pass
    its exception as ``error``): the collective then completes everywhere and every rank
    raises, instead of the healthy ranks waiting forever.

    Parameters
    ----------
    estimator : MetricLaplaceMixin
        The estimator being fitted (gives the curvature layout and the weights).
    state : FitState
        This rank's accumulation over its shard (``curvature`` may be ``None`` when the shard
        contributed no pair).
    error : BaseException, optional
        The exception this rank's pass raised, if any.
    group : torch.distributed.ProcessGroup, optional
        Defaults to the default (world) group.

    Returns
    -------
    FitState
        The global sums; ``curvature`` is ``None`` if no rank had a contributing pair.

    Raises
    ------
    RuntimeError
        If any rank failed (the failing rank re-raises its own exception), or the ranks hold
        different weights.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    reference, curvature = _rank_layout(estimator, state, error, rank)
    tensors = curvature_tensors(curvature)
    dtype = tensors[0].dtype if tensors else reference.dtype
    buffer = _pack(estimator, state, error, tensors, world, rank, reference.device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    _check_ranks(buffer, world, error)
    return _unpack(buffer, world, tensors, curvature, dtype)


def _rank_layout(
    estimator: Any, state: FitState, error: BaseException | None, rank: int
) -> tuple[torch.Tensor, torch.Tensor | Kron]:
    """A reference parameter and this rank's curvature (zeros in the estimator's layout when
    the shard contributed no pair); raise if this rank cannot determine the layout."""
    try:
        reference = _reference_tensor(estimator)
        curvature = state.curvature
        if curvature is None:
            curvature = zero_curvature(estimator, reference.dtype, reference.device)
    except Exception as err:
        # Without the layout this rank cannot join with a buffer of the right size (a size
        # mismatch aborts the peers in gloo): it raises now, the others at the group timeout.
        raise RuntimeError(
            f"Rank {rank} cannot take part in the distributed fit ({err}); the other ranks "
            "will fail at the process-group timeout."
        ) from (error or err)
    return reference, curvature


#: Leading entries of the reduced buffer: loss, pair, sample and candidate-pair counts.
_HEADER = 4


def _pack(
    estimator: Any,
    state: FitState,
    error: BaseException | None,
    tensors: list[torch.Tensor],
    world: int,
    rank: int,
    device: torch.device,
) -> torch.Tensor:
    """The flat float64 buffer: loss, pair, sample and candidate-pair counts; per rank a failure flag and a
    weight fingerprint (zeros for the other ranks); then the curvature tensors."""
    loss = state.loss.detach() if isinstance(state.loss, torch.Tensor) else state.loss
    header = torch.tensor(
        [float(loss), float(state.n_pairs), float(state.n_data), float(state.n_candidates)],
        dtype=torch.float64,
        device=device,
    )
    ranks = torch.zeros(world, 3, dtype=torch.float64, device=device)
    ranks[rank, 0] = 1.0 if error is not None else 0.0
    ranks[rank, 1:] = weight_fingerprint(list(estimator._posterior_parameters())).to(device)
    pieces = [t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]
    return torch.cat([header, ranks.reshape(-1), *pieces])


def _check_ranks(buffer: torch.Tensor, world: int, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed or the ranks' weights differ."""
    ranks = buffer[_HEADER : _HEADER + 3 * world].reshape(world, 3)
    failed = [r for r in range(world) if ranks[r, 0] > 0]
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(
            f"Distributed fit failed on rank(s) {failed}; see their error. No rank was updated."
        )
    prints = ranks[:, 1:]
    if not torch.allclose(prints, prints[:1].expand_as(prints), rtol=FINGERPRINT_RTOL, atol=0):
        raise RuntimeError(
            "The ranks hold different weights (posterior means); synchronise the model (e.g. "
            "load the same checkpoint or broadcast the parameters) before a distributed fit."
        )


def _unpack(
    buffer: torch.Tensor,
    world: int,
    tensors: list[torch.Tensor],
    curvature: torch.Tensor | Kron,
    dtype: torch.dtype,
) -> FitState:
    """The global fit state from the reduced buffer, in the layout of ``curvature``."""
    header = buffer[:_HEADER]
    offset = _HEADER + 3 * world
    reduced = []
    for t in tensors:
        size = t.numel()
        reduced.append(buffer[offset : offset + size].view(t.shape).to(dtype))
        offset += size
    n_pairs = int(round(float(header[1])))
    if isinstance(curvature, Kron):
        it = iter(reduced)
        total: torch.Tensor | Kron | None = Kron(
            [[next(it) for _ in factors] for factors in curvature.kfacs]
        )
    else:
        total = reduced[0]
    if n_pairs == 0:
        total = None
    n_data, n_candidates = (int(round(float(v))) for v in header[2:4])
    return FitState(total, header[0].to(dtype), n_pairs, n_data, n_candidates)


__all__ = [
    "FINGERPRINT_RTOL",
    "FitState",
    "curvature_tensors",
    "is_distributed",
    "reduce_fit_state",
    "weight_fingerprint",
    "zero_curvature",
]
