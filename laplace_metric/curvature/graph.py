"""Deprecated: the pair graph moved to :mod:`laplace_metric.pairs`, its folds to
:mod:`laplace_metric.curvature.folds`.

Every name still resolves here, with a :class:`DeprecationWarning` naming its new home.
"""

from __future__ import annotations

from laplace_metric.moved import moved_names

_FOLDS = "laplace_metric.curvature.folds"
__getattr__, __dir__ = moved_names(
    __name__,
    {
        "PairGraph": ("laplace_metric.pairs.graph", "PairGraph"),
        **{
            name: (_FOLDS, name)
            for name in (
                "Bucket",
                "FOLD_CHUNK_ELEMENTS",
                "SMALL_COMPONENT",
                "component_buckets",
                "fold_diag",
                "fold_gram",
                "fold_input_factor",
                "fold_linear",
                "fold_output_factor",
            )
        },
    },
)
