"""Using your own encoder: picking the embedding out of a model's output, and checking it.

laplace-metric needs an encoder whose ``forward`` returns one ``(batch, D)`` floating-point
tensor: the embedding (before L2 normalisation, which the likelihood applies). Models that
return a tuple, a dict or a Hugging Face-style output object are wrapped with
:class:`SelectOutput`::

    encoder = SelectOutput(model, key="embeddings")      # dict / attribute output
    encoder = SelectOutput(model, key=1)                 # tuple output: the second entry
    encoder = SelectOutput(model, fn=lambda out: out.pooler_output)

For last-layer Laplace, the last module the forward pass runs must be the ``nn.Linear`` that
produces the embedding (laplace-torch's rule). :func:`check_encoder_output` checks both before
a fit starts, with errors that name the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "SelectOutput",
    "check_encoder_output",
    "check_input_dtype",
    "eval_mode",
    "keeps_module_modes",
]

_WRAP_HINT = (
    "wrap the encoder so that it returns the embedding tensor: "
    "laplace_metric.SelectOutput(model, key=...) (an index for tuples, a key or attribute name "
    "for dicts and output objects) or SelectOutput(model, fn=callable)"
)


class SelectOutput(nn.Module):
    """Wrap ``model`` so that its forward returns one entry of its output: the embedding.

    Parameters
    ----------
    model : torch.nn.Module
        A model whose output is a tuple, list, dict or object holding the embedding.
    key : int or str, optional
        Index (tuples, lists), key (dicts) or attribute name (output objects) of the embedding.
    fn : callable, optional
        ``fn(output) -> embedding``; instead of ``key``.

    Notes
    -----
    For last-layer Laplace, the embedding must be the output of the last module that the
    forward pass runs (an ``nn.Linear``); if the model computes other heads after it, pass
    ``last_layer_name=`` to the estimator or reorder the heads, else
    :func:`check_encoder_output` raises.
    """

    def __init__(
        self,
        model: nn.Module,
        key: int | str | None = None,
        fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if (key is None) == (fn is None):
            raise ValueError("Pass exactly one of key= (index, key or attribute) or fn=.")
        if fn is not None and not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
        self.model = model
        self.key = key
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.model(*args, **kwargs)
        if self.fn is not None:
            return self.fn(out)
        if isinstance(self.key, str):
            if isinstance(out, Mapping):
                if self.key not in out:
                    raise KeyError(
                        f"The model's output has no key {self.key!r}; keys: {list(out)}."
                    )
                return out[self.key]
            if not hasattr(out, self.key):
                raise AttributeError(
                    f"The model's output ({type(out).__name__}) has no attribute {self.key!r}."
                )
            return getattr(out, self.key)
        if not isinstance(out, (tuple, list)):
            raise TypeError(
                f"key={self.key} selects from a tuple or list, but the model returned "
                f"{type(out).__name__}."
            )
        if not -len(out) <= self.key < len(out):
            raise IndexError(
                f"SelectOutput(key={self.key}) is out of range: the model returned "
                f"{_describe(out)}; pick the embedding with key=0 to key={len(out) - 1}."
            )
        return out[self.key]

    def extra_repr(self) -> str:
        return f"key={self.key!r}" if self.fn is None else f"fn={self.fn!r}"


def _describe(out: Any) -> str:
    if isinstance(out, (tuple, list)):
        inner = ", ".join(
            f"Tensor{tuple(o.shape)}" if isinstance(o, torch.Tensor) else type(o).__name__
            for o in out
        )
        return f"a {type(out).__name__} ({inner})"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)}"
    return f"a {type(out).__name__}"


def _run_recording_leaves(
    model: nn.Module, x: torch.Tensor, record: bool
) -> tuple[Any, list[tuple[str, nn.Module, Any]]]:
    """``model(x)`` in eval mode (modes restored), and, if ``record``, the leaf modules run
    (as laplace-torch counts them) with their outputs, in order."""
    order: list[tuple[str, nn.Module, Any]] = []
    handles = []
    if record:
        for name, module in model.named_modules():
            if next(module.children(), None) is None:  # leaf modules, as laplace-torch
                handles.append(
                    module.register_forward_hook(
                        lambda m, i, o, name=name: order.append((name, m, o))
                    )
                )
    was_training = [m.training for m in model.modules()]
    model.eval()
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in zip(model.modules(), was_training):
            m.training = mode
    return out, order


def _same_output(a: Any, out: torch.Tensor) -> bool:
    return a is out or (
        isinstance(a, torch.Tensor) and a.shape == out.shape and torch.equal(a, out)
    )


def _name_hint(out: torch.Tensor, order: list[tuple[str, nn.Module, Any]]) -> str:
    """``last_layer_name='...'`` for the nn.Linear that produced ``out``, if there is one."""
    names = [n for n, m, o in order if isinstance(m, nn.Linear) and _same_output(o, out)]
    if names:
        return f"pass last_layer_name={names[-1]!r} (the nn.Linear that produced the embedding)"
    return (
        "pass last_layer_name= the name, as in model.named_modules(), of the nn.Linear that "
        "produces the embedding"
    )


def _check_named_last_layer(
    out: torch.Tensor, name: str, order: list[tuple[str, nn.Module, Any]]
) -> None:
    """``last_layer_name=name``: that module must be an ``nn.Linear`` whose output is ``out``."""
    runs = [(m, o) for n, m, o in order if n == name]
    if not runs:
        raise ValueError(
            f"last_layer_name={name!r} names no module that the forward pass runs; "
            f"{_name_hint(out, order)}."
        )
    module, last_out = runs[-1]
    if not isinstance(module, nn.Linear) or not _same_output(last_out, out):
        raise ValueError(
            f"last_layer_name={name!r} is a {type(module).__name__} whose output is not the "
            f"encoder's output; {_name_hint(out, order)}."
        )


def _check_last_linear(
    out: torch.Tensor, name: str, module: nn.Module, last_out: Any, order: list | None = None
) -> None:
    """laplace-torch's last-layer rule: the last module run is an ``nn.Linear`` giving ``out``."""
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"Last-layer Laplace needs a model whose last module is an nn.Linear producing the "
            f"embedding, but the last module run is {type(module).__name__} ('{name}'). Fixes: "
            "drop a final normalisation (the likelihood L2-normalises; normalize=True), move "
            "the non-linearity before a final nn.Linear, or use subset_of_weights='all'."
        )
    if not _same_output(last_out, out):
        raise ValueError(
            f"Last-layer Laplace would fit '{name}' (the last nn.Linear run), but its output is "
            "not the encoder's output: something runs after it or another head is returned. "
            f"Make the embedding layer the last one run, or {_name_hint(out, order or [])}."
        )


