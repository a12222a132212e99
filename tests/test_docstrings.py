"""Every public name of laplace-metric has a docstring (what the API reference renders).

Public names: ``laplace_metric.__all__``; for each public module, its ``__all__`` or else the
functions and classes defined in it whose names do not start with ``_``; and, for each public
class, the public methods and properties defined in the class body. Inherited docstrings count
(``inspect.getdoc``), as they do in the rendered reference. Data objects (dicts, tuples, type
aliases) cannot carry docstrings and are skipped.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import laplace_metric


def _public_modules() -> list[str]:
    names = [laplace_metric.__name__]
    for info in pkgutil.walk_packages(laplace_metric.__path__, prefix="laplace_metric."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


def _public_objects(module: ModuleType) -> dict[str, object]:
    if hasattr(module, "__all__"):
        names = list(module.__all__)
    else:
        names = [
            name
            for name, obj in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", None) == module.__name__
        ]
    objects = {name: getattr(module, name) for name in names}
    return {
        name: obj
        for name, obj in objects.items()
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)
    }


def _public_members(cls: type) -> dict[str, object]:
    members = {}
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            members[name] = attr.__func__
        elif isinstance(attr, property) or inspect.isfunction(attr):
            members[name] = getattr(cls, name) if inspect.isfunction(attr) else attr
    return members


def _member_doc(cls: type, name: str, attr: object) -> str:
    """The member's docstring, inherited along the MRO as autodoc does (also for properties)."""
    doc = inspect.getdoc(attr) if not isinstance(attr, property) else attr.__doc__
    if doc and doc.strip():
        return doc
    for base in cls.__mro__[1:]:
        inherited = vars(base).get(name)
        if inherited is not None and (inherited.__doc__ or "").strip():
            return inherited.__doc__
    return ""


def _missing(module: ModuleType) -> list[str]:
    missing = []
    if not inspect.getdoc(module):
        missing.append(module.__name__)
    for name, obj in _public_objects(module).items():
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(f"{module.__name__}.{name}")
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            for member, attr in _public_members(obj).items():
                if not _member_doc(obj, member, attr):
                    missing.append(f"{module.__name__}.{name}.{member}")
    return missing


MODULES = _public_modules()


def test_modules_found():
    assert "laplace_metric.estimators" in MODULES
    assert len(MODULES) > 5


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_have_docstrings(module_name):
    module = importlib.import_module(module_name)
    missing = _missing(module)
    assert not missing, "missing docstrings:\n  " + "\n  ".join(missing)


def test_top_level_all_is_documented():
    missing = [
        name
        for name in laplace_metric.__all__
        if (inspect.isclass(obj := getattr(laplace_metric, name)) or inspect.isfunction(obj))
        and not (inspect.getdoc(obj) or "").strip()
    ]
    assert not missing, f"undocumented top-level names: {missing}"
