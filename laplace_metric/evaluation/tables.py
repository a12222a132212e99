"""Rows over seeds: aggregation (mean and std) and the Markdown table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from laplace_metric.evaluation.results import SeedResult

__all__ = ["Column", "ResultTable", "aggregate", "mean_std"]


@dataclass(frozen=True)
class Column:
    """A table column: the metric's name, its decimals, and whether the std is shown."""

    name: str
    digits: int = 3
    std: bool = True

    def format(self, mean: float, std: float) -> str:
        """``'mean ± std'`` with :attr:`digits` decimals (``'mean'`` without the std)."""
        if not self.std:
            return f"{mean:.{self.digits}f}"
        return f"{mean:.{self.digits}f} ± {std:.{self.digits}f}"


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample std (0 for one value) of the non-NaN ``values``; ``None`` if none."""
    kept = torch.tensor([v for v in values if not math.isnan(v)], dtype=torch.float64)
    if len(kept) == 0:
        return None
    std = kept.std().item() if len(kept) > 1 else 0.0
    return kept.mean().item(), std


@dataclass
class ResultTable:
    """Methods' metrics over seeds, rendered as mean ± std.

    Parameters
    ----------
    columns : sequence of Column or str
        The table's columns, in order (a string is a column with 3 decimals).

    Examples
    --------
    >>> table = ResultTable(["AUROC", Column("ECE", digits=4)])
    >>> table.add_row("isotropic weight noise", {"AUROC": [0.6, 0.8]})
    >>> print(table.to_markdown())
    | method | AUROC | ECE |
    |---|---|---|
    | isotropic weight noise | 0.700 ± 0.141 | - |
    """

    columns: Sequence[Column | str]
    rows: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.columns = tuple(c if isinstance(c, Column) else Column(c) for c in self.columns)

    def add_row(self, name: str, values: Mapping[str, Sequence[float]]) -> None:
        """Add (or replace) the row ``name``: ``{metric: [value per seed]}``."""
        self.rows[name] = {metric: [float(v) for v in vals] for metric, vals in values.items()}

    def add_seeds(self, results: Sequence[SeedResult]) -> ResultTable:
        """Add every row of ``results`` (the rows of the first seed, in its order)."""
        if not results:
            return self
        for name in results[0].rows:
            metrics = {m for r in results for m in r.rows.get(name, {})}
            self.add_row(
                name, {m: [r.rows.get(name, {}).get(m, math.nan) for r in results] for m in metrics}
            )
        return self

    @classmethod
    def from_seeds(
        cls, results: Sequence[SeedResult], columns: Sequence[Column | str]
    ) -> ResultTable:
        """The table of ``results`` over ``columns``."""
        return cls(columns).add_seeds(results)

    def aggregate(self) -> dict[str, dict[str, tuple[float, float]]]:
        """``{method: {metric: (mean, std)}}`` over the columns (metrics with a value only)."""
        out = {}
        for name, metrics in self.rows.items():
            cells = {}
            for col in self.columns:
                stats = mean_std(metrics.get(col.name, ()))
                if stats is not None:
                    cells[col.name] = stats
            out[name] = cells
        return out

    def to_markdown(self) -> str:
        """The Markdown table: one line per method, ``-`` where a metric has no value."""
        names = [c.name for c in self.columns]
        lines = ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for name, cells in self.aggregate().items():
            out = [c.format(*cells[c.name]) if c.name in cells else "-" for c in self.columns]
            lines.append(f"| {name} | " + " | ".join(out) + " |")
        return "\n".join(lines)


def aggregate(
    results: Sequence[SeedResult], columns: Sequence[Column | str]
) -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {metric: (mean, std)}}`` of ``results`` over ``columns``."""
    return ResultTable.from_seeds(results, columns).aggregate()
