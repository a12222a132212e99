"""laplace-metric: Bayesian metric learning for laplace-torch."""

__version__ = "0.1.0"
