"""lopd's modules import each other without circles: a new circle fails here, naming every module in it.

The graph is built statically (ast over lopd/**/*.py, nothing imported), so it sees every import statement,
at module top level and inside functions alike. Function-level imports count because deferring an import
into a function is how a circle gets hidden: it no longer fails at import time, but the two modules still
depend on each other and can only be understood together (issue 17 names such circles).

The same check runs a second time with each subpackage collapsed into one node: `refresh.py` importing
`lopd.train.data` while `lopd.train.trainer` imported `refresh.py` was a circle between layers although no two
modules imported each other. Each subpackage's `cli.py` counts as part of `lopd.cli`: the command layer sits on
top of every stage by design (`lopd cache repair` runs the score stage over the cache package's format).

An edge points at the module an import names: `from lopd.a import b` goes to `lopd.a.b` when that is a
module, else to `lopd.a`. Importing `lopd.a.b` also runs `lopd/a/__init__.py`, but that implicit step is not
an edge; a package `__init__` that imports its own submodules is an ordinary edge like any other.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "lopd"


def module_name(path: Path) -> str:
    """`lopd/cache/reader.py` -> `lopd.cache.reader`; a package's `__init__.py` is the package itself."""
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imported_modules(node: ast.Import | ast.ImportFrom, importer: Path, known: dict[str, Path]) -> set[str]:
    """The lopd modules one import statement names, relative imports resolved against the importing file."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & known.keys()
    base = node.module or ""
    if node.level:
        package = module_name(importer).split(".")
        if importer.name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    submodules = {f"{base}.{alias.name}" for alias in node.names}
    named = submodules & known.keys()
    if len(named) < len(submodules):  # some names are attributes of `base` itself
        named.add(base)
    return named & known.keys()


def import_graph() -> dict[str, set[str]]:
    """Module -> the lopd modules it imports anywhere in its source."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets |= imported_modules(node, path, known)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def layer(module: str) -> str:
    """The node a module belongs to when subpackages are collapsed: `lopd.train.data` -> `lopd.train`."""
    parts = module.split(".")
    if len(parts) > 2 and parts[-1] == "cli":
        return "lopd.cli"
    return ".".join(parts[:2])


def layer_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    layers: dict[str, set[str]] = {}
    for module, targets in graph.items():
        layers.setdefault(layer(module), set()).update(layer(target) for target in targets)
    return {name: targets - {name} for name, targets in layers.items()}


def describe(found: list[list[str]]) -> str:
    return "\n".join(" <-> ".join(component) for component in found)


def test_cycle_finder_sees_a_circle_and_a_dag():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_graph_counts_function_level_and_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "lopd"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from lopd import b\n")
    (package / "b.py").write_text("from lopd.sub.c import x\n")
    (package / "sub" / "__init__.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("from ..a import f\nimport lopd.b\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_ROOT", package)
    graph = import_graph()
    assert graph["lopd.a"] == {"lopd.b"}
    assert graph["lopd.sub"] == {"lopd.sub.c"}
    assert graph["lopd.sub.c"] == {"lopd.a", "lopd.b"}
    assert cycles(graph) == [["lopd.a", "lopd.b", "lopd.sub.c"]]
    assert layer_graph(graph)["lopd.sub"] == {"lopd.a", "lopd.b"}


def test_lopd_has_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles in lopd (move the piece both sides need into the lower module):\n" + describe(found)


def test_lopd_subpackages_have_no_import_circles():
    found = cycles(layer_graph(import_graph()))
    assert not found, "import circles between lopd's subpackages and modules:\n" + describe(found)
