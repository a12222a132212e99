"""The laplace-torch versions this package is built on, checked when this module is imported
(``import laplace_metric`` imports it before anything else of the package).

laplace-metric registers its likelihoods and estimators through laplace-torch 0.3's
``Laplace`` factory and subclasses its estimators; laplace-torch 0.5 validates likelihoods in a
new module and rejects ``likelihood='contrastive'`` ("Invalid likelihood type"). A clear
``ImportError`` that names the installed version and the fix replaces hundreds of those.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: The laplace-torch release series this package supports (``major.minor``).
SUPPORTED_SERIES = "0.3"


def requirement() -> str:
    """The pip requirement of :data:`SUPPORTED_SERIES`, e.g. ``laplace-torch>=0.3,<0.4``."""
    major, minor = (int(part) for part in SUPPORTED_SERIES.split("."))
    return f"laplace-torch>={major}.{minor},<{major}.{minor + 1}"


def check_laplace_version(found: str | None = None) -> None:
    """Raise an ``ImportError`` if laplace-torch is not of :data:`SUPPORTED_SERIES`.

    Parameters
    ----------
    found : str, optional
        The version to check (default: the installed ``laplace-torch``'s).
    """
    if found is None:
        try:
            found = version("laplace-torch")
        except PackageNotFoundError:  # a source checkout of laplace on the path: trust it
            return
    if found.split(".")[:2] != SUPPORTED_SERIES.split("."):
        raise ImportError(
            f"laplace-metric supports laplace-torch {SUPPORTED_SERIES}.x, but laplace-torch "
            f"{found} is installed (its likelihood and estimator API differ); install the "
            f"supported series: pip install '{requirement()}'."
        )


__all__ = ["SUPPORTED_SERIES", "check_laplace_version", "requirement"]

check_laplace_version()  # on import: ``import laplace_metric`` runs it first
