"""Validation of the ``(inputs, class_labels)`` batches that the estimators fit and tune on."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

import torch

from laplace_metric.mining import check_labels


def check_inputs(x: Any) -> None:
    """Raise a clear error for non-finite input tensors."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("The input batch contains NaN or inf values.")


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a loader batch into inputs and class labels."""
    if isinstance(batch, MutableMapping):
        raise TypeError(
            "Pairwise likelihoods take (inputs, labels) batches; dict-like batches are not supported."
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("Each batch must be a pair (inputs, class_labels).")
    return batch[0], batch[1]


def first_batch(train_loader: Iterable) -> tuple[Any, Iterator[Any]]:
    """The first (unchecked) batch of ``train_loader`` and an iterator over the others.

    Raises
    ------
    TypeError
        If the loader is not iterable.
    ValueError
        If it is empty.
    """
    try:
        batches = iter(train_loader)
    except TypeError:
        raise TypeError(
            "train_loader must be an iterable of (inputs, class_labels) batches, got "
            f"{type(train_loader).__name__}."
        ) from None
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("The training loader is empty; nothing to fit.") from None
    return first, batches


def check_batch(
    batch: Any, device: torch.device, param_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a training batch, move it to ``device`` and check it.

    The inputs must be a finite tensor with a batch dimension whose floating dtype matches
    the model's ``param_dtype``; the labels one integer label per input.

    Raises
    ------
    TypeError
        If the batch is not two tensors, the labels are not integers, or the dtypes differ.
    ValueError
        If the batch is malformed or holds NaN or inf.
    """
    x, y = unpack_batch(batch)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            "Each batch must be a pair of tensors (inputs, class_labels), got "
            f"({type(x).__name__}, {type(y).__name__})."
        )
    if x.ndim == 0:
        raise ValueError("Batch inputs need a batch dimension, got a 0-d tensor.")
    x, y = x.to(device), y.to(device)
    y = check_labels(y, x.shape[0])
    if x.is_floating_point() and param_dtype.is_floating_point and x.dtype != param_dtype:
        raise TypeError(
            f"The inputs have dtype {x.dtype} but the model's parameters have dtype "
            f"{param_dtype}; cast the data or the model so that they match."
        )
    check_inputs(x)
    return x, y


def checked_batches(
    first: tuple[torch.Tensor, torch.Tensor],
    rest: Iterator[Any],
    device: torch.device,
    param_dtype: torch.dtype,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the already checked ``first`` batch, then each of ``rest`` checked as it is drawn."""
    yield first
    for batch in rest:
        yield check_batch(batch, device, param_dtype)


__all__ = ["check_batch", "check_inputs", "checked_batches", "first_batch", "unpack_batch"]
