"""No module of the project imports another in a cycle, not even through an import inside a function.

A function-level import hides a cycle from Python (it only fails when the two modules are first
imported in a particular order), so the graph here counts every ``import`` statement at any depth.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "methods", "kernels")


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the project's packages (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")) if (ROOT / pkg).is_dir() else []:
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """Project modules one import statement names explicitly (a parent package a submodule import
    initialises implicitly is not counted: every package would otherwise form a cycle with its members)."""

    def nearest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            src = f"{base}.{node.module}" if node.module else base
        else:
            src = node.module or ""
        # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod
        names = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names]
    return {m for m in map(nearest, names) if m is not None and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set().union(*(_imported(n, name, path.name == "__init__.py", modules) for n in ast.walk(tree)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module that lies on one (each cycle once)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    out: list[list[str]] = []
    for comp in comps:
        for start in sorted(comp):
            cyc = _shortest_cycle(graph, comp, start)
            i = cyc.index(min(cyc[:-1]))
            cyc = cyc[i:-1] + cyc[:i] + [cyc[i]]  # the same cycle always starts at its smallest name
            if cyc not in out:
                out.append(cyc)
    return out


def _shortest_cycle(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """Breadth-first search from ``start`` back to it inside its component (one always exists)."""
    paths = {start: [start]}
    frontier = [start]
    while True:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function():
    """The check itself: a cycle closed by a function-level import is found and printed in order."""
    src = {"a": "import b\n", "b": "def f():\n    from c import x\n", "c": "from a import y\n", "d": "import a\n"}
    modules = {k: Path(k) for k in src}
    graph = {k: set().union(*(_imported(n, k, False, modules) for n in ast.walk(ast.parse(s)))) for k, s in src.items()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "bench.cli" in graph and "methods.base" in graph  # the walk found the packages
    found = cycles(graph)
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join("  " + " -> ".join(c) for c in found)
