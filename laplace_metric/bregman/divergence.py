"""The Bregman divergence of a convex potential: paired rows and all-pairs matrices.

Convention used throughout laplace-metric: ``D(x, y) = phi(x) - phi(y) - <grad phi(y), x - y>``
is read as "how far the *query* ``x`` is from the *reference* ``y``". Retrieval ranks database
items ``y`` for a query ``x`` by ``D(query, item)``, so ``grad phi`` is only ever evaluated on
the reference side (computed once per database). This matches pytorch-metric-learning, whose
distance matrices are ``mat[i, j] = d(query_i, ref_j)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from laplace_metric.bregman.potentials import POTENTIALS, ConvexPotential, check_points


class BregmanDivergence(nn.Module):
    """``D_phi(x, y) = phi(x) - phi(y) - <grad phi(y), x - y>`` for a convex potential ``phi``.

    ``D`` is non-negative and zero on the diagonal for convex ``phi``, but asymmetric: the
    gradient is taken at the second argument (the reference, see the module docstring). Both
    :meth:`forward` and :meth:`pairwise` are differentiable in ``x``, ``y`` and ``phi``'s
    parameters when grad mode is on.

    Parameters
    ----------
    potential : ConvexPotential
        The generating potential ``phi``.
    clamp : bool, default=True
        Set negative values to 0. For convex ``phi`` these are floating-point round-off only
        (e.g. on the diagonal of :meth:`pairwise`); turn off to inspect a potential that may
        not be convex.
    """

    def __init__(self, potential: ConvexPotential, clamp: bool = True) -> None:
        super().__init__()
        if not isinstance(potential, ConvexPotential):
            raise TypeError(
                "potential must be a ConvexPotential (e.g. ICNNPotential), got "
                f"{type(potential).__name__}."
            )
        self.potential = potential
        self.clamp = bool(clamp)

    @property
    def dim(self) -> int:
        """Dimension ``D`` of the input space."""
        return self.potential.dim

    def config(self) -> dict[str, Any]:
        """Plain-Python configuration: the potential's config and ``clamp``."""
        return {"potential": self.potential.config(), "clamp": self.clamp}

    def _finish(self, d: torch.Tensor) -> torch.Tensor:
        return d.clamp(min=0) if self.clamp else d

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Element-wise divergence of paired rows ``D(x_i, y_i)``.

        Parameters
        ----------
        x : torch.Tensor
            Queries, shape ``(n, D)``.
        y : torch.Tensor
            References, shape ``(n, D)``.

        Returns
        -------
        d : torch.Tensor
            Shape ``(n,)``.
        """
        check_points(x, self.dim)
        check_points(y, self.dim)
        if x.shape != y.shape:
            raise ValueError(
                f"x and y must have the same shape for paired divergences, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}; use pairwise() for all pairs."
            )
        phi = self.potential
        grad = phi.gradient(y)
        return self._finish(phi(x) - phi(y) - (grad * (x - y)).sum(-1))

    def pairwise(
        self, x: torch.Tensor, y: torch.Tensor | None = None, grad_y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All-pairs matrix ``D[i, j] = D(x_i, y_j)`` with one gradient call on ``y``.

        ``D = phi(X)[:, None] - phi(Y)[None, :] - X @ G^T + rowsum(Y * G)[None, :]`` with
        ``G = grad phi(Y)``.

        Parameters
        ----------
        x : torch.Tensor
            Queries, shape ``(n, D)``.
        y : torch.Tensor, optional
            References, shape ``(m, D)``; ``None`` uses ``x``.
        grad_y : torch.Tensor, optional
            A precomputed ``grad phi(y)`` (e.g. of a fixed database queried in chunks).

        Returns
        -------
        d : torch.Tensor
            Shape ``(n, m)``.
        """
        check_points(x, self.dim)
        y = x if y is None else y
        check_points(y, self.dim)
        phi = self.potential
        grad = phi.gradient(y) if grad_y is None else grad_y
        if grad.shape != y.shape:
            raise ValueError(f"grad_y must have shape {tuple(y.shape)}, got {tuple(grad.shape)}.")
        phi_x = phi(x)
        const_y = (y * grad).sum(-1) - phi(y)
        return self._finish(phi_x[:, None] - x @ grad.mT + const_y[None, :])


def as_divergence(divergence: BregmanDivergence | ConvexPotential) -> BregmanDivergence:
    """``divergence`` itself, or a :class:`BregmanDivergence` of a bare potential.

    Parameters
    ----------
    divergence : BregmanDivergence or ConvexPotential

    Returns
    -------
    divergence : BregmanDivergence

    Raises
    ------
    TypeError
        If ``divergence`` is neither.
    """
    if isinstance(divergence, ConvexPotential):
        return BregmanDivergence(divergence)
    if not isinstance(divergence, BregmanDivergence):
        raise TypeError(
            "divergence must be a BregmanDivergence or a ConvexPotential, got "
            f"{type(divergence).__name__}."
        )
    return divergence


def divergence_from_config(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None
) -> BregmanDivergence:
    """Rebuild a :class:`BregmanDivergence` of a built-in potential from its ``config()``.

    Parameters
    ----------
    config : dict
        As returned by :meth:`BregmanDivergence.config`.
    state_dict : dict, optional
        The potential's ``state_dict`` (learned parameters); loaded strictly.

    Returns
    -------
    divergence : BregmanDivergence
    """
    pot_cfg = dict(config["potential"])
    name = pot_cfg.pop("name")
    if name not in POTENTIALS:
        raise ValueError(
            f"Unknown potential {name!r}; built-in ones are {sorted(POTENTIALS)}. Rebuild a "
            "custom potential yourself and load its state_dict."
        )
    cls = POTENTIALS[name]
    if name == "MahalanobisPotential":
        dim = pot_cfg.pop("dim")
        potential = cls(torch.eye(dim), **pot_cfg)
    else:
        potential = cls(**pot_cfg)
    if state_dict is not None:
        potential.load_state_dict(state_dict)
    return BregmanDivergence(potential, clamp=config.get("clamp", True))
