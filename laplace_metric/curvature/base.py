"""The curvature-backend interface for pairwise likelihoods.

A backend computes, for one batch, the signed sum over the contributing pairs of the pairwise
GGN ``sum_m s_m V_m V_m^T`` with ``V_m = J_a^T S_a + J_b^T S_b`` (see
:class:`laplace_metric.likelihoods.PairTerms`) in a diagonal, Kronecker-factored or dense
structure, and the Jacobians of the embedding for the linearised predictive. Projection to
PSD and the normalisation of Kronecker input factors happen in the estimator, after all batches
are summed, so that ``fit`` over several loaders equals one fit over their union.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, NamedTuple

import torch
from laplace.curvature import GGNInterface
from laplace.utils import Kron
from torch import nn

from laplace_metric.curvature.projection import add_curvature
from laplace_metric.likelihoods.base import PairLikelihood
from laplace_metric.pairs.terms import GraphTerms, PairTerms


class BatchCurvature(NamedTuple):
    """Curvature of one batch.

    Attributes
    ----------
    loss : torch.Tensor
        Batch-summed negative log-likelihood of all mined pairs.
    hessian : torch.Tensor or laplace.utils.Kron
        Signed pairwise GGN summed over the contributing pairs. For Kronecker structure, each
        weight has factors ``[B, A]`` with ``B = sum_m s_m sum_t Q Q^T`` (output side) and the
        *unnormalised* input factor ``A = sum_m sum_t e e^T / T``; each 1-D parameter has one
        exact dense signed block.
    n_pairs : int
        Number of pairs with a non-zero sign (those that contribute curvature).
    """

    loss: torch.Tensor
    hessian: torch.Tensor | Kron
    n_pairs: int


class PairCurvatureInterface(GGNInterface):
    """Base class of the pairwise curvature backends.

    Parameters
    ----------
    model : torch.nn.Module
        The encoder (a ``laplace.utils.FeatureExtractor`` for last-layer Laplace).
    likelihood : PairLikelihood
        The pairwise likelihood that mines pairs and supplies the pair factors.
    last_layer : bool, default=False
        Only the parameters of ``model.last_layer``.
    subnetwork_indices : torch.LongTensor, optional
        Indices into the vectorised parameters of ``model`` (subnetwork Laplace).
    """

    #: Whether the batch forward pass must keep its autograd graph (BackPACK-style backends).
    forward_needs_graph: bool = False
    #: Fold the pair graph per sample when the likelihood allows it (see
    #: :mod:`laplace_metric.curvature.folds`); ``False`` forces the per-pair path.
    use_pair_graph: bool = True
    #: Pairs whose factors are formed at once on the per-pair path (bounds its memory).
    max_pairs_per_chunk: int = 4096

    def __init__(
        self,
        model: nn.Module,
        likelihood: PairLikelihood,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        **kwargs: Any,
    ) -> None:
        if not isinstance(likelihood, PairLikelihood):
            raise TypeError(
                f"{type(self).__name__} needs a PairLikelihood (e.g. ContrastiveLikelihood), "
                f"got {likelihood!r}; use it through laplace.Laplace(..., "
                "likelihood='contrastive' | 'bregman')."
            )
        if kwargs:
            raise TypeError(f"Unexpected backend arguments: {sorted(kwargs)}.")
        self.model = model
        self.likelihood = likelihood
        self.last_layer = last_layer
        self.subnetwork_indices = subnetwork_indices
        self.dict_key_x = dict_key_x
        self.dict_key_y = dict_key_y
        self.factor = 1.0

    # ------------------------------------------------------------------ helpers
    @property
    def _model(self) -> nn.Module:
        return self.model.last_layer if self.last_layer else self.model

    @property
    def params(self) -> list[nn.Parameter]:
        """The model's parameters that require gradients, in ``model.parameters()`` order."""
        return [p for p in self._model.parameters() if p.requires_grad]

    def _target(self, x: torch.Tensor | MutableMapping) -> tuple[nn.Module, Any]:
        """The module whose parameters are inferred, and its input for batch ``x``."""
        if self.last_layer:
            with torch.no_grad():
                _, features = self.model.forward_with_features(x)
            return self.model.last_layer, features.detach()
        return self.model, x

    def _forward(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        if self.forward_needs_graph:
            return module(inputs)
        with torch.no_grad():
            return module(inputs)

    def _select(self, values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Restrict parameter dimensions to the subnetwork, if any."""
        if self.subnetwork_indices is None:
            return values
        for dim in dims:
            values = values.index_select(dim, self.subnetwork_indices.to(values.device))
        return values

    def _n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    # ------------------------------------------------------------------ public API
    def diag(
        self, x: torch.Tensor | MutableMapping, y: torch.Tensor, **kwargs: Any
    ) -> BatchCurvature:
        """Signed diagonal of the pairwise GGN of one batch."""
        return self._curvature(x, y, "diag")

    def full(
        self, x: torch.Tensor | MutableMapping, y: torch.Tensor, **kwargs: Any
    ) -> BatchCurvature:
        """Signed dense pairwise GGN of one batch."""
        return self._curvature(x, y, "full")

    def kron(
        self, x: torch.Tensor | MutableMapping, y: torch.Tensor, **kwargs: Any
    ) -> BatchCurvature:
        """Signed Kronecker factors of the pairwise GGN of one batch (see :class:`BatchCurvature`)."""
        if self.subnetwork_indices is not None:
            raise ValueError("Kronecker structure is not available for subnetwork Laplace.")
        return self._curvature(x, y, "kron")

    # ------------------------------------------------------------------ dispatch
    def _zeros(self, structure: str, g: torch.Tensor) -> torch.Tensor | Kron:
        if structure == "kron":
            return Kron.init_from_model(self.params, g.device, g.dtype)
        p = self._n_params() if self.subnetwork_indices is None else len(self.subnetwork_indices)
        shape = (p,) if structure == "diag" else (p, p)
        return torch.zeros(shape, dtype=g.dtype, device=g.device)

    def _finish(self, structure: str, value: torch.Tensor | Kron) -> torch.Tensor | Kron:
        if structure == "diag":
            return self._select(value, (0,))
        if structure == "full":
            return self._select(value, (0, 1))
        return value if isinstance(value, Kron) else Kron(value)

    def _structure_methods(self, graph: bool) -> dict[str, Callable[..., torch.Tensor | Kron]]:
        """The explicit dispatch table ``{structure: method}`` of the pair-graph path
        (``graph``) or of the per-pair path."""
        if graph:
            return {"diag": self._graph_diag, "kron": self._graph_kron, "full": self._graph_full}
        return {"diag": self._diag, "kron": self._kron, "full": self._full}

    def _structure_method(self, structure: str, graph: bool) -> Callable[..., torch.Tensor | Kron]:
        table = self._structure_methods(graph)
        if structure not in table:
            raise ValueError(
                f"Unknown Hessian structure {structure!r}; use one of {sorted(table)}."
            )
        return table[structure]

    def _curvature(
        self, x: torch.Tensor | MutableMapping, y: torch.Tensor, structure: str
    ) -> BatchCurvature:
        module, inputs = self._target(x)
        g = self._forward(module, inputs)
        if self.likelihood.factors_per_sample and self.use_pair_graph:
            terms = self.likelihood.graph_terms(g, y)
            if terms.n_pairs == 0:
                return BatchCurvature(terms.loss, self._zeros(structure, g), 0)
            total, fold = None, self._structure_method(structure, graph=True)
            for cols in self._column_chunks(module, inputs, terms):
                part = GraphTerms(terms.loss, terms.factor[:, :, cols], terms.graph)
                value = fold(module, inputs, g, part)
                total = value if total is None else add_column_chunk(total, value)
            return BatchCurvature(terms.loss, self._finish(structure, total), terms.n_pairs)
        loss, n_pairs, chunks = self.likelihood.pair_term_chunks(g, y, self.max_pairs_per_chunk)
        if n_pairs == 0:
            return BatchCurvature(loss, self._zeros(structure, g), 0)
        total, per_pair = None, self._structure_method(structure, graph=False)
        for terms in chunks:
            value = per_pair(module, inputs, g, terms)
            total = add_curvature(total, value)
        return BatchCurvature(loss, self._finish(structure, total), n_pairs)

    def _column_chunks(self, module: nn.Module, inputs: Any, terms: GraphTerms) -> list[slice]:
        """Slices of the square-root columns processed per pass (all at once by default)."""
        n_cols = terms.factor.shape[2]
        return [slice(0, n_cols)]

    def jacobians(
        self, x: torch.Tensor | MutableMapping, enable_backprop: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians of the embedding (normalised if the likelihood normalises).

        Returns
        -------
        Js : torch.Tensor
            ``(batch, D, parameters)``.
        z : torch.Tensor
            Embeddings ``(batch, D)``.
        """
        module, inputs = self._target(x)
        jac, g = self._raw_jacobians(module, inputs)
        z = self.likelihood.embed(g)
        if self.likelihood.normalize:
            norms = g.norm(dim=-1)
            jac = (jac - z[:, :, None] * torch.einsum("bd,bdp->bp", z, jac)[:, None, :]) / norms[
                :, None, None
            ]
        jac = self._select(jac, (2,))
        if not enable_backprop:
            jac, z = jac.detach(), z.detach()
        return jac, z

    def functorch_jacobians(
        self, x: torch.Tensor | MutableMapping, enable_backprop: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.jacobians(x, enable_backprop)

    # ------------------------------------------------------------------ to implement
    def _diag(
        self, module: nn.Module, inputs: Any, g: torch.Tensor, terms: PairTerms
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not compute a diagonal GGN.")

    def _full(
        self, module: nn.Module, inputs: Any, g: torch.Tensor, terms: PairTerms
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not compute a dense GGN.")

    def _kron(self, module: nn.Module, inputs: Any, g: torch.Tensor, terms: PairTerms) -> Kron:
        raise NotImplementedError(f"{type(self).__name__} does not compute Kronecker factors.")

    def _raw_jacobians(self, module: nn.Module, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not compute Jacobians.")

    def _graph_diag(
        self, module: nn.Module, inputs: Any, g: torch.Tensor, terms: GraphTerms
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not fold a pair graph.")

    def _graph_full(
        self, module: nn.Module, inputs: Any, g: torch.Tensor, terms: GraphTerms
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not fold a pair graph.")

    def _graph_kron(
        self, module: nn.Module, inputs: Any, g: torch.Tensor, terms: GraphTerms
    ) -> Kron:
        raise NotImplementedError(f"{type(self).__name__} does not fold a pair graph.")


def add_column_chunk(total: torch.Tensor | Kron, part: torch.Tensor | Kron) -> torch.Tensor | Kron:
    """Sum of the curvatures of two chunks of square-root columns of one batch.

    Only the Kronecker output factor (and the dense 1-D blocks) add: the input factor does not
    depend on the columns. Chunks of pairs add both factors (:func:`add_curvature`).
    """
    if isinstance(total, torch.Tensor):
        return total + part
    return Kron(
        [
            [fa[0] + fb[0], fa[1]] if len(fa) == 2 else [fa[0] + fb[0]]
            for fa, fb in zip(total.kfacs, part.kfacs)
        ]
    )
