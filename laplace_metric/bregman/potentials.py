"""Strictly convex potentials ``phi: R^D -> R`` that generate Bregman divergences.

Every potential is an :class:`torch.nn.Module` mapping a batch ``(batch, D)`` to ``(batch,)`` and
exposes batched :meth:`ConvexPotential.gradient` and :meth:`ConvexPotential.hessian`. The base
class computes both with autograd; the fixed potentials override them in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def check_points(x: torch.Tensor, dim: int | None = None) -> None:
    """Raise a clear error unless ``x`` is a floating ``(batch, D)`` tensor.

    Parameters
    ----------
    x : torch.Tensor
        The points.
    dim : int, optional
        The expected number of columns ``D``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Points must be a torch.Tensor, got {type(x).__name__}.")
    if x.ndim != 2:
        raise ValueError(f"Points must have shape (batch, D), got {tuple(x.shape)}.")
    if not x.dtype.is_floating_point:
        raise TypeError(f"Points must be floating point, got dtype {x.dtype}.")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"The potential is defined on R^{dim}, got points with {x.shape[1]} columns."
        )


def _inverse_softplus(y: float) -> float:
    """The ``x`` with ``softplus(x) = y`` (``y > 0``)."""
    return y + math.log(-math.expm1(-y))


class ConvexPotential(nn.Module):
    """Base class of strictly convex potentials ``phi``.

    Subclasses implement :meth:`forward`; :meth:`gradient` and :meth:`hessian` default to
    autograd (``torch.autograd.grad`` and ``torch.func``) and may be overridden in closed form.

    Parameters
    ----------
    dim : int
        Dimension ``D`` of the input space.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}.")
        self.dim = dim

    def config(self) -> dict[str, Any]:
        """Plain-Python constructor arguments (without learned parameters).

        Returns
        -------
        config : dict
            ``{"name": class name, "dim": D, ...}``.
        """
        return {"name": type(self).__name__, "dim": self.dim}

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """Batched gradient ``grad phi(x)``, shape ``(batch, D)``.

        With grad mode on, the result is differentiable in ``x`` and in the potential's
        parameters (``create_graph=True``). With grad mode off (e.g. inside a
        pytorch-metric-learning miner), grad is enabled locally on a detached copy of ``x``
        and the result is detached.

        Parameters
        ----------
        x : torch.Tensor
            Points, shape ``(batch, D)``.

        Returns
        -------
        grad : torch.Tensor
        """
        check_points(x, self.dim)
        if not torch.is_grad_enabled():
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self(leaf).sum(), leaf)
            return grad.detach()
        inp = x if x.requires_grad else x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self(inp).sum(), inp, create_graph=True)
        return grad

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        """Batched Hessian ``hess phi(x)``, shape ``(batch, D, D)``.

        Computed with ``torch.func`` (forward-over-reverse), so it also works under
        ``torch.no_grad`` and is differentiable in the parameters when grad mode is on.

        Parameters
        ----------
        x : torch.Tensor
            Points, shape ``(batch, D)``.

        Returns
        -------
        hess : torch.Tensor
        """
        check_points(x, self.dim)

        def single(v: torch.Tensor) -> torch.Tensor:
            return self(v.unsqueeze(0)).squeeze(0)

        return torch.func.vmap(torch.func.hessian(single))(x)


class SquaredEuclideanPotential(ConvexPotential):
    """``phi(x) = ||x||^2 / 2``, whose divergence is ``D(x, y) = ||x - y||^2 / 2``.

    Parameters
    ----------
    dim : int
        Dimension ``D``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` per row: ``(batch, D) -> (batch,)``."""
        check_points(x, self.dim)
        return x.square().sum(-1) / 2

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form ``grad phi(x)``, shape ``(batch, D)``."""
        check_points(x, self.dim)
        return x

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form ``hess phi(x)``, shape ``(batch, D, D)``."""
        check_points(x, self.dim)
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        return eye.expand(x.shape[0], -1, -1)


class MahalanobisPotential(ConvexPotential):
    """``phi(x) = x^T M x / 2`` with ``M`` symmetric positive definite.

    Its divergence is ``D(x, y) = (x - y)^T M (x - y) / 2``. With ``learnable=True``, ``M`` is
    parametrised as ``M = C C^T`` with ``C`` lower triangular and a softplus-positive diagonal,
    initialised at the Cholesky factor of the given matrix, so it stays SPD during training.

    Parameters
    ----------
    matrix : torch.Tensor
        The SPD matrix ``M``, shape ``(D, D)``.
    learnable : bool, default=False
        Learn ``M`` (through its Cholesky factor) instead of keeping it fixed.
    """

    def __init__(self, matrix: torch.Tensor, learnable: bool = False) -> None:
        if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
            raise TypeError("matrix must be a (D, D) torch.Tensor.")
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}.")
        if not matrix.dtype.is_floating_point:
            matrix = matrix.to(torch.get_default_dtype())
        super().__init__(int(matrix.shape[0]))
        if not torch.allclose(matrix, matrix.mT, rtol=1e-5, atol=1e-8):
            raise ValueError("matrix must be symmetric.")
        chol, info = torch.linalg.cholesky_ex(matrix)
        if int(info) != 0:
            raise ValueError(
                "matrix must be positive definite (its Cholesky factorisation failed)."
            )
        self.learnable = bool(learnable)
        if self.learnable:
            raw = chol.tril(-1) + torch.diag_embed(
                torch.tensor(
                    [_inverse_softplus(float(d)) for d in chol.diagonal()], dtype=chol.dtype
                )
            )
            self.raw_cholesky = nn.Parameter(raw)
        else:
            self.register_buffer("fixed_matrix", (matrix + matrix.mT) / 2)

    def config(self) -> dict[str, Any]:
        """Plain-Python constructor arguments (see :meth:`ConvexPotential.config`)."""
        return {**super().config(), "learnable": self.learnable}

    @property
    def matrix(self) -> torch.Tensor:
        """The current SPD matrix ``M``, shape ``(D, D)``."""
        if not self.learnable:
            return self.fixed_matrix
        raw = self.raw_cholesky
        chol = raw.tril(-1) + torch.diag_embed(F.softplus(raw.diagonal()))
        return chol @ chol.mT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` per row: ``(batch, D) -> (batch,)``."""
        check_points(x, self.dim)
        return torch.einsum("bi,ij,bj->b", x, self.matrix.to(x.dtype), x) / 2

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form ``grad phi(x)``, shape ``(batch, D)``."""
        check_points(x, self.dim)
        return x @ self.matrix.to(x.dtype)

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form ``hess phi(x)``, shape ``(batch, D, D)``."""
        check_points(x, self.dim)
        return self.matrix.to(x.dtype).expand(x.shape[0], -1, -1)


class NegativeEntropyPotential(ConvexPotential):
    """``phi(x) = sum_d (x_d log x_d - x_d)`` on the open positive orthant ``x > 0``.

    Its divergence is the generalised Kullback-Leibler divergence
    ``D(x, y) = sum_d x_d log(x_d / y_d) - x_d + y_d``, which equals ``KL(x || y)`` on the
    probability simplex. Inputs with a non-positive entry raise ``ValueError`` (map the encoder
    output into the orthant first, e.g. with a softmax or softplus).

    Parameters
    ----------
    dim : int
        Dimension ``D``.
    """

    @staticmethod
    def _check_positive(x: torch.Tensor) -> None:
        if not bool((x > 0).all()):
            raise ValueError(
                "NegativeEntropyPotential is defined on the positive orthant only; got an input "
                "with a non-positive entry (apply a softmax or softplus to the embeddings)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` per row: ``(batch, D) -> (batch,)``."""
        check_points(x, self.dim)
        self._check_positive(x)
        return (torch.special.xlogy(x, x) - x).sum(-1)

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form ``grad phi(x)``, shape ``(batch, D)``."""
        check_points(x, self.dim)
        self._check_positive(x)
        return x.log()

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form ``hess phi(x)``, shape ``(batch, D, D)``."""
        check_points(x, self.dim)
        self._check_positive(x)
        return torch.diag_embed(x.reciprocal())


