"""Retrieval with uncertainty: a gallery index with closed-form posterior similarity moments.

:class:`RetrievalIndex` stores what the moments need once, searches by matrix products (or
faiss, an optional extra) and re-ranks candidates by the posterior mean; with gallery labels it
gives a calibrated probability that the top-1 match has the query's label.
"""

from __future__ import annotations

from laplace_metric.retrieval.index import DEFAULT_CANDIDATES, RetrievalIndex, SearchResult
from laplace_metric.retrieval.probability import (
    fit_temperature,
    margin_variance,
    match_probability,
)

__all__ = [
    "DEFAULT_CANDIDATES",
    "RetrievalIndex",
    "SearchResult",
    "fit_temperature",
    "margin_variance",
    "match_probability",
]
