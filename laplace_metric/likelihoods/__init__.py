"""Pairwise likelihoods: the contrastive likelihood (LAM) and its shared interface."""

from laplace_metric.likelihoods.base import PairLikelihood, PairTerms
from laplace_metric.likelihoods.bregman import BregmanLikelihood as BregmanLikelihood
from laplace_metric.likelihoods.contrastive import ContrastiveLikelihood

__all__ = ["PairLikelihood", "PairTerms", "ContrastiveLikelihood"]
