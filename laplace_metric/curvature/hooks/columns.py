"""How :class:`~laplace_metric.curvature.hooks.HookPairGGN` back-propagates its columns.

:class:`ColumnPasses` turns a batch and its square-root columns ``[R, B, D]`` into
:class:`~laplace_metric.curvature.hooks.passes.ColumnPass` objects of ``c`` columns each: the
gradients at every site output, and the per-sample gradients of the parameters no site covers.
A fit runs one forward pass of the batch and one backward pass per column with the graph
retained; parameters of shape ``(1, *rest)`` that the model broadcasts over the batch (class
tokens, positional embeddings) are expanded over the rows, so that the same backward passes
give their per-sample gradients; only the others need ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from laplace_metric.curvature.hooks.passes import ColumnPass, Entries
from laplace_metric.curvature.hooks.sites import Site, functional_grads

#: What one chunk of columns gives: the private copy, its sites, the site gradients and the
#: per-row parameter gradients.
Chunk = tuple[nn.Module, list[Site], dict[str, Entries], dict[str, torch.Tensor]]


class ColumnPasses:
    """The column passes of the hook backend (a mixin of ``HookPairGGN``: it uses the
    backend's ``_record``, ``_private``, ``_probe``, ``max_elements`` and
    ``_copies_that_fit``)."""

    #: Parameters of shape ``(1, *rest)`` that no site covers (class tokens, positional
    #: embeddings) get their per-sample gradients from the sites' own backward pass, expanded
    #: over the rows, where a check on two samples confirms it (``False``: always
    #: ``torch.func``).
    row_params: bool = True
    #: Fits run one forward pass per batch and one backward pass per column with the graph
    #: retained (``False``: one forward and one backward pass of the batch repeated ``c``
    #: times per chunk of ``c`` columns: the forward pass is then run once per column).
    retain_forward: bool = True

    @staticmethod
    def _others(twin: nn.Module, covered: frozenset[str]) -> list[str]:
        """Inferred parameters that no site covers (they get ``torch.func`` gradients)."""
        return [n for n, p in twin.named_parameters() if p.requires_grad and n not in covered]

    def _passes(
        self,
        module: nn.Module,
        inputs: torch.Tensor,
        columns: torch.Tensor,
        all_columns: bool = False,
    ) -> Iterator[ColumnPass]:
        """Back-propagate ``columns [R, B, D]`` in chunks (all at once if ``all_columns``).

        A fit (:attr:`retain_forward`) runs one forward pass of the batch and one backward
        pass per column with the graph retained; ``all_columns`` (the predictive) and
        ``retain_forward = False`` back-propagate ``c`` columns by one forward and one
        backward pass of the batch repeated ``c`` times. Either way the site gradients of
        ``c`` columns are yielded together, with ``c`` such that they hold at most
        :attr:`max_elements` numbers (the repeated forward pass costs as much as the backward
        passes: on an all-layer ResNet-50 it was half the time of the passes; ``torch.func``'s
        ``is_grads_batched`` falls back to loops and was slower still).

        Yields
        ------
        ColumnPass
            The site gradients (and ``torch.func`` gradients) of one chunk of columns.
        """
        batch = inputs.shape[0]
        probe = self._probe(module, inputs)
        per_sample = probe.elements
        others = self._others(self._private(module), probe.covered)
        n_cols = columns.shape[0]
        step = max(1, min(n_cols, self.max_elements // max(batch * per_sample, 1)))
        if all_columns:
            step = n_cols
        elif not self.retain_forward:  # the batch is repeated once per column of a pass
            graph = probe.kept_bytes * batch
            step = min(step, self._copies_that_fit(graph, batch * per_sample))
        by_row = self._row_params(module, inputs, columns, others)
        rest = [n for n in others if n not in by_row]
        if self.retain_forward and not all_columns:
            chunks = self._retained_passes(module, inputs, columns, step, by_row)
        else:
            chunks = self._repeated_passes(module, inputs, columns, step, by_row)
        for index, (twin, sites, entries, extra) in enumerate(chunks):
            cols = columns[index * step : (index + 1) * step]
            if rest:
                extra.update(
                    functional_grads(twin, inputs, rest, cols, per_sample * 4, self.max_elements)
                )
            yield ColumnPass(twin, sites, entries, extra)

    def _repeated_passes(
        self,
        module: nn.Module,
        inputs: torch.Tensor,
        columns: torch.Tensor,
        step: int,
        by_row: list[str],
    ) -> Iterator[Chunk]:
        """:meth:`_backpropagate` of ``step`` columns at a time (the recorded site inputs of
        the first pass reused)."""
        first = None
        for start in range(0, columns.shape[0], step):
            chunk = self._backpropagate(
                module, inputs, columns[start : start + step], first, by_row
            )
            first = chunk[1]
            yield chunk

    def _row_params(
        self, module: nn.Module, inputs: torch.Tensor, columns: torch.Tensor, others: list[str]
    ) -> list[str]:
        """The uncovered parameters whose per-sample gradients one pass gives by rows.

        A parameter of shape ``(1, *rest)`` that the model broadcasts over the batch (a class
        token, a positional embedding) is replaced by its expansion ``(N, *rest)`` over the
        ``N`` rows of a pass: the gradient at the expansion is then the per-row gradient, from
        the same backward pass as the sites (no ``torch.func`` pass). Each candidate is
        checked once against ``torch.func`` on two samples and two columns; a parameter used
        any other way (indexed, reduced over the batch, a shape error) keeps ``torch.func``.
        """
        if self.row_params is False:
            return []
        twin = self._private(module)
        params = dict(twin.named_parameters())
        names = [n for n in others if params[n].dim() >= 2 and params[n].shape[0] == 1]
        if not names:
            return []
        probe, cols = inputs[:2], columns[:2, :2]
        try:
            *_, fast = self._backpropagate(module, probe, cols, None, names)
        except RuntimeError:
            return []
        slow = functional_grads(twin, probe, names, cols, 1, self.max_elements)
        return [
            n
            for n in names
            if torch.allclose(fast[n], slow[n], rtol=1e-4, atol=1e-6 * float(slow[n].abs().max()))
        ]

    def _backpropagate(
        self,
        module: nn.Module,
        inputs: torch.Tensor,
        columns: torch.Tensor,
        previous: list[Site] | None,
        by_row: list[str] | None = None,
    ) -> Chunk:
        """One forward pass of the batch repeated ``c`` times and one backward pass of the
        columns ``[c, B, D]`` to every site output (and to the parameters ``by_row``, expanded
        over the rows: their per-sample gradients ``[c, B, *shape]``)."""
        n, batch = columns.shape[:2]
        rows = inputs.repeat(n, *([1] * (inputs.dim() - 1))) if n > 1 else inputs
        twin, g, sites, targets = self._hooked_forward(module, rows, batch, previous, by_row)
        cols = columns.to(g.dtype).reshape(n * batch, -1)
        grads = torch.autograd.grad(g, targets, cols, allow_unused=True) if targets else []
        del g
        entries, extra = self._collect(twin, sites, by_row, targets, grads, n, batch)
        for site in sites:
            site.output = None  # release the graph
        return twin, sites, entries, extra

    def _retained_passes(
        self,
        module: nn.Module,
        inputs: torch.Tensor,
        columns: torch.Tensor,
        step: int,
        by_row: list[str],
    ) -> Iterator[Chunk]:
        """One forward pass of the batch, then one backward pass per column with the graph
        retained, ``step`` columns ``[c, B, D]`` per yielded chunk (as :meth:`_backpropagate`
        yields them, without repeating the forward pass for every column)."""
        batch = inputs.shape[0]
        twin, g, sites, targets = self._hooked_forward(module, inputs, batch, None, by_row)
        for start in range(0, columns.shape[0], step):
            cols = columns[start : start + step].to(g.dtype)
            # each column's gradients go straight into the chunk's buffers (no second copy)
            grads = [t.new_empty((len(cols), *t.shape)) for t in targets]
            for j, col in enumerate(cols):
                parts = torch.autograd.grad(g, targets, col, allow_unused=True, retain_graph=True)
                for buffer, part in zip(grads, parts):
                    if part is None:  # the target does not reach the output
                        buffer[j].zero_()
                    else:
                        buffer[j].copy_(part)
                del parts
            yield (
                twin,
                sites,
                *self._collect(twin, sites, by_row, targets, grads, len(cols), batch),
            )
        for site in sites:
            site.output = None  # release the graph

    def _hooked_forward(
        self,
        module: nn.Module,
        rows: torch.Tensor,
        batch: int,
        previous: list[Site] | None,
        by_row: list[str] | None,
    ) -> tuple[nn.Module, torch.Tensor, list[Site], list[torch.Tensor]]:
        """The recorded forward pass of ``rows`` and the tensors to differentiate at: the
        site outputs, then the parameters ``by_row`` expanded over the rows."""
        twin = self._private(module)
        params = dict(twin.named_parameters())
        n_rows = rows.shape[0]
        expanded = {
            name: params[name].expand(n_rows, *params[name].shape[1:]) for name in by_row or []
        }
        twin, g, sites = self._record(module, rows, batch, previous, expanded)
        return twin, g, sites, [s.output for s in sites] + list(expanded.values())

    @staticmethod
    def _collect(
        twin: nn.Module,
        sites: list[Site],
        by_row: list[str] | None,
        targets: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        n: int,
        batch: int,
    ) -> tuple[dict[str, Entries], dict[str, torch.Tensor]]:
        """Site gradients as entries ``[c, B, T, out]`` and per-row parameter gradients
        ``[c, B, *shape]`` from the gradients at ``targets`` (``None``: unreached, zero)."""
        params = dict(twin.named_parameters())
        entries: dict[str, Entries] = {}
        for site, target, q in zip(sites, targets, grads):
            shape = (n, batch, *target.shape[1:])
            q = target.new_zeros(shape) if q is None else q.reshape(shape)
            q = site.columns(q)
            for name in (site.weight, site.bias):
                if name is not None:
                    entries.setdefault(name, []).append((site, q))
        extra = {}
        for name, grad in zip(by_row or [], grads[len(sites) :]):
            shape = (n, batch, *params[name].shape)
            extra[name] = params[name].new_zeros(shape) if grad is None else grad.reshape(shape)
        return entries, extra
