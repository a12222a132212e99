"""Deprecated: the hook backend's folds are :mod:`laplace_metric.curvature.folds`, shared by
every backend (``structure``/``Structure`` are ``fold_plan``/``FoldPlan`` there).

Every name still resolves here, with a :class:`DeprecationWarning` naming its new home.
"""

from __future__ import annotations

from laplace_metric.moved import moved_names

__getattr__, __dir__ = moved_names(
    __name__,
    {
        old: ("laplace_metric.curvature.folds", new)
        for old, new in {
            "Structure": "FoldPlan",
            "structure": "fold_plan",
            "fold_diag": "fold_diag",
            "fold_gram": "fold_gram",
            "fold_input_factor": "fold_input_factor",
            "fold_output_factor": "fold_output_factor",
        }.items()
    },
)
