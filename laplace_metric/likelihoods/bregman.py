"""The contrastive likelihood on a learned Bregman divergence.

``delta(z_a, z_b) = D_phi(z_a, z_b)``, so a positive pair costs ``D_phi / 2`` and a negative
pair ``max(0, margin - D_phi) / 2``. The Laplace step holds ``phi`` fixed: the posterior is over
the encoder weights only, with ``phi`` a fixed part of the likelihood (train it jointly with the
encoder beforehand, see :mod:`laplace_metric.bregman.losses`).

Curvature. With ``x = z_a`` and ``y = z_b``, the exact Hessian of ``D_phi`` is
``[[H(x), -H(y)], [-H(y), H(y) - grad^3 phi(y)[x - y]]]`` with ``H = hess phi``; at coincident
embeddings ``x = y`` it is ``[[H, -H], [-H, H]]`` (positive semi-definite, and the gradient of
``D`` vanishes there, so it is also the exact Hessian through any embedding map). We use this
coincident-point form for every pair, evaluated by default at the second embedding ``z_b`` (the
reference, where ``grad phi`` is taken; the cross blocks are then exact for every pair), times
``1/2`` for ``delta / 2``: ``L = chol(H(z_b) / 2)``.
"""

from __future__ import annotations

from enum import Enum
from itertools import chain
from typing import Any

import torch
from torch import nn

from laplace_metric.bregman.divergence import BregmanDivergence
from laplace_metric.bregman.potentials import ConvexPotential
from laplace_metric.enums import HessianMethod, parse_enum
from laplace_metric.likelihoods.base import PairLikelihood
from laplace_metric.mining import Pairs, check_labels


class HessianPoint(str, Enum):
    """Where ``hess phi`` is evaluated for a pair ``(z_a, z_b)``."""

    SECOND = "second"
    """At the second embedding ``z_b`` (the reference); the default."""

    FIRST = "first"
    """At the first embedding ``z_a`` (the query)."""

    MIDPOINT = "midpoint"
    """At ``(z_a + z_b) / 2``."""


def robust_cholesky(matrices: torch.Tensor, rel_tol: float = 1e-6) -> torch.Tensor:
    """Batched square roots ``L`` with ``L L^T = A`` of symmetric PSD matrices ``A``.

    Tries a Cholesky factorisation; matrices where it fails fall back to an eigendecomposition
    ``V diag(sqrt(lambda)) V^T``-style root ``V diag(sqrt(lambda))``, with eigenvalues down to
    ``-rel_tol * max|lambda|`` treated as round-off and clipped to 0.

    Parameters
    ----------
    matrices : torch.Tensor
        Symmetric matrices, shape ``(M, D, D)``.
    rel_tol : float, default=1e-6
        Relative tolerance for negative eigenvalues.

    Returns
    -------
    root : torch.Tensor
        Shape ``(M, D, D)``.

    Raises
    ------
    ValueError
        If a matrix is not finite or has an eigenvalue below ``-rel_tol * max|lambda|``, i.e.
        the potential is not convex there.
    """
    if not bool(torch.isfinite(matrices).all()):
        raise ValueError("The potential's Hessian has NaN or inf entries.")
    sym = (matrices + matrices.mT) / 2
    root, info = torch.linalg.cholesky_ex(sym)
    failed = info != 0
    if bool(failed.any()):
        evals, evecs = torch.linalg.eigh(sym[failed])
        scale = evals.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(sym.dtype).tiny)
        if bool((evals < -rel_tol * scale).any()):
            worst = float((evals / scale).min())
            raise ValueError(
                "The potential's Hessian is not positive semi-definite at some embeddings "
                f"(smallest relative eigenvalue {worst:.3g}); phi must be convex "
                "(use an ICNNPotential with alpha > 0)."
            )
        root = root.clone()
        root[failed] = evecs * evals.clamp(min=0).sqrt()[..., None, :]
    return root


