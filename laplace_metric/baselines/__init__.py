"""Uncertainty baselines for metric learning, one module per baseline.

Every baseline follows the same two-step use: ``fit(x_train, y_train)`` once, then
``score(x)`` gives one OOD score per input (higher = more OOD). Baselines that also retrieve
have ``embed(x)``, the point embedding to use for recall@k.

* :class:`KNNDistanceBaseline`: distance to the k-th nearest training embedding of one
  deterministic encoder.
* :class:`MahalanobisBaseline`: class-conditional Gaussians with a shared covariance on
  penultimate features (or pooled feature maps); score = smallest Mahalanobis distance to a
  class mean. :class:`MultiLayerMahalanobisBaseline` combines several pooled layers.
* :class:`MCDropoutBaseline`: dropout kept active at test time; score from the spread of the
  normalised embedding samples.
* :class:`DeepEnsembleBaseline`: encoders trained from different seeds; score = mean over
  members of the kNN distance (rotation-invariant).
* :class:`IsotropicNoiseBaseline`: isotropic weight noise, its scale tuned on validation
  data; score = mean over noise draws of the kNN distance (the no-curvature control of LAM).
* :class:`PFEBaseline`: probabilistic face embeddings, a variance head on a frozen encoder
  trained with the mutual likelihood score; score = harmonic mean of the variances.

The interface and the registry are in :mod:`~laplace_metric.baselines.base`; the helpers in
:mod:`~laplace_metric.baselines.embedding` (``embed``, ``penultimate``) and
:mod:`~laplace_metric.baselines.train` (``train_encoder``). A new baseline is one new module
with an :class:`OODBaseline` subclass decorated by ``@register_baseline("name")``, plus one
import line here, which registers it in :data:`BASELINES` (see ``docs/architecture.rst``).
"""

from laplace_metric.baselines.base import BASELINES, OODBaseline, register_baseline
from laplace_metric.baselines.embedding import embed, penultimate
from laplace_metric.baselines.ensemble import DeepEnsembleBaseline, EnsembleScore
from laplace_metric.baselines.isotropic import IsotropicNoiseBaseline
from laplace_metric.baselines.knn import KNNDistanceBaseline
from laplace_metric.baselines.mahalanobis import FeaturePooling, MahalanobisBaseline
from laplace_metric.baselines.mahalanobis_layers import MultiLayerMahalanobisBaseline
from laplace_metric.baselines.mc_dropout import MCDropoutBaseline
from laplace_metric.baselines.pfe import PFEBaseline
from laplace_metric.baselines.train import TrainingHistory, train_encoder

__all__ = [
    "BASELINES",
    "DeepEnsembleBaseline",
    "EnsembleScore",
    "FeaturePooling",
    "IsotropicNoiseBaseline",
    "KNNDistanceBaseline",
    "MCDropoutBaseline",
    "MahalanobisBaseline",
    "MultiLayerMahalanobisBaseline",
    "OODBaseline",
    "PFEBaseline",
    "TrainingHistory",
    "embed",
    "penultimate",
    "register_baseline",
    "train_encoder",
]
