"""Cross-covariances of two embeddings that share the encoder's weights, as pair statistics.

Under the (linearised) posterior, the raw encoder outputs ``g_i`` and ``g_j`` of two inputs are
jointly Gaussian with cross-covariance ``C_ij = J_i Sigma J_j^T``. The moments of a cosine
similarity or a squared distance (:mod:`~laplace_metric.predictive.similarity`) need, per pair
``(q, g)`` with unit embeddings ``a = z_q`` and ``b = z_g``, only the bilinear forms
``x^T C y`` for ``x, y in {a, b}`` and the trace of the three blocks ``C_qq``, ``C_gg`` and
``C_qg`` (:class:`Bilinear`). Two providers compute them:

* :class:`RotatedDiagonal` (last-layer ``nn.Linear`` head, diag or kron): every block is
  ``R diag(c_ij) R^T + C_b`` with ``c_ij[k] = sum_l W[k, l] psi_i[l] psi_j[l]``, where
  ``psi = phi Q_2`` are the rotated head features. For diag ``R = Q_2 = I`` and ``W`` holds the
  weight variances; for kron (precision ``(Q_1 (x) Q_2) diag(l_1 l_2^T + delta)(...)^T``,
  output factor first, exactly as laplace-torch's ``KronDecomposed``) ``R = Q_1`` and
  ``W = 1 / (l_1 l_2^T + delta)``, exact for any prior or damping. ``C_b`` is the bias block.
  All forms are matrix products over the feature dimension, except
  ``a^T C_qg b = sum_{k,l} W[k, l] (a_k psi_q[l]) (b_k psi_g[l])``, a product over ``D x N``.
* :class:`DenseFactors` (any other posterior): ``C_ij = L_i L_j^T`` from per-item factors
  ``L = J Sigma^(1/2)`` (``D x P``), with ``J`` the raw output's Jacobian.

Both work on all pairs of a query chunk and a gallery chunk (``(Q, G)`` results) or on a
gathered candidate set per query (``(Q, K)`` results, :class:`Pairing`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from laplace.utils.enums import HessianStructure

from laplace_metric.predictive.glm import kron_inverse_weights


class Bilinear(NamedTuple):
    """``a^T C a``, ``a^T C b``, ``b^T C a``, ``b^T C b`` and ``tr C`` of one block, per pair."""

    aa: torch.Tensor
    ab: torch.Tensor
    ba: torch.Tensor
    bb: torch.Tensor
    tr: torch.Tensor


class Traces(NamedTuple):
    """Traces of products of the blocks, per pair (``x`` = query, ``y`` = gallery item):
    ``tr(C_xx^2)``, ``tr(C_yy^2)``, ``tr(C_xx C_yy)``, ``tr(C_xy C_xy)``, ``tr(C_xy C_yx)``,
    ``tr(C_xx C_xy)``, ``tr(C_yy C_yx)``."""

    xx2: torch.Tensor
    yy2: torch.Tensor
    xx_yy: torch.Tensor
    xy_xy: torch.Tensor
    xy_yx: torch.Tensor
    xx_xy: torch.Tensor
    yy_yx: torch.Tensor


class Pairing:
    """All pairs of two chunks (``gathered=False``) or each query with its own candidates.

    Per-query tensors are ``(Q, ...)``; per-gallery tensors ``(G, ...)`` for all pairs, or
    ``(Q, K, ...)`` for gathered candidates. Results are ``(Q, G)`` or ``(Q, K)``.
    """

    def __init__(self, gathered: bool = False) -> None:
        self.gathered = gathered

    def mm(self, xq: torch.Tensor, yg: torch.Tensor) -> torch.Tensor:
        """``<xq, yg>`` over the last dimension for every pair."""
        if self.gathered:
            return torch.bmm(yg, xq[:, :, None])[:, :, 0]
        return xq @ yg.T

    def gal(self, v: torch.Tensor) -> torch.Tensor:
        """A per-gallery scalar, broadcast to pairs."""
        return v if self.gathered else v[None, :]

    @staticmethod
    def que(v: torch.Tensor) -> torch.Tensor:
        """A per-query scalar, broadcast to pairs."""
        return v[:, None]


@dataclass
class Items:
    """Per-item statistics: unit embeddings ``z`` (in the provider's basis) and norms ``n``.

    ``psi`` and ``c`` (rotated features and own diagonal variances) for
    :class:`RotatedDiagonal`; ``L`` (``(n, D, P)`` factors) for :class:`DenseFactors`.
    """

    z: torch.Tensor
    n: torch.Tensor
    psi: torch.Tensor | None = None
    c: torch.Tensor | None = None
    L: torch.Tensor | None = None

    def take(self, index: torch.Tensor) -> Items:
        """The items at ``index`` (any shape), e.g. ``(Q, K)`` candidates."""
        pick = {k: (v[index] if v is not None else None) for k, v in self.__dict__.items()}
        return Items(**pick)

    def slice(self, start: int, stop: int) -> Items:
        """The items ``start:stop``."""
        pick = {k: (v[start:stop] if v is not None else None) for k, v in self.__dict__.items()}
        return Items(**pick)


def _unit(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = g.norm(dim=-1)
    if bool((n <= torch.finfo(g.dtype).tiny).any()):
        raise ValueError("An embedding has zero norm, so its cosine similarity is undefined.")
    return g / n[..., None], n


class RotatedDiagonal:
    """A last-layer diag or kron posterior over ``g = W phi + b``, in its output eigenbasis.

    Parameters
    ----------
    W : torch.Tensor
        ``(D, N)`` variances of the rotated weights.
    R, Q2 : torch.Tensor or None
        Output and input rotations (``None``: identity).
    bias : torch.Tensor or None
        ``(D, D)`` covariance of the rotated bias, ``R^T C_b R``.
    weight, bias_mean : torch.Tensor
        The head's mean weight ``(D, N)`` and bias ``(D,)`` (or ``None``).
    """

    def __init__(self, W, R, Q2, bias, weight, bias_mean) -> None:
        self.W, self.R, self.Q2, self.bias = W, R, Q2, bias
        self.weight, self.bias_mean = weight, bias_mean

    @classmethod
    def from_laplace(cls, la) -> RotatedDiagonal:
        """From a fitted last-layer diag or kron estimator with an ``nn.Linear`` head."""
        head = la.model.last_layer
        D, N = head.out_features, head.in_features
        mean = la.mean.detach()
        weight = mean[: D * N].reshape(D, N)
        bias_mean = mean[D * N :] if head.bias is not None else None
        if la._structure == HessianStructure.DIAG:
            var = la.posterior_variance.detach()
            bias = torch.diag(var[D * N :]) if head.bias is not None else None
            return cls(var[: D * N].reshape(D, N), None, None, bias, weight, bias_mean)
        precision = la.posterior_precision
        Q1, Q2 = precision.eigenvectors[0]
        W = kron_inverse_weights(precision.eigenvalues[0], precision.deltas[0], precision.damping)
        bias = None
        if head.bias is not None:
            Qb = precision.eigenvectors[1][0]
            wb = kron_inverse_weights(
                precision.eigenvalues[1], precision.deltas[1], precision.damping
            )
            bias = Q1.T @ ((Qb * wb) @ Qb.T) @ Q1
        return cls(W, Q1, Q2, bias, weight, bias_mean)

    def state(self) -> dict[str, torch.Tensor | None]:
        """The tensors that define the posterior (for saving)."""
        return {k: getattr(self, k) for k in ("W", "R", "Q2", "bias", "weight", "bias_mean")}

    def raw(self, phi: torch.Tensor) -> torch.Tensor:
        """The head's mean output ``(n, D)`` for features ``phi``."""
        g = phi @ self.weight.T
        return g if self.bias_mean is None else g + self.bias_mean

    def items(self, phi: torch.Tensor) -> Items:
        """Rotated statistics of inputs with head features ``phi`` ``(n, N)``."""
        z, n = _unit(self.raw(phi))
        z = z if self.R is None else z @ self.R
        psi = phi if self.Q2 is None else phi @ self.Q2
        return Items(z=z, n=n, psi=psi, c=psi.square() @ self.W.T)

    def _bias_forms(self, a, b, pairs: Pairing):
        Cb = self.bias
        if Cb is None:
            zero = torch.zeros((), dtype=a.dtype, device=a.device)
            return zero, zero, zero, zero
        aC = a @ Cb
        return (
            pairs.que((aC * a).sum(-1)),
            pairs.mm(aC, b),
            pairs.gal(((b @ Cb) * b).sum(-1)),
            torch.diagonal(Cb).sum(),
        )

    def blocks(self, q: Items, g: Items, pairs: Pairing, variance: bool = True):
        """The ``qq``, ``gg`` and ``qg`` bilinear forms of every pair, and the traces of
        products of blocks (:class:`Traces`)."""
        a, b = q.z, g.z
        b_aa, b_ab, b_bb, b_tr = self._bias_forms(a, b, pairs)
        none = torch.zeros((), dtype=a.dtype, device=a.device)
        qq_ab = pairs.mm(q.c * a, b) + b_ab
        qq = Bilinear(
            pairs.que((q.c * a.square()).sum(-1)) + b_aa,
            qq_ab,
            qq_ab,
            pairs.mm(q.c, b.square()) + b_bb if variance else none,
            pairs.que(q.c.sum(-1)) + b_tr,
        )
        gg_ab = pairs.mm(a, g.c * b) + b_ab
        gg = Bilinear(
            pairs.mm(a.square(), g.c) + b_aa if variance else none,
            gg_ab,
            gg_ab,
            pairs.gal((g.c * b.square()).sum(-1)) + b_bb,
            pairs.gal(g.c.sum(-1)) + b_tr,
        )
        c_qg = self._cross_diagonals(q, g, pairs)  # (Q, G|K, D): the one D x N product
        a_ = a[:, None, :]
        b_ = b if pairs.gathered else b[None]
        ab = (c_qg * a_ * b_).sum(-1) + b_ab
        qg = Bilinear(
            (c_qg * a_.square()).sum(-1) + b_aa,
            ab,
            ab,
            (c_qg * b_.square()).sum(-1) + b_bb,
            c_qg.sum(-1) + b_tr,
        )
        return qq, gg, qg, self._traces(q, g, c_qg, pairs) if variance else None

    def _cross_diagonals(self, q: Items, g: Items, pairs: Pairing) -> torch.Tensor:
        """``c_qg[k] = sum_l W[k, l] psi_q[l] psi_g[l]`` for every pair, ``(Q, G|K, D)``."""
        if pairs.gathered:
            return (g.psi * q.psi[:, None, :]) @ self.W.T
        return ((q.psi[None] * self.W[:, None, :]) @ g.psi.T).permute(1, 2, 0)

    def _traces(self, q: Items, g: Items, c_qg: torch.Tensor, pairs: Pairing) -> Traces:
        """Traces of products of ``C_b + diag(c)`` blocks (``tr(diag(c) C_b) = c . diag C_b``)."""
        c_q, c_g = q.c, g.c
        if self.bias is None:
            bd, tb2 = torch.zeros_like(c_q[0]), torch.zeros((), dtype=c_q.dtype)
        else:
            bd, tb2 = torch.diagonal(self.bias), self.bias.square().sum()
        qb, gb, xb = pairs.que(c_q @ bd), pairs.gal(c_g @ bd), c_qg @ bd
        cg_ = c_g if pairs.gathered else c_g[None]
        xy_xy = c_qg.square().sum(-1) + 2 * xb + tb2
        return Traces(
            xx2=pairs.que(c_q.square().sum(-1)) + 2 * qb + tb2,
            yy2=pairs.gal(c_g.square().sum(-1)) + 2 * gb + tb2,
            xx_yy=pairs.mm(c_q, c_g) + qb + gb + tb2,
            xy_xy=xy_xy,
            xy_yx=xy_xy,
            xx_xy=(c_qg * c_q[:, None, :]).sum(-1) + qb + xb + tb2,
            yy_yx=(c_qg * cg_).sum(-1) + gb + xb + tb2,
        )

    def cross_diagonal(self, psi_i: torch.Tensor, psi_j: torch.Tensor) -> torch.Tensor:
        """``c_ij`` ``(..., D)`` for paired rotated features."""
        return (psi_i * psi_j) @ self.W.T

    def bytes_per_item(self) -> int:
        """Elements per query or gallery item in one chunk (the ``D x N`` product)."""
        D, N = self.W.shape
        return 2 * D * N + 2 * N + 4 * D

    @property
    def per_pair(self) -> int:
        """Elements per pair: the ``D`` cross diagonals (twice) and about thirty results."""
        return 2 * self.W.shape[0] + 32


class DenseFactors:
    """Any posterior, from per-item factors ``L = J Sigma^(1/2)`` of the raw output.

    Used for last-layer full posteriors (``J S`` from the head features, never forming ``J``)
    and for all-layer or subnetwork posteriors (the backend's raw Jacobians).
    """

    def __init__(self, la) -> None:
        self.la = la

    def _factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        la = self.la
        structure = la._structure
        from laplace_metric.predictive.glm import linear_head

        head = linear_head(la)
        if head is not None and structure == HessianStructure.FULL:
            g, phi = la.model.forward_with_features(x)
            D, N = head.out_features, head.in_features
            scale = la.posterior_scale
            L = torch.einsum("bn,dnp->bdp", phi, scale[: D * N].reshape(D, N, -1))
            if head.bias is not None:
                L = L + scale[D * N :]
            return g.detach(), L.detach()
        backend = la.backend
        module, inputs = backend._target(x)
        with torch.enable_grad():
            jac, g = backend._raw_jacobians(module, inputs)
        jac = backend._select(jac, (2,)).detach()
        if structure == HessianStructure.DIAG:
            L = jac * la.posterior_variance.sqrt()
        elif structure == HessianStructure.KRON:
            L = la.posterior_precision.bmm(jac, exponent=-0.5)
        else:
            L = jac @ la.posterior_scale
        return g.detach(), L.detach()

    def items(self, x: torch.Tensor) -> Items:
        """Unit embeddings, norms and factors ``L`` of inputs ``x``."""
        g, L = self._factors(x)
        z, n = _unit(g)
        return Items(z=z, n=n, L=L)

    @staticmethod
    def dense(q: Items, g: Items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``C_qq (Q,D,D)``, ``C_gg (G,D,D)``, ``C_qg (Q,G,D,D)``."""
        c_qq = q.L @ q.L.transpose(-1, -2)
        c_gg = g.L @ g.L.transpose(-1, -2)
        c_qg = torch.einsum("qdp,gep->qgde", q.L, g.L)
        return c_qq, c_gg, c_qg

    def blocks(self, q: Items, g: Items, pairs: Pairing, variance: bool = True):
        """As :meth:`RotatedDiagonal.blocks`, from dense ``D x D`` blocks."""
        if pairs.gathered:
            raise NotImplementedError("Gathered candidates need a last-layer diag/kron head.")
        c_qq, c_gg, c_qg = self.dense(q, g)
        a, b = q.z, g.z
        qq = Bilinear(
            pairs.que(torch.einsum("qd,qde,qe->q", a, c_qq, a)),
            torch.einsum("qd,qde,ge->qg", a, c_qq, b),
            torch.einsum("gd,qde,qe->qg", b, c_qq, a),
            torch.einsum("gd,qde,ge->qg", b, c_qq, b),
            pairs.que(torch.diagonal(c_qq, dim1=-2, dim2=-1).sum(-1)),
        )
        gg = Bilinear(
            torch.einsum("qd,gde,qe->qg", a, c_gg, a),
            torch.einsum("qd,gde,ge->qg", a, c_gg, b),
            torch.einsum("gd,gde,qe->qg", b, c_gg, a),
            pairs.gal(torch.einsum("gd,gde,ge->g", b, c_gg, b)),
            pairs.gal(torch.diagonal(c_gg, dim1=-2, dim2=-1).sum(-1)),
        )
        qg = Bilinear(
            torch.einsum("qd,qgde,qe->qg", a, c_qg, a),
            torch.einsum("qd,qgde,ge->qg", a, c_qg, b),
            torch.einsum("gd,qgde,qe->qg", b, c_qg, a),
            torch.einsum("gd,qgde,ge->qg", b, c_qg, b),
            torch.diagonal(c_qg, dim1=-2, dim2=-1).sum(-1),
        )
        traces = Traces(
            xx2=pairs.que((c_qq * c_qq).sum((-2, -1))),
            yy2=pairs.gal((c_gg * c_gg).sum((-2, -1))),
            xx_yy=c_qq.flatten(1) @ c_gg.transpose(-1, -2).flatten(1).T,
            xy_xy=torch.einsum("qgde,qged->qg", c_qg, c_qg),
            xy_yx=c_qg.square().sum((-2, -1)),
            xx_xy=torch.einsum("qde,qged->qg", c_qq, c_qg),
            yy_yx=torch.einsum("gde,qgde->qg", c_gg, c_qg),
        )
        return qq, gg, qg, traces

    def bytes_per_item(self) -> int:
        """Elements per query or gallery item in one chunk (the factors and Jacobians)."""
        D = int(self.la.n_outputs)
        P = int(self.la.n_params) if hasattr(self.la, "n_params") else 0
        return 4 * D * max(P, 1)

    @property
    def per_pair(self) -> int:
        """Elements per pair: the dense ``D x D`` blocks and the results."""
        D = int(self.la.n_outputs)
        return 3 * D * D + 24


__all__ = ["Bilinear", "DenseFactors", "Items", "Pairing", "RotatedDiagonal", "Traces"]
