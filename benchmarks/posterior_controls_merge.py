"""``posterior_controls.py --merge``: per-seed rows of several ``--save`` runs joined, and the
rows of the configuration chosen per seed on validation ECE."""

from __future__ import annotations

import json
from pathlib import Path


def add_selected_rows(results: list[dict], candidates: list[str]) -> list[str]:
    """Per seed, the candidate configuration with the lowest validation ECE (what
    :func:`laplace_metric.selection.select_posterior` chooses by), added to every seed's rows as
    ``"selected on validation ECE: fitted"`` / ``": curvature off"``; returns the choices."""
    chosen = []
    for rows in results:
        missing = [c for c in candidates if f"{c}: fitted" not in rows]
        if missing:
            raise ValueError(f"--select: no rows for {missing} in a seed's results.")
        best = min(candidates, key=lambda c: rows[f"{c}: fitted"]["val ECE"])
        for suffix in ("fitted", "curvature off"):
            rows[f"selected on validation ECE: {suffix}"] = rows[f"{best}: {suffix}"]
        chosen.append(best)
    return chosen


def load_merged(groups: list[str]) -> list[dict]:
    """Per-seed rows of ``--save`` files; files joined by ``+`` are runs of the same seed."""
    results = []
    for group in groups:
        seed_rows: list[dict] = []
        for path in group.split("+"):
            runs = json.loads(Path(path).read_text())
            seed_rows = [{**a, **b} for a, b in zip(seed_rows, runs)] if seed_rows else runs
        results += seed_rows
    return results


__all__ = ["add_selected_rows", "load_merged"]