class BregmanLikelihood(PairLikelihood):
    """Contrastive likelihood with ``delta = D_phi(z_a, z_b)`` for a learned convex ``phi``.

    The per-pair negative log-likelihood is ``D_phi / 2`` (positive) and
    ``max(0, margin - D_phi) / 2`` (negative). ``phi`` is held fixed in the Laplace step; see
    the module docstring for the curvature (``L = chol(hess phi / 2)`` at coincident points).
    ``D_phi`` is asymmetric, so pairs are ordered: by default every ordered pair ``(i, j)`` of a
    batch is used, and a miner's pairs are kept in the order it gives them.

    Parameters
    ----------
    divergence : BregmanDivergence or ConvexPotential
        The divergence, or a potential that is wrapped in a :class:`BregmanDivergence`.
    margin : float, default=1.0
        Hinge margin on ``D_phi`` for negative pairs.
    normalize : bool, default=True
        L2-normalise the encoder output before the divergence.
    hessian_method : {'positives', 'fixed', 'full'}, default='positives'
        How the indefinite pairwise Hessian is made PSD.
    miner : callable or str, optional
        A pytorch-metric-learning miner or its name (e.g. ``'multisimilarity'``); ``None`` uses all pairs ``i < j`` of the batch.
    hessian_point : {'second', 'first', 'midpoint'}, default='second'
        Where ``hess phi`` is evaluated for each pair.
    ordered_pairs : bool, default=True
        Without a miner, use every ordered pair ``(i, j)``, ``i != j``, so both directions of
        the asymmetric divergence enter the loss and the curvature (independently of the order
        of the samples in the batch). ``False`` uses the unordered pairs ``i < j`` of the base
        class. Pairs from a miner are used as the miner gives them.
    """

    name = "bregman"

    def __init__(
        self,
        divergence: BregmanDivergence | ConvexPotential,
        margin: float = 1.0,
        normalize: bool = True,
        hessian_method: HessianMethod | str = HessianMethod.POSITIVES,
        miner: Any | None = None,
        hessian_point: HessianPoint | str = HessianPoint.SECOND,
        ordered_pairs: bool = True,
    ) -> None:
        super().__init__(
            margin=margin, normalize=normalize, hessian_method=hessian_method, miner=miner
        )
        if isinstance(divergence, ConvexPotential):
            divergence = BregmanDivergence(divergence)
        if not isinstance(divergence, BregmanDivergence):
            raise TypeError(
                "divergence must be a BregmanDivergence or a ConvexPotential, got "
                f"{type(divergence).__name__}."
            )
        self.divergence = divergence
        self.hessian_point = parse_enum(HessianPoint, hessian_point, "hessian_point")
        self.ordered_pairs = bool(ordered_pairs)

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict[str, Any]:
        """Plain-Python configuration, including the divergence's (``weights_only``-safe)."""
        return {
            **super().config(),
            "hessian_point": self.hessian_point.value,
            "ordered_pairs": self.ordered_pairs,
            "divergence": self.divergence.config(),
        }

    def divergence_state(self) -> dict[str, torch.Tensor]:
        """The potential's ``state_dict`` (its learned parameters), detached copies.

        Together with ``config()['divergence']`` it rebuilds the divergence with
        :func:`laplace_metric.bregman.divergence_from_config`.
        """
        return {k: v.detach().clone() for k, v in self.divergence.potential.state_dict().items()}

    def load_divergence_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a potential ``state_dict`` saved by :meth:`divergence_state` (strict)."""
        self.divergence.potential.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """The likelihood's tensors: the potential's parameters (see :meth:`divergence_state`).

        Stored by the estimators' ``state_dict`` next to :meth:`config`; loadable with
        ``torch.load(..., weights_only=True)``.
        """
        return self.divergence_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the potential's parameters from :meth:`state_dict`."""
        self.load_divergence_state(state)

    def parameters(self) -> list[nn.Parameter]:
        """The potential's parameters (to train ``phi`` jointly with the encoder)."""
        return list(self.divergence.parameters())

    # ------------------------------------------------------------------ geometry
    def _check_dim(self, z: torch.Tensor) -> None:
        if z.shape[-1] != self.divergence.dim:
            raise ValueError(
                f"The encoder returns {z.shape[-1]}-dimensional embeddings but the Bregman "
                f"potential is defined on R^{self.divergence.dim}."
            )
        tensor = next(chain(self.divergence.parameters(), self.divergence.buffers()), None)
        if tensor is not None and tensor.device != z.device:
            raise ValueError(
                f"The embeddings are on {z.device} but the Bregman potential is on "
                f"{tensor.device}; move the potential with .to(device)."
            )
        if tensor is not None and tensor.dtype != z.dtype:
            raise TypeError(
                f"The embeddings have dtype {z.dtype} but the Bregman potential has "
                f"{tensor.dtype}; convert the potential (e.g. .double()) to match the model."
            )

    def dissimilarity(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """``D_phi(z_a, z_b)`` per pair, shape ``(M,)``."""
        self._check_dim(z_a)
        return self.divergence(z_a, z_b)

    def mine(self, z: torch.Tensor, labels: torch.Tensor) -> Pairs:
        """Mine the pairs of a batch: all ordered pairs ``i != j`` by default (see
        ``ordered_pairs``), else the miner's pairs or the unordered pairs ``i < j``."""
        if self.miner is not None or not self.ordered_pairs:
            return super().mine(z, labels)
        labels = check_labels(labels, z.shape[0])
        n = labels.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=labels.device)
        first, second = off_diagonal.nonzero(as_tuple=True)
        return Pairs(first, second, labels[first] == labels[second])

    def pair_losses(self, z: torch.Tensor, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair NLL; uses one all-pairs matrix (one gradient call on the batch) when the
        batch has more pairs than samples, element-wise divergences otherwise."""
        self._check_dim(z)
        if len(pairs) <= z.shape[0]:
            return super().pair_losses(z, pairs)
        delta = self.divergence.pairwise(z)[pairs.first, pairs.second]
        hinge = self.margin - delta
        losses = torch.where(pairs.positive, delta, hinge.clamp(min=0)) / 2
        return losses, pairs.positive | (hinge > 0)

    def hessian_sqrt(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """``L = chol(hess phi(p) / 2)`` per pair, ``p`` per ``hessian_point``; shape ``(M, D, D)``."""
        self._check_dim(z_a)
        if self.hessian_point == HessianPoint.SECOND:
            point = z_b
        elif self.hessian_point == HessianPoint.FIRST:
            point = z_a
        else:
            point = (z_a + z_b) / 2
        if point.shape[0] == 0:
            return point.new_zeros(0, self.divergence.dim, self.divergence.dim)
        hess = self.divergence.potential.hessian(point.detach())
        return robust_cholesky(hess.detach() / 2)
