"""The pairwise likelihood interface shared by the contrastive and Bregman likelihoods.

A pairwise likelihood turns a batch of raw encoder outputs ``g`` and class labels into

* the batch-summed negative log-likelihood over the mined pairs, and
* for every pair ``m = (a, b)`` the square-root factors ``S_a, S_b`` (shape ``(D, R)``, in the
  space of the raw encoder output) and a sign ``s_m`` such that the pair's generalised
  Gauss-Newton matrix is ``s_m V_m V_m^T`` with ``V_m = J_a^T S_a + J_b^T S_b``, where ``J`` is
  the Jacobian of the raw output w.r.t. the weights.

Curvature backends only consume :class:`PairTerms`; they never see the loss itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from laplace_metric.enums import HessianMethod, parse_enum
from laplace_metric.mining import Pairs, check_labels, mine_pairs, resolve_miner
from laplace_metric.pairs.graph import PairGraph
from laplace_metric.pairs.terms import GraphTerms, PairTerms  # re-exported


class PairLikelihood(ABC):
    """Contrastive-style likelihood over mined pairs of embeddings.

    With ``delta(z_a, z_b)`` the likelihood's dissimilarity, the per-pair negative
    log-likelihood is ``delta / 2`` for a positive pair and ``max(0, margin - delta) / 2`` for a
    negative pair. Subclasses define ``delta`` and the square root of its Hessian.

    Parameters
    ----------
    margin : float
        Hinge margin on ``delta`` for negative pairs.
    normalize : bool
        L2-normalise the encoder output before the loss (embeddings on the unit sphere).
    hessian_method : HessianMethod or str
        ``'positives'``, ``'fixed'`` or ``'full'``.
    miner : callable or str, optional
        A pytorch-metric-learning miner, or its name (``'multisimilarity'``, built with its
        default arguments, see :func:`laplace_metric.mining.resolve_miner`); ``None`` uses
        all pairs of the batch.
    """

    name: str = "pairwise"

    def __init__(
        self,
        margin: float = 1.0,
        normalize: bool = True,
        hessian_method: HessianMethod | str = HessianMethod.POSITIVES,
        miner: Any | None = None,
    ) -> None:
        margin = float(margin)
        if not margin > 0 or margin != margin:
            raise ValueError(f"margin must be a positive number, got {margin}.")
        self.margin = margin
        self.normalize = bool(normalize)
        self.hessian_method = parse_enum(HessianMethod, hessian_method, "hessian_method")
        self.miner = resolve_miner(miner)

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict[str, Any]:
        """Plain-Python configuration, stored in ``state_dict`` (``weights_only``-safe)."""
        return {
            "name": self.name,
            "margin": self.margin,
            "normalize": self.normalize,
            "hessian_method": self.hessian_method.value,
            "miner": None if self.miner is None else type(self.miner).__name__,
        }

    def state_dict(self) -> dict[str, Any]:
        """Tensors the likelihood needs to be restored (none for the contrastive likelihood)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}.")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ geometry
    def embed(self, g: torch.Tensor) -> torch.Tensor:
        """Map raw encoder outputs ``(batch, D)`` to embeddings (L2-normalised if enabled)."""
        check_embeddings(g)
        if not self.normalize:
            return g
        norms = g.norm(dim=-1, keepdim=True)
        if bool((norms <= torch.finfo(g.dtype).tiny).any()):
            raise ValueError(
                "An encoder output has zero norm, so it cannot be L2-normalised; "
                "use normalize=False or check the encoder."
            )
        return g / norms

    def pull_back(self, factor: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Pull an embedding-space factor ``(M, D, R)`` back to raw-output space.

        With normalisation, ``dz/dg = (I - z z^T) / ||g||`` (symmetric).
        """
        if not self.normalize:
            return factor
        norms = g.norm(dim=-1)
        z = g / norms[:, None]
        proj = factor - z[:, :, None] * torch.einsum("md,mdr->mr", z, factor)[:, None, :]
        return proj / norms[:, None, None]

    @abstractmethod
    def dissimilarity(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """``delta(z_a, z_b)`` per pair, shape ``(M,)``."""

    @abstractmethod
    def hessian_sqrt(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """``L`` per pair, shape ``(M, D, R)``, such that the Hessian of ``delta / 2`` w.r.t.
        ``(z_a, z_b)`` is ``[[H, -H], [-H, H]]`` with ``H = L L^T``."""

    def pair_factors(
        self, z_a: torch.Tensor, z_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Square root ``(W_a, W_b)`` of the positive pair's Hessian ``[[W_a],[W_b]] [[W_a],[W_b]]^T``.

        The default is ``(L, -L)``; override for pair Hessians of another form.
        """
        root = self.hessian_sqrt(z_a, z_b)
        return root, -root

    # ------------------------------------------------------------------ loss
    def pair_losses(self, z: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair negative log-likelihood and whether each negative's hinge is active."""
        delta = self.dissimilarity(z[pairs.first], z[pairs.second])
        hinge = self.margin - delta
        losses = torch.where(pairs.positive, delta, hinge.clamp(min=0)) / 2
        active = pairs.positive | (hinge > 0)
        return losses, active

    def mine(self, z: torch.Tensor, labels: torch.Tensor) -> Pairs:
        """Mine the pairs of a batch of embeddings ``z`` with class ``labels``."""
        labels = check_labels(labels, z.shape[0])
        return mine_pairs(labels, z, self.miner)

    def loss(self, g: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        """Differentiable training loss: the negative log-likelihood of the mined pairs.

        Parameters
        ----------
        g : torch.Tensor
            Raw encoder outputs ``(batch, D)``.
        labels : torch.Tensor
            Class labels ``(batch,)``.
        reduction : {'sum', 'mean'}
            ``'sum'`` is the negative log-likelihood; ``'mean'`` averages over the pairs.

        Returns
        -------
        loss : torch.Tensor
        """
        z = self.embed(g)
        pairs = self.mine(z, labels)
        losses, _ = self.pair_losses(z, pairs)
        if reduction == "sum":
            return losses.sum()
        if reduction == "mean":
            return losses.mean() if len(pairs) else losses.sum()
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")

    # ------------------------------------------------------------------ curvature terms
    #: Whether every pair's Hessian square root is the same ``L`` for both samples of every
    #: pair (then the batch curvature folds per sample through a :class:`PairGraph`).
    factors_per_sample: bool = False

    def sample_factor(self, z: torch.Tensor) -> torch.Tensor:
        """The common square root ``L`` per sample, ``(B, D, R)`` (if :attr:`factors_per_sample`)."""
        raise NotImplementedError(f"{type(self).__name__} has pair-dependent Hessian factors.")

    @torch.no_grad()
    def pair_signs(
        self, g: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, Pairs, torch.Tensor, torch.Tensor]:
        """Embeddings, mined pairs, batch loss and signed curvature weight of every pair.

        The weight is ``+1`` for a positive pair, ``-1`` for an active negative and ``0`` for
        an inactive negative (or any negative with ``hessian_method='positives'``).

        Returns
        -------
        z : torch.Tensor
            Embeddings ``(batch, D)``.
        pairs : Pairs
        loss : torch.Tensor
            Batch-summed negative log-likelihood.
        signs : torch.Tensor
            ``(M,)``.
        """
        g = g.detach()
        z = self.embed(g)
        pairs = self.mine(z, labels)
        losses, active = self.pair_losses(z, pairs)
        signs = torch.where(pairs.positive, 1.0, -1.0).to(g.dtype) * active.to(g.dtype)
        if self.hessian_method == HessianMethod.POSITIVES:
            signs = signs * pairs.positive.to(g.dtype)
        return z, pairs, losses.sum(), signs

    def _factors(
        self, g: torch.Tensor, z: torch.Tensor, pairs: Pairs, signs: torch.Tensor
    ) -> PairTerms:
        w_a, w_b = self.pair_factors(z[pairs.first], z[pairs.second])
        one_sided = self.hessian_method == HessianMethod.FIXED
        if one_sided:
            w_a = torch.zeros_like(w_a)
        s_a = self.pull_back(w_a, g[pairs.first])
        s_b = self.pull_back(w_b, g[pairs.second])
        return PairTerms(pairs, torch.zeros((), dtype=g.dtype), s_a, s_b, signs, one_sided)

    @torch.no_grad()
    def pair_terms(self, g: torch.Tensor, labels: torch.Tensor) -> PairTerms:
        """Loss and curvature square roots of every mined pair (see :class:`PairTerms`).

        Parameters
        ----------
        g : torch.Tensor
            Raw encoder outputs ``(batch, D)``.
        labels : torch.Tensor
            Class labels ``(batch,)``.

        Returns
        -------
        terms : PairTerms
        """
        g = g.detach()
        z, pairs, loss, signs = self.pair_signs(g, labels)
        terms = self._factors(g, z, pairs, signs)
        terms.loss = loss
        return terms

    @torch.no_grad()
    def pair_term_chunks(
        self, g: torch.Tensor, labels: torch.Tensor, max_pairs: int
    ) -> tuple[torch.Tensor, int, Iterator[PairTerms]]:
        """The contributing pairs' terms in chunks of at most ``max_pairs`` pairs.

        Zero-weight pairs are dropped before any factor is formed, and the factors of one
        chunk are formed only when the chunk is reached, so peak memory is bounded by
        ``max_pairs``, not by the number of mined pairs.

        Returns
        -------
        loss : torch.Tensor
            Batch-summed negative log-likelihood of all mined pairs.
        n_pairs : int
            Number of contributing pairs.
        chunks : iterator of PairTerms
        """
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be a positive integer, got {max_pairs}.")
        g = g.detach()
        z, pairs, loss, signs = self.pair_signs(g, labels)
        keep = signs != 0
        pairs = Pairs(pairs.first[keep], pairs.second[keep], pairs.positive[keep])
        signs = signs[keep]

        def chunks() -> Iterator[PairTerms]:
            for start in range(0, len(signs), max_pairs):
                part = slice(start, start + max_pairs)
                sub = Pairs(pairs.first[part], pairs.second[part], pairs.positive[part])
                yield self._factors(g, z, sub, signs[part])

        return loss, len(signs), chunks()

    @torch.no_grad()
    def graph_terms(self, g: torch.Tensor, labels: torch.Tensor) -> GraphTerms:
        """Per-sample factors and the signed pair graph of a batch (see :class:`GraphTerms`).

        Only for likelihoods with :attr:`factors_per_sample`.
        """
        if not self.factors_per_sample:
            raise NotImplementedError(
                f"{type(self).__name__}'s pair Hessians do not factor per sample; use pair_terms."
            )
        g = g.detach()
        z, pairs, loss, signs = self.pair_signs(g, labels)
        one_sided = self.hessian_method == HessianMethod.FIXED
        graph = PairGraph.from_pairs(pairs.first, pairs.second, signs, g.shape[0], one_sided)
        factor = self.pull_back(self.sample_factor(z), g)
        return GraphTerms(loss, factor, graph)


def check_embeddings(g: torch.Tensor) -> None:
    """Raise a clear error for encoder outputs that are not finite ``(batch, D)`` tensors."""
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"The encoder must return a torch.Tensor, got {type(g).__name__}.")
    if g.ndim != 2:
        raise ValueError(
            f"The encoder must return embeddings of shape (batch, D), got {tuple(g.shape)}; "
            "flatten them in the model."
        )
    if not bool(torch.isfinite(g).all()):
        raise ValueError("The encoder returned NaN or inf embeddings; check the inputs and model.")
