"""``HookPairGGN``: the architecture-agnostic pairwise curvature backend (forward/backward hooks)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from laplace.utils import KronDecomposed
from torch import nn

from laplace_metric.curvature.base import PairCurvatureInterface
from laplace_metric.curvature.budget import budget_elements, working_bytes
from laplace_metric.curvature.folds import fold_gram
from laplace_metric.curvature.hooks.columns import ColumnPasses
from laplace_metric.curvature.hooks.diag import GramPolicy, graph_diag, plan_location_grams
from laplace_metric.curvature.hooks.graph_memory import SampleProbe, check_graph_fits, saved_bytes
from laplace_metric.curvature.hooks.kron import KFACApproximation, kron_factors
from laplace_metric.curvature.hooks.passes import ColumnPass
from laplace_metric.curvature.hooks.predictive import (
    covariance_chunk,
    embedding_rows,
)
from laplace_metric.curvature.hooks.sites import (
    Recorder,
    Site,
    batchnorm_reason,
)
from laplace_metric.curvature.layers import pair_rows, private_copy, sync_copy
from laplace_metric.enums import parse_enum
from laplace_metric.pairs.graph import PairGraph
from laplace_metric.pairs.terms import GraphTerms, PairTerms


class HookPairGGN(ColumnPasses, PairCurvatureInterface):
    """Pairwise GGN (diag, Kronecker, full) of any module graph, from hooks and ``torch.func``.

    In the spirit of curvlinops' KFAC: one forward pass of a private, hook-free copy of the
    model (synchronised with the user's model at every call; the user's model never carries
    a hook) records every *site* (see :mod:`laplace_metric.curvature.hooks.sites`): Linear,
    Conv1d/2d (``groups=1``, zero padding), LayerNorm and eval-mode BatchNorm affines, and the
    in-projection and out-projection of ``nn.MultiheadAttention`` self-attention (recomputed
    in plain operations). The square-root columns ``S_i = terms.factor[i]`` (raw-output space:
    the likelihood's normalisation is already folded in) are back-propagated from the
    encoder output ``g`` to every site output at once: a fit runs one forward pass of the
    batch and one backward pass per column with the graph retained, handing the folds ``c``
    columns at a time (see :mod:`laplace_metric.curvature.hooks.columns`), so residual
    connections, attention and functional code need no per-layer derivative table. With ``q`` the gradient at a site
    output and ``x`` its input:

    * **diag** (exact): a Linear on ``(B, in)`` folds ``q`` and ``x`` with
      :func:`~laplace_metric.curvature.folds.fold_linear` without per-sample gradients;
      shared weights (tokens, conv positions, a layer called twice) form the per-sample
      gradients ``G_i = sum_t q_it x_it^T`` a block of output rows at a time and fold them with
      :func:`~laplace_metric.curvature.folds.fold_diag`; biases and affines likewise.
    * **kron**: Linear/Conv weights get ``[fold_output_factor, fold_input_factor]``
      (``kfac_approximation='expand'``, the default and what the other backends compute, or
      ``'reduce'``; see :class:`KFACApproximation`); 1-D parameters their exact dense block
      (:func:`~laplace_metric.curvature.folds.fold_gram` of per-sample gradients).
    * **full**: :func:`~laplace_metric.curvature.folds.fold_gram` of the per-sample factors
      ``u_i = J_i^T S_i`` of all parameters (only feasible for small models).

    Parameters no site covers (class tokens, positional embeddings, grouped convolutions, a
    MultiheadAttention called with masks, embeddings) get exact per-sample gradients: from the
    same backward passes where the parameter has shape ``(1, *rest)`` and the model broadcasts
    it over the batch (checked once on two samples; ``row_params``), else from
    ``torch.func`` (a vmapped vector-Jacobian product on the hook-free copy). Their diagonal
    and dense blocks are exact. For Kronecker structure such a parameter must be 1-D or have a
    leading dimension of 1 (``(1, *, n)``: class token, positional embedding); the latter gets
    its exact dense block, stored in laplace-torch's ``Kron`` layout as
    ``[[n_pairs]] (x) (block / n_pairs)`` so that the estimator's normalisation of the input
    factor by the number of pairs leaves it exact. Anything else raises with the name of the
    parameter (use diag).

    Memory: the columns back-propagated at once are chosen such that their gradients at all
    sites hold at most :attr:`max_elements` numbers; per-sample gradient blocks are formed
    under the same bound (a block of output rows, a chunk of samples for ``torch.func``); the
    location-Gram accumulators of all shared weights, which live across column chunks, hold
    at most ``4 * max_elements`` numbers together, and the output gradients of those weights
    are gathered over passes up to ``max_elements`` numbers before each update. The forward
    graph a pass keeps (autograd's saved tensors and the recorded layer inputs and outputs,
    measured per row on a one-sample probe: :mod:`~laplace_metric.curvature.hooks.graph_memory`)
    is counted first: :attr:`max_elements` fits the budget less that graph, and a batch whose
    graph alone exceeds the budget is a :class:`~laplace_metric.memory.MemoryBudgetError`
    naming the batch size that fits. Peak live memory is about that graph plus a few times
    ``max_elements``.

    The folds are those of every backend (:mod:`laplace_metric.curvature.folds`), with a
    closed form for components whose block is ``a I + b 1 1^T`` (all pairs of a class: every
    ``positives`` graph).

    Limitations: BatchNorm must be in evaluation mode with running statistics (batch
    statistics couple the samples); a parameter of a site that is also used outside its layer
    (weight tying) is not supported; inputs must be tensors. The per-pair path (likelihoods
    whose pair Hessians do not factor per sample) reuses the same machinery on the pair batch
    ``cat([x_a, x_b])`` with a graph of the pairs.

    Parameters
    ----------
    model, likelihood, last_layer, subnetwork_indices
        See :class:`~laplace_metric.curvature.PairCurvatureInterface`.
    kfac_approximation : KFACApproximation or str, default='expand'
        Kronecker factors of shared weights.
    """

    #: Default bound on the elements of one intermediate tensor (see :attr:`max_elements`).
    DEFAULT_MAX_ELEMENTS: int = 2**25
    #: Peak working memory of a fit in units of ``max_elements`` numbers (measured on an
    #: all-layer ResNet-18 diag, one batch of 64, float32: 1.79 GB above the start at
    #: ``2**25``, 1.11 GB at ``15.6M`` (a factor of 16), 0.80 GB at ``12.5M`` (20)).
    MEMORY_PER_ELEMENT_BOUND: int = 20
    #: The estimator's ``memory_budget`` in bytes, set before each fit and prediction
    #: (``None``: not bounded by a budget).
    memory_budget: int | None = None
    #: Shared weights (conv positions, tokens) through location Gram matrices: ``None`` picks
    #: the cheapest exact form per weight (see :mod:`laplace_metric.curvature.hooks.diag`);
    #: ``False`` forces per-column gradients, ``True`` a Gram form (``'gram'``: whole
    #: components, ``'split'``: per-sample Grams and component sums, where the graph allows).
    location_gram: bool | str | None = None

    def __init__(
        self,
        *args: Any,
        kfac_approximation: KFACApproximation | str = KFACApproximation.EXPAND,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kfac_approximation = parse_enum(
            KFACApproximation, kfac_approximation, "kfac_approximation"
        )
        self._copy: tuple[nn.Module, nn.Module] | None = None
        self._max_elements = self.DEFAULT_MAX_ELEMENTS
        self._graph_bytes = 0  # the forward graph kept during the current passes
        self._probes: dict[tuple, tuple[nn.Module, SampleProbe]] = {}  # keyed by id(module)

    @property
    def max_elements(self) -> int:
        """Bound on the elements of one intermediate tensor (back-propagated columns at all
        sites, a block of per-sample gradients): the value set (default ``2**25``, 128 MiB of
        float32), lowered so that :attr:`MEMORY_PER_ELEMENT_BOUND` times it fits
        :attr:`memory_budget` less the forward graph that the current passes keep (at least
        ``2**16``)."""
        budget = self.memory_budget
        if budget is not None:
            budget = max(budget - self._graph_bytes, 0)
        return budget_elements(
            self._max_elements, budget, self._itemsize(), self.MEMORY_PER_ELEMENT_BOUND
        )

    @max_elements.setter
    def max_elements(self, value: int) -> None:
        self._max_elements = int(value)

    def _itemsize(self) -> int:
        return next(self.model.parameters()).element_size()

    # ------------------------------------------------------------------ the one-sample probe
    def _probe(self, module: nn.Module, inputs: torch.Tensor) -> SampleProbe:
        """What one recorded forward pass of one sample shows (see :class:`SampleProbe`):
        measured on ``inputs[:1]`` once per module and input shape, then cached."""
        key = (id(module), tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if key not in self._probes or self._probes[key][0] is not module:
            twin = self._private(module)
            seen: dict[str, Any] = {}

            def record() -> list[torch.Tensor]:
                _, probe, sites = self._record(module, inputs[:1])
                seen["elements"] = sum(s.output.numel() for s in sites) + probe.numel()
                seen["covered"] = frozenset(
                    n for s in sites for n in (s.weight, s.bias) if n is not None
                )
                return [t for site in sites for t in (site.inputs, site.output)]

            kept = saved_bytes(twin, record)
            self._probes[key] = (module, SampleProbe(seen["elements"], seen["covered"], kept))
        return self._probes[key][1]

    @contextmanager
    def _keeping_graph(self, module: nn.Module, inputs: torch.Tensor) -> Iterator[None]:
        """The forward graph of ``inputs`` is counted against the budget while the passes
        run (:attr:`max_elements` is lowered by it); a
        :class:`~laplace_metric.memory.MemoryBudgetError` names the batch size that fits if
        the graph alone exceeds the budget."""
        per_row, n_rows = self._probe(module, inputs).kept_bytes, inputs.shape[0]
        check_graph_fits(
            per_row,
            n_rows,
            self.memory_budget,
            f"HookPairGGN: the forward graph of a batch of {n_rows} samples",
            "batches of at most {k} samples",
        )
        with self._reserving(per_row * n_rows):
            yield

    @contextmanager
    def _reserving(self, graph_bytes: int) -> Iterator[None]:
        """:attr:`max_elements` leaves ``graph_bytes`` of the budget to a kept graph while
        the block runs."""
        self._graph_bytes = graph_bytes
        try:
            yield
        finally:
            self._graph_bytes = 0

    def _copies_that_fit(self, graph_bytes: int, elements: int) -> int:
        """How many copies of a pass fit the budget, for passes that repeat their rows (one
        copy: a forward graph of ``graph_bytes`` and columns of ``elements`` numbers, which
        take :attr:`MEMORY_PER_ELEMENT_BOUND` bytes-per-item each); at least 1."""
        if self.memory_budget is None:
            return 2**62
        per_copy = graph_bytes + working_bytes(
            elements, self._itemsize(), self.MEMORY_PER_ELEMENT_BOUND
        )
        return max(1, int(self.memory_budget // max(per_copy, 1)))

    # ------------------------------------------------------------------ the hooked pass
    def _private(self, module: nn.Module) -> nn.Module:
        """The hook-free private copy of ``module``, synchronised with it."""
        if self._copy is None or self._copy[0] is not module:
            twin = private_copy(module)
            for sub in twin.modules():
                if getattr(sub, "inplace", False) is True:
                    sub.inplace = False
            self._copy = (module, twin)
        twin = self._copy[1]
        sync_copy(module, twin)
        return twin

    def _record(
        self,
        module: nn.Module,
        inputs: Any,
        batch: int | None = None,
        previous: list[Site] | None = None,
        rows: dict[str, torch.Tensor] | None = None,
    ) -> tuple[nn.Module, torch.Tensor, list[Site]]:
        """One forward pass of the private copy recording the sites (inputs of the first
        ``batch`` rows only: the rows repeat the batch; reused from ``previous`` sites), with
        the parameters in ``rows`` replaced by the given tensors (see :meth:`_row_params`)."""
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(
                f"HookPairGGN needs tensor inputs, got {type(inputs).__name__}; use "
                "ReferencePairGGN for dict-like inputs."
            )
        twin = self._private(module)
        for name, sub in twin.named_modules():
            if isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                reason = batchnorm_reason(sub)
                if reason is not None:
                    raise ValueError(f"HookPairGGN: '{name}': {reason}.")
        with Recorder(twin, batch=batch, previous=previous) as recorder, torch.enable_grad():
            if rows:
                g = torch.func.functional_call(twin, rows, (inputs,), strict=False)
            else:
                g = twin(inputs)
        return twin, g, recorder.sites

    # ------------------------------------------------------------------ pair graph
    def _gram_policy(self) -> GramPolicy:
        return GramPolicy(self.location_gram, self.max_elements)

    def _graph_diag(self, module, inputs, g, terms):
        graph, factor = terms.graph, terms.factor
        order = graph.component_order()
        if order is not None:  # components contiguous: blocks of samples are views
            inputs, factor, graph = inputs[order], factor[order], graph.induced(order)
        with self._keeping_graph(module, inputs):
            passes = self._passes(module, inputs, factor.permute(2, 0, 1))
            n_columns, policy = factor.shape[2], self._gram_policy()
            return graph_diag(passes, graph, n_columns, policy, self._plan_location_grams)

    def _plan_location_grams(
        self, column_pass: ColumnPass, graph: PairGraph, n_columns: int, policy: GramPolicy
    ) -> dict[str, tuple[Any, torch.Tensor]]:
        """See :func:`laplace_metric.curvature.hooks.diag.plan_location_grams`."""
        return plan_location_grams(column_pass, graph, n_columns, policy)

    def _graph_full(self, module, inputs, g, terms):
        total = None
        with self._keeping_graph(module, inputs):
            for column_pass in self._passes(module, inputs, terms.factor.permute(2, 0, 1)):
                part = fold_gram(column_pass.all_grads(), terms.graph)
                total = part if total is None else total + part
        return total

    def _graph_kron(self, module, inputs, g, terms):
        reduce = self.kfac_approximation == KFACApproximation.REDUCE
        with self._keeping_graph(module, inputs):
            passes = self._passes(module, inputs, terms.factor.permute(2, 0, 1))
            return kron_factors(passes, terms.graph, reduce)

    # ------------------------------------------------------------------ per-pair path
    def _pair(self, structure: str, module, inputs, g, terms: PairTerms):
        rows, factor, _ = pair_rows(inputs, terms)
        part = GraphTerms(terms.loss, factor, PairGraph.of_pair_batch(terms.signs, terms.one_sided))
        return self._structure_method(structure, graph=True)(module, rows, None, part)

    def _diag(self, module, inputs, g, terms):
        return self._pair("diag", module, inputs, g, terms)

    def _kron(self, module, inputs, g, terms):
        return self._pair("kron", module, inputs, g, terms)

    def _full(self, module, inputs, g, terms):
        return self._pair("full", module, inputs, g, terms)

    # ------------------------------------------------------------------ Jacobians
    def _raw_jacobians(self, module: nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        twin = self._private(module)
        with torch.no_grad():
            g = twin(inputs)
        batch, dim = g.shape
        eye = torch.eye(dim, dtype=g.dtype, device=g.device)
        columns = eye[:, None, :].expand(dim, batch, dim)
        with self._keeping_graph(module, inputs):
            parts = [p.all_grads() for p in self._passes(module, inputs, columns)]
        return torch.cat(parts, dim=0).transpose(0, 1), g

    # ------------------------------------------------------------------ predictive
    def predictive_covariance(
        self, x: torch.Tensor, posterior: Any, diagonal: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Linearised predictive ``(z, J Sigma J^T)`` without a ``B x D x P`` Jacobian.

        See :func:`laplace_metric.curvature.hooks.predictive_covariance`. ``diagonal``: the
        variances ``(B, D)`` only, never a ``D x D`` product.
        """
        z, (cov,) = self._predictive(x, [posterior], diagonal)
        return z, cov

    def predictive_variances(
        self, x: torch.Tensor, posteriors: list[Any]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The GLM variances ``(B, D)`` of ``x`` under each of several posteriors of the same
        model (e.g. fitted and prior), from one set of backward passes.

        Parameters
        ----------
        x : torch.Tensor
            Query inputs ``(B, ...)``.
        posteriors : list
            Each as ``posterior`` of :meth:`predictive_covariance`.

        Returns
        -------
        z : torch.Tensor
            Embeddings ``(B, D)``.
        variances : list of torch.Tensor
            ``(B, D)`` per posterior, in order.
        """
        return self._predictive(x, list(posteriors), diagonal=True)

    def _predictive(
        self, x: torch.Tensor, posteriors: list[Any], diagonal: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.subnetwork_indices is not None:
            raise ValueError("predictive_covariance does not support subnetwork Laplace.")
        for posterior in posteriors:
            if not isinstance(posterior, (KronDecomposed, torch.Tensor)):
                raise TypeError(
                    "posterior must be the diagonal posterior variances (a tensor) or a "
                    f"KronDecomposed posterior precision, got {type(posterior).__name__}."
                )
        module, inputs = self._target(x)
        with torch.no_grad():
            g = self._private(module)(inputs)
        batch, dim = g.shape
        rows_of = embedding_rows(self.likelihood, g)  # the embedding Jacobian's rows
        # all D columns of a sample chunk in one pass: both sides of C_i[d, e] are needed
        probe = self._probe(module, inputs)
        per_sample, per_row = probe.elements, probe.kept_bytes
        step = min(batch, self.max_elements // max(dim * per_sample, 1))
        step = max(1, min(step, self._copies_that_fit(dim * per_row, dim * per_sample)))
        chunks: list[list[torch.Tensor]] = [[] for _ in posteriors]
        policy = self._gram_policy()
        with self._reserving(step * dim * per_row):  # the chunk's repeated graph
            for start in range(0, batch, step):
                rows = inputs[start : start + step]
                columns = rows_of[:, start : start + step]
                for column_pass in self._passes(module, rows, columns, all_columns=True):
                    for posterior, parts in zip(posteriors, chunks):
                        parts.append(covariance_chunk(column_pass, posterior, policy, diagonal))
        return self.likelihood.embed(g), [torch.cat(parts) for parts in chunks]
