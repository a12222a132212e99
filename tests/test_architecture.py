"""The shape of the house, checked from the source: no import cycle, small modules and functions.

The import graph counts every import: at module level, under ``TYPE_CHECKING`` and inside
functions. Relative imports are resolved, and ``from pkg import name`` counts as an import of
``pkg.name`` when that is a submodule (otherwise of ``pkg``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("laplace_metric", "laplace_metric_cli")
SIZE_CHECKED = (*PACKAGES, "benchmarks")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60

#: Import cycles tolerated (none): a cycle is allowed only when all of its modules are in one
#: of these sets.
KNOWN_CYCLES: tuple[frozenset[str], ...] = ()

#: Import cycles between packages (``laplace_metric.<folder>``, a top-level module counting as
#: its own package) still owed: the Bregman training losses build the Bregman likelihood.
KNOWN_PACKAGE_CYCLES: tuple[frozenset[str], ...] = (
    frozenset({"laplace_metric.bregman", "laplace_metric.likelihoods"}),
)

#: Modules over :data:`MAX_MODULE_LINES` (none).
KNOWN_LARGE_MODULES: frozenset[str] = frozenset()

#: Functions over :data:`MAX_FUNCTION_LINES` (none).
KNOWN_LONG_FUNCTIONS: frozenset[str] = frozenset()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _resolve(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The in-project modules that ``name`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, name, path.name == "__init__.py")
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # ``import a.b.c`` of a non-module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over :data:`PACKAGES`."""
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component, as a module path, ignoring the allowed."""
    return [_cycle_in(c, graph) for c in strongly_connected(graph) if not _allowed(c)]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the smallest module of ``component`` (breadth first)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def _allowed(component: set[str]) -> bool:
    return any(component <= known for known in KNOWN_CYCLES)


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between packages: ``laplace_metric.curvature.hooks.kron`` counts as
    ``laplace_metric.curvature`` (the root packages themselves are left out: they re-export)."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    result: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module in PACKAGES:
            continue
        deps = result.setdefault(package(module), set())
        deps.update(package(t) for t in targets if t not in PACKAGES)
        deps.discard(package(module))
    return result


def test_no_import_cycle_between_packages():
    cycles = [
        _cycle_in(c, graph)
        for graph in [package_graph(import_graph())]
        for c in strongly_connected(graph)
        if not any(c <= known for known in KNOWN_PACKAGE_CYCLES)
    ]
    assert not cycles, "package import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_pair_data_sits_below_likelihoods_and_curvature():
    """``pairs`` imports neither the likelihoods nor the curvature, and the likelihoods do not
    import the curvature (the pair graph was the last such import)."""
    graph = package_graph(import_graph())
    assert not graph["laplace_metric.pairs"] & {
        "laplace_metric.likelihoods",
        "laplace_metric.curvature",
    }
    assert "laplace_metric.curvature" not in graph["laplace_metric.likelihoods"]


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_resolves_relative_and_submodule_imports():
    graph = import_graph()
    # ``from laplace_metric.data import idx`` names the submodule, not the package
    assert "laplace_metric.data.idx" in graph["laplace_metric.idx"]
    # a function-level import counts
    assert "laplace_metric.demo" in graph["laplace_metric_cli"]
    # relative imports resolve against the importing module's package
    node = ast.parse("from ..scores import base").body[0]
    assert _resolve(node, "laplace_metric.demo.plots", is_package=False) == "laplace_metric.scores"
    node = ast.parse("from . import plots").body[0]
    assert _resolve(node, "laplace_metric.demo", is_package=True) == "laplace_metric.demo"


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(ROOT).as_posix()}:{node.name}"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_modules_and_functions_are_small():
    large, long = [], []
    for package in SIZE_CHECKED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            n_lines = len(path.read_text().splitlines())
            if n_lines > MAX_MODULE_LINES and rel not in KNOWN_LARGE_MODULES:
                large.append(f"{rel}: {n_lines} lines")
            long += [f for f in _long_functions(path) if f not in KNOWN_LONG_FUNCTIONS]
    assert not large, f"modules over {MAX_MODULE_LINES} lines: {large}"
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_renamed_public_names_warn_and_alias():
    import warnings

    import laplace_metric

    for old, new in (
        ("UncertaintyScore", "CovarianceScore"),
        ("uncertainty_score", "covariance_score"),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            obj = getattr(laplace_metric, old)
        assert obj is getattr(laplace_metric, new)
        assert any(
            issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught
        )
