"""The package's import graph is one-way: no duo_gateway module imports, however indirectly, itself.

A cycle means two modules that can only be understood (and loaded) together, and it is how layers
quietly fuse (a codec importing a service, a simulator's network importing its own scenario). Every
import counts, top-level, function-level and ``TYPE_CHECKING`` alike: a deferred import hides a cycle
from the interpreter, not from the reader. The one edge left out is the implicit one from a module to
its parent package's ``__init__`` (Python runs it first), because a package re-exporting its own
submodules is not a cycle between them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "duo_gateway"
ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package by dotted name, with its file and whether it is a package."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _owner(name: str, modules: dict[str, tuple[Path, bool]]) -> str | None:
    """The module a dotted import name lands in (``pkg.mod.Symbol`` -> ``pkg.mod``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Each module's direct imports of other duo_gateway modules."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_owner(alias.name, modules) for alias in node.names
                               if alias.name.split(".")[0] == PACKAGE)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                if base.split(".")[0] != PACKAGE:
                    continue
                # `from pkg import submodule` imports the submodule; `from mod import Symbol` the module.
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules
                               else _owner(base, modules) for alias in node.names)
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
    return "\n  ".join(edges)


def test_the_graph_sees_every_kind_of_import() -> None:
    """The check is only as good as the graph: known edges of each import form must be in it."""
    graph = import_graph()
    assert "duo_gateway.sim.network" in graph["duo_gateway.sim.demo"]  # module level `from x import y`
    assert "duo_gateway.sim.demo" in graph["duo_gateway.cli"]  # inside a function
    assert "duo_gateway.xca.codes" in graph["duo_gateway.xca"]  # a package re-exporting a submodule


def test_no_import_cycle_among_package_modules() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n  " + "\n  ".join(_describe(c, graph) for c in found)


def test_the_cycle_finder_finds_a_cycle() -> None:
    """A finder that never finds anything would pass the test above forever."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