class ICNNPotential(ConvexPotential):
    """Input-convex neural network plus a quadratic: a strictly convex learned potential.

    ``h_1 = softplus(W_0 x + b_0)``, ``h_{k+1} = softplus(U_k h_k + W_k x + b_k)`` and
    ``phi(x) = u^T h_K + w^T x + alpha ||x||^2 / 2``. The hidden-path weights ``U_k`` and ``u``
    are the softplus of raw parameters, hence non-negative; the skip weights ``W_k``, ``w`` from
    the input are unconstrained. Softplus is convex and non-decreasing, so every ``h_k`` is
    convex in ``x``, and the quadratic term makes ``phi`` ``alpha``-strongly convex: its
    divergence satisfies ``D(x, y) >= alpha ||x - y||^2 / 2``.

    Parameters
    ----------
    dim : int
        Input dimension ``D``.
    hidden : sequence of int, default=(64, 64)
        Widths of the hidden layers (at least one).
    alpha : float, default=1.0
        Strong-convexity modulus, ``> 0``.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 64), alpha: float = 1.0) -> None:
        super().__init__(dim)
        hidden = tuple(hidden)
        if not hidden or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden
        ):
            raise ValueError(
                f"hidden must be a non-empty sequence of positive ints, got {hidden!r}."
            )
        alpha = float(alpha)
        if not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(
                f"alpha must be a positive finite number, got {alpha}; alpha > 0 makes phi "
                "strictly convex, so that D(x, y) > 0 for x != y."
            )
        self.hidden = hidden
        self.alpha = alpha
        # Skip connections from the input, one per hidden layer (unconstrained).
        self.skips = nn.ModuleList(nn.Linear(dim, h) for h in hidden)
        # Hidden-path weights, non-negative through softplus; initialised near 1 / fan-in.
        self.raw_hidden = nn.ParameterList(
            nn.Parameter(self._raw_init(h_out, h_in)) for h_in, h_out in zip(hidden, hidden[1:])
        )
        self.raw_out = nn.Parameter(self._raw_init(1, hidden[-1]).squeeze(0))
        self.linear_out = nn.Linear(dim, 1, bias=False)

    @staticmethod
    def _raw_init(n_out: int, n_in: int) -> torch.Tensor:
        mean = _inverse_softplus(1.0 / n_in)
        return mean + 0.1 * torch.randn(n_out, n_in)

    def config(self) -> dict[str, Any]:
        """Plain-Python constructor arguments (see :meth:`ConvexPotential.config`)."""
        return {**super().config(), "hidden": list(self.hidden), "alpha": self.alpha}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``phi(x)`` per row: ``(batch, D) -> (batch,)``."""
        check_points(x, self.dim)
        h = F.softplus(self.skips[0](x))
        for skip, raw in zip(self.skips[1:], self.raw_hidden):
            h = F.softplus(F.linear(h, F.softplus(raw)) + skip(x))
        out = h @ F.softplus(self.raw_out) + self.linear_out(x).squeeze(-1)
        return out + self.alpha / 2 * x.square().sum(-1)


POTENTIALS: dict[str, type[ConvexPotential]] = {
    cls.__name__: cls
    for cls in (
        SquaredEuclideanPotential,
        MahalanobisPotential,
        NegativeEntropyPotential,
        ICNNPotential,
    )
}
"""Built-in potentials by class name (used to rebuild a potential from its ``config``)."""
