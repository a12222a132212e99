"""The metrics of one seed: ``rows[method][metric]``, plus the data of the seed's plots."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["SeedResult"]


@dataclass
class SeedResult:
    """Rows of one seed (``rows[method][metric]``) and what its plots need.

    Attributes
    ----------
    seed : int
    rows : dict of str to dict of str to float
        One row per method, in insertion (table) order.
    scores : dict of str to dict of str to Tensor
        Per method, the uncertainty scores of each evaluated set (histograms).
    curves : dict
        Per method, its :class:`~laplace_metric.metrics.SparsificationCurve`.
    reliability : dict
        Per method, its :class:`~laplace_metric.metrics.ReliabilityBins`.
    embedding : tuple, optional
        Data of an embedding picture (benchmark-specific).
    source : str
        Where the data came from.
    """

    seed: int = 0
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    reliability: dict = field(default_factory=dict)
    embedding: tuple | None = None
    source: str = ""

    def add_row(self, name: str, metrics: Mapping[str, float], **plot_data: Any) -> None:
        """Record (or replace) the row ``name``; ``plot_data`` keys: scores, curve, reliability.

        Examples
        --------
        >>> result = SeedResult(seed=0)
        >>> result.add_row("LAM, curvature off", {"AUROC": 0.71})
        >>> result.rows
        {'LAM, curvature off': {'AUROC': 0.71}}
        """
        unknown = set(plot_data) - {"scores", "curve", "reliability"}
        if unknown:
            raise TypeError(
                f"add_row got unknown plot data {sorted(unknown)}; use scores, curve or "
                "reliability."
            )
        self.rows[name] = dict(metrics)
        if plot_data.get("scores") is not None:
            self.scores[name] = plot_data["scores"]
        if plot_data.get("curve") is not None:
            self.curves[name] = plot_data["curve"]
        if plot_data.get("reliability") is not None:
            self.reliability[name] = plot_data["reliability"]
