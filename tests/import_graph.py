"""The package's import graph, read from the source (every `import` statement, also those inside
functions), its cycles, and the imports made inside functions.

`python tests/import_graph.py` prints the function-level imports of the package and every import
cycle; tests/test_import_cycles.py fails on a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root is the `ragkv` package
PACKAGE = "ragkv"
OUTSIDE = {"tests", "benchmarks", "experiments", "examples", "docs", "scripts", ".venv", ".dev", "build"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: its file} for every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in OUTSIDE or any(p.startswith(".") for p in rel.parts):
            continue
        parts = [PACKAGE, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    """The package modules one import statement loads (a `from x import name` naming a submodule
    loads that submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known or a.name.startswith(PACKAGE + ".")]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return []
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    named_only_submodules = len(found) == len(node.names) and node.module is None
    return found if named_only_submodules else [target, *found]


def imports(root: Path = ROOT) -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, inside a function) for every import of one package module by another."""
    mods = modules(root)
    known = set(mods)
    out = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        inside: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside.update(id(n) for n in ast.walk(fn) if n is not fn)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, path.name == "__init__.py", node, known):
                    if target in known and target != name:
                        out.append((name, target, node.lineno, id(node) in inside))
    return out


def cycles(edges: list[tuple[str, str, int, bool]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted. A package's
    `__init__` importing its own submodules and being imported back by them is not counted: Python
    resolves those (the submodule is loaded by then) and the layers contract covers the folders."""
    graph: dict[str, set[str]] = {}
    for a, b, _, _ in edges:
        if b.startswith(a + ".") or a.startswith(b + "."):
            continue  # a package and its own submodules
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def main() -> None:
    edges = imports()
    print("imports inside functions:")
    for a, b, line, inside in sorted(edges):
        if inside:
            print(f"  {a}:{line} -> {b}")
    found = cycles(edges)
    print(f"import cycles: {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))


if __name__ == "__main__":
    main()
