"""The LAM configurations of ``benchmarks/posterior_controls.py``: row name -> (subset,
structure, likelihood_scale, prior), where prior is a precision, ``'marglik'``,
``'marglik-layerwise'`` / ``'marglik-diag'`` (marglik with that ``prior_structure``) or
``'val-nll'`` (grid search on the validation pairs' Gaussian NLL)."""

#: LAM configurations: row name -> (subset, structure, likelihood_scale, prior precision).
CONFIGS = {
    "LAM all-layer diag, dataset scale, prior 1": ("all", "diag", "dataset", 1.0),
    "LAM all-layer diag, dataset scale, marglik (default)": ("all", "diag", "dataset", "marglik"),
    "LAM all-layer diag, batch scale, marglik": ("all", "diag", "batch", "marglik"),
    "LAM last-layer kron, dataset scale, prior 1": ("last_layer", "kron", "dataset", 1.0),
    "LAM last-layer kron, dataset scale, marglik": ("last_layer", "kron", "dataset", "marglik"),
    "LAM last-layer kron, batch scale, marglik": ("last_layer", "kron", "batch", "marglik"),
    "LAM all-layer diag, composite scale, prior 1": ("all", "diag", "composite", 1.0),
    "LAM all-layer diag, composite scale, marglik": ("all", "diag", "composite", "marglik"),
    "LAM last-layer kron, composite scale, prior 1": ("last_layer", "kron", "composite", 1.0),
    "LAM last-layer kron, composite scale, marglik": (
        "last_layer",
        "kron",
        "composite",
        "marglik",
    ),
}
#: ``--priors``: how the prior precision is chosen (marglik with one precision per layer or per
#: weight, or a grid search on the validation pairs' Gaussian NLL), beside the default scalar
#: marglik, for the two posteriors of the outside check of issue #21.
PRIOR_CONFIGS = {
    "LAM all-layer diag, dataset scale, marglik (default)": ("all", "diag", "dataset", "marglik"),
    "LAM all-layer diag, dataset scale, marglik per layer": (
        "all",
        "diag",
        "dataset",
        "marglik-layerwise",
    ),
    "LAM all-layer diag, dataset scale, marglik per weight": (
        "all",
        "diag",
        "dataset",
        "marglik-diag",
    ),
    "LAM all-layer diag, dataset scale, validation pair NLL": ("all", "diag", "dataset", "val-nll"),
    "LAM last-layer kron, dataset scale, marglik": ("last_layer", "kron", "dataset", "marglik"),
    "LAM last-layer kron, dataset scale, validation pair NLL": (
        "last_layer",
        "kron",
        "dataset",
        "val-nll",
    ),
}
#: FashionMNIST -> MNIST (LAM's CNN): last-layer posteriors, and all-layer diag with --all-layer.
FASHION_CONFIGS = {
    "LAM last-layer diag, dataset scale, prior 1": ("last_layer", "diag", "dataset", 1.0),
    "LAM last-layer diag, dataset scale, marglik": ("last_layer", "diag", "dataset", "marglik"),
    "LAM last-layer kron, dataset scale, prior 1": ("last_layer", "kron", "dataset", 1.0),
    "LAM last-layer kron, dataset scale, marglik": ("last_layer", "kron", "dataset", "marglik"),
    "LAM last-layer kron, composite scale, marglik": (
        "last_layer",
        "kron",
        "composite",
        "marglik",
    ),
}
FASHION_ALL_LAYER = {
    "LAM all-layer diag, dataset scale, prior 1": ("all", "diag", "dataset", 1.0),
    "LAM all-layer diag, dataset scale, marglik (default)": ("all", "diag", "dataset", "marglik"),
}
#: ``--scores``: the two posteriors of the outside check of issue #21, each scored by every
#: other score (and the closed-form expected nearest-neighbour distance) beside its control.
SCORE_CONFIGS = {
    "LAM all-layer diag, dataset scale, marglik (default)": ("all", "diag", "dataset", "marglik"),
    "LAM last-layer kron, dataset scale, marglik": ("last_layer", "kron", "dataset", "marglik"),
}