@torch.no_grad()
def check_encoder_output(
    model: nn.Module,
    x: torch.Tensor,
    last_layer: bool = False,
    last_layer_name: str | None = None,
) -> None:
    """Check that ``model(x)`` is one ``(batch, D)`` embedding tensor; raise a clear error if not.

    Parameters
    ----------
    model : torch.nn.Module
        The encoder (for last-layer Laplace: the unwrapped model, before laplace-torch's
        feature extractor has found its last layer).
    x : torch.Tensor
        A few inputs (one is enough).
    last_layer : bool, default=False
        Also check laplace-torch's last-layer rule: the last module run is an ``nn.Linear``
        whose output is the embedding.
    last_layer_name : str, optional
        With ``last_layer``: the name (as in ``model.named_modules()``) of the layer to fit,
        which must be an ``nn.Linear`` producing the embedding, instead of the last one run.

    Raises
    ------
    TypeError
        If the output is not a tensor (tuple, dict, ...) or not floating point.
    ValueError
        If the output is not ``(batch, D)``, or (``last_layer``) the last module run is not an
        ``nn.Linear`` producing the embedding.
    """
    out, order = _run_recording_leaves(model, x, last_layer)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"The encoder returned {_describe(out)}; laplace-metric needs one (batch, D) "
            f"embedding tensor: {_WRAP_HINT}."
        )
    if not out.is_floating_point():
        raise TypeError(
            f"The encoder returned a tensor of dtype {out.dtype}; embeddings must be floating point."
        )
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(
            f"The encoder returned shape {tuple(out.shape)} for {x.shape[0]} inputs; embeddings must "
            "have shape (batch, D): flatten or pool them inside the encoder."
        )
    if last_layer and last_layer_name is not None:
        _check_named_last_layer(out, last_layer_name, order)
    elif last_layer and order:
        _check_last_linear(out, *order[-1], order)


def check_input_dtype(model: nn.Module, x: Any, name: str = "x") -> None:
    """Raise a clear ``TypeError`` when floating inputs and the model's parameters differ in dtype.

    Parameters
    ----------
    model : torch.nn.Module
    x : Any
        The inputs; only floating-point tensors are checked.
    name : str, default='x'
        The argument name, used in the message.
    """
    param = next(model.parameters(), None)
    if (
        isinstance(x, torch.Tensor)
        and param is not None
        and x.is_floating_point()
        and param.is_floating_point()
        and x.dtype != param.dtype
    ):
        raise TypeError(
            f"{name} has dtype {x.dtype} but the model's parameters have dtype {param.dtype}; "
            f"cast one of them so that they match, e.g. {name}.to({param.dtype})."
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode, then restore every submodule's train/eval mode
    and every buffer (e.g. BatchNorm's running statistics) as they were.

    Scores, samples and predictions must not depend on the mode the encoder was left in (a
    model is in train mode right after construction or a training loop): in train mode
    BatchNorm would use batch statistics and overwrite its running statistics, and Dropout
    would drop units.

    Parameters
    ----------
    model : torch.nn.Module

    Yields
    ------
    model : torch.nn.Module
        The same module, in eval mode.

    Examples
    --------
    >>> with eval_mode(encoder):                # doctest: +SKIP
    ...     z = encoder(x)
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                if buffer.shape == saved.shape and not torch.equal(buffer, saved):
                    buffer.copy_(saved)


def keeps_module_modes(method: Callable) -> Callable:
    """Decorate an estimator method: run it with ``self.model`` in eval mode, then restore the
    train/eval mode of every submodule and every buffer as before the call (see
    :func:`eval_mode`)."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        with eval_mode(self.model):
            return method(self, *args, **kwargs)

    return wrapper
