"""Plots of uncertainty evaluations (matplotlib, safe on the headless ``Agg`` backend).

Every function takes data (tensors or the result objects of :mod:`laplace_metric.metrics`) and
an output path, writes a PNG there and returns the ``Figure``. Figures are built on an Agg
canvas without pyplot, so nothing needs a display and no global figure list grows.
"""

from laplace_metric.plots.embedding import plot_embedding_2d
from laplace_metric.plots.histograms import plot_uncertainty_histograms
from laplace_metric.plots.reliability import plot_reliability_diagram
from laplace_metric.plots.sparsification import plot_sparsification

__all__ = [
    "plot_embedding_2d",
    "plot_reliability_diagram",
    "plot_sparsification",
    "plot_uncertainty_histograms",
]
