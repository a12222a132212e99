"""laplace-metric names an unsupported laplace-torch instead of failing deep inside it."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from laplace_metric.host_version import SUPPORTED_SERIES, check_laplace_version


def test_installed_laplace_torch_is_supported():
    assert version("laplace-torch").startswith(SUPPORTED_SERIES)
    check_laplace_version()


@pytest.mark.parametrize("found", ["0.3", "0.3.1", "0.3.post1"])
def test_supported_series_passes(found):
    check_laplace_version(found)


@pytest.mark.parametrize("found", ["0.5.1", "0.2.3", "0.4.0", "1.0"])
def test_other_versions_are_named_with_the_fix(found):
    with pytest.raises(ImportError, match=rf"laplace-torch {found} is installed.*<0\.4"):
        check_laplace_version(found)


def test_requirement_is_the_one_pyproject_declares():
    from pathlib import Path

    import tomllib

    from laplace_metric.host_version import requirement

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    assert requirement() == "laplace-torch>=0.3,<0.4"
    assert requirement() in dependencies
