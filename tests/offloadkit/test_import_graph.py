"""offloadkit's modules import each other without a circle.

A circle (the engine importing the registry, the strategy module importing the engine...)
means no module can be understood, tested or imported on its own, and the order of imports
decides whether a name exists yet. Every import counts, including those inside functions
(a deferred import hides a circle, it does not remove it); only ``if TYPE_CHECKING:`` blocks,
which never run, are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import offloadkit

PACKAGE = Path(offloadkit.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str, modules: set[str]) -> set[str]:
    """offloadkit modules that ``path`` imports. ``from offloadkit import registry`` is an
    import of ``offloadkit.registry``; ``from offloadkit import apply`` one of the package."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for top in ast.walk(tree)
               if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test)
               for node in ast.walk(top)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            subs = {f"{base}.{alias.name}" for alias in node.names}
            found.update(subs & modules if subs <= modules else {base} | (subs & modules))
    # importing offloadkit.engine.options runs offloadkit/engine/__init__.py first (the root
    # package is left out: it re-exports everything and runs before any submodule anyway)
    parents = {".".join(m.split(".")[:k]) for m in found for k in range(2, m.count(".") + 1)}
    return ((found | parents) & modules) - {name, package if name != package else ""}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imported(path, name, modules) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_the_known_edges():
    graph = import_graph()
    assert "offloadkit.staged" in graph["offloadkit.api"]
    assert "offloadkit.registry" in graph["offloadkit.cli"]  # from offloadkit import registry
    assert "offloadkit.registry" in graph["offloadkit.engine.profile"]  # inside a function
    assert "offloadkit.engine" in graph["offloadkit.planner"]  # runs engine/__init__.py
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_offloadkit_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])
