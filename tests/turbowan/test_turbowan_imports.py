"""turbowan's modules import each other without circles.

A circle (``a`` imports ``b``, ``b`` imports ``a``, even inside a function) means two modules
share a piece that belongs in a leaf of its own. Every ``import`` statement in a module counts,
deferred ones too: deferring an import hides a circle from Python, not from the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import turbowan

ROOT = Path(turbowan.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imports(tree: ast.AST, name: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in ``tree``, relative ones resolved."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the turbowan modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        deps = set()
        for module, names in _imports(ast.parse(path.read_text()), name, is_package):
            for imported in names or [None]:
                sub = f"{module}.{imported}" if imported else None
                if sub in modules:
                    deps.add(sub)
                elif module in modules:
                    deps.add(module)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_deferred_imports():
    graph = import_graph()
    # imported inside a function (turbowan.pipeline.i2v loads the DiT only when a run starts)
    assert "turbowan.dit.loading" in graph["turbowan.pipeline.i2v"]
    assert "turbowan.pipeline.preflight" in graph["turbowan.pipeline.i2v"]  # `from pkg import mod`
    assert len(graph) > 80


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def offloadkit_uses() -> list[tuple[str, str]]:
    """(turbowan module, what it takes from offloadkit) for every import of offloadkit and every
    ``offloadkit.<name>`` attribute it reads."""
    uses = []
    for name, (path, is_package) in _modules().items():
        tree = ast.parse(path.read_text())
        for module, names in _imports(tree, name, is_package):
            if module == "offloadkit":
                uses += [(name, imported) for imported in names]
            elif module.startswith("offloadkit."):
                uses.append((name, module))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "offloadkit"):
                uses.append((name, node.attr))
    return uses


def test_turbowan_uses_only_offloadkits_public_api():
    """offloadkit's main client is written with offloadkit's public API: what it needs belongs
    in ``offloadkit.__all__``, not in a private module."""
    import offloadkit

    uses = offloadkit_uses()
    assert ("turbowan.pipeline.budget_fit", "check_fits") in uses  # the walk sees attribute reads
    private = sorted({(module, what) for module, what in uses if what not in offloadkit.__all__})
    assert private == []
