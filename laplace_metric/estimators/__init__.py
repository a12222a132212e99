"""laplace-torch estimators for pairwise (metric-learning) likelihoods.

One mixin, :class:`MetricLaplaceMixin`, adapts laplace-torch's parametric estimators to the
pairwise likelihoods: it fits the signed pairwise GGN from mined pairs, projects it to PSD, and
predicts embedding means and covariances (never a softmax). The concrete classes combine it
with the stock ``(subset_of_weights, hessian_structure)`` classes.

The mixin is assembled from one module per job: :mod:`~laplace_metric.estimators.mixin`
(configuration and posterior curvature), :mod:`~laplace_metric.estimators.fitting`,
:mod:`~laplace_metric.estimators.prediction`, :mod:`~laplace_metric.estimators.prior`,
:mod:`~laplace_metric.estimators.serialization`, and the batch checks of
:mod:`~laplace_metric.estimators.batches`.
"""

from __future__ import annotations

from laplace.baselaplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.lllaplace import DiagLLLaplace, FullLLLaplace, KronLLLaplace
from laplace.subnetlaplace import DiagSubnetLaplace, FullSubnetLaplace
from laplace.utils.enums import HessianStructure, SubsetOfWeights

from laplace_metric.estimators.batches import check_inputs as check_inputs
from laplace_metric.estimators.batches import unpack_batch as unpack_batch
from laplace_metric.estimators.mixin import MetricLaplaceMixin
from laplace_metric.estimators.prediction import _sample_moments as _sample_moments


def _plugin_key(subset: SubsetOfWeights, structure: HessianStructure) -> tuple[str, str, str]:
    # A 3-tuple never equals the (subset, structure) 2-tuples of laplace.Laplace's lookup.
    return ("laplace_metric", subset.value, structure.value)


class MetricDiagLaplace(MetricLaplaceMixin, DiagLaplace):
    """All-weights Laplace with a diagonal pairwise GGN."""

    _subset, _structure = SubsetOfWeights.ALL, HessianStructure.DIAG
    _key = _plugin_key(_subset, _structure)


class MetricKronLaplace(MetricLaplaceMixin, KronLaplace):
    """All-weights Laplace with a Kronecker-factored pairwise GGN."""

    _subset, _structure = SubsetOfWeights.ALL, HessianStructure.KRON
    _key = _plugin_key(_subset, _structure)


class MetricFullLaplace(MetricLaplaceMixin, FullLaplace):
    """All-weights Laplace with a dense pairwise GGN."""

    _subset, _structure = SubsetOfWeights.ALL, HessianStructure.FULL
    _key = _plugin_key(_subset, _structure)


class MetricDiagLLLaplace(MetricLaplaceMixin, DiagLLLaplace):
    """Last-layer Laplace with a diagonal pairwise GGN."""

    _subset, _structure = SubsetOfWeights.LAST_LAYER, HessianStructure.DIAG
    _key = _plugin_key(_subset, _structure)


class MetricKronLLLaplace(MetricLaplaceMixin, KronLLLaplace):
    """Last-layer Laplace with a Kronecker-factored pairwise GGN."""

    _subset, _structure = SubsetOfWeights.LAST_LAYER, HessianStructure.KRON
    _key = _plugin_key(_subset, _structure)


class MetricFullLLLaplace(MetricLaplaceMixin, FullLLLaplace):
    """Last-layer Laplace with a dense pairwise GGN."""

    _subset, _structure = SubsetOfWeights.LAST_LAYER, HessianStructure.FULL
    _key = _plugin_key(_subset, _structure)


class MetricDiagSubnetLaplace(MetricLaplaceMixin, DiagSubnetLaplace):
    """Subnetwork Laplace with a diagonal pairwise GGN."""

    _subset, _structure = SubsetOfWeights.SUBNETWORK, HessianStructure.DIAG
    _key = _plugin_key(_subset, _structure)


class MetricFullSubnetLaplace(MetricLaplaceMixin, FullSubnetLaplace):
    """Subnetwork Laplace with a dense pairwise GGN."""

    _subset, _structure = SubsetOfWeights.SUBNETWORK, HessianStructure.FULL
    _key = _plugin_key(_subset, _structure)


#: ``(subset_of_weights, hessian_structure) -> estimator class``.
ESTIMATORS: dict[tuple[SubsetOfWeights, HessianStructure], type[MetricLaplaceMixin]] = {
    (cls._subset, cls._structure): cls
    for cls in (
        MetricDiagLaplace,
        MetricKronLaplace,
        MetricFullLaplace,
        MetricDiagLLLaplace,
        MetricKronLLLaplace,
        MetricFullLLLaplace,
        MetricDiagSubnetLaplace,
        MetricFullSubnetLaplace,
    )
}

__all__ = [
    "MetricLaplaceMixin",
    "ESTIMATORS",
    "MetricDiagLaplace",
    "MetricKronLaplace",
    "MetricFullLaplace",
    "MetricDiagLLLaplace",
    "MetricKronLLLaplace",
    "MetricFullLLLaplace",
    "MetricDiagSubnetLaplace",
    "MetricFullSubnetLaplace",
]
