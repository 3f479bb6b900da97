"""Print the project's import graph and fail on a cycle (static, from the source text).

    python scripts/import_graph.py            # edges + cycles; exit 1 if any cycle
    python scripts/import_graph.py --quiet    # cycles only

Every ``import x`` / ``from x import y`` that names one of the project's packages counts,
function-level imports included, so a lazy import cannot hide a cycle. The rule it
checks: ``train``, ``calibrate`` and ``deploy`` import ``edge_runtime``, never the reverse,
and no strongly connected component holds more than one module.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_runtime", "train", "calibrate", "deploy")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """module name -> file, for every .py of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for name in names:
                target = resolve(name)
                if target and target != mod:
                    edges[mod].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """edge_runtime modules that import a tool package (train, calibrate, deploy)."""
    return sorted((a, b) for a, bs in edges.items() for b in bs
                  if a.startswith("edge_runtime") and not b.startswith("edge_runtime"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quiet", action="store_true", help="print only problems")
    args = p.parse_args(argv)
    edges = graph()
    if not args.quiet:
        for mod in sorted(edges):
            if edges[mod]:
                print(f"{mod} -> {', '.join(sorted(edges[mod]))}")
    bad = cycles(edges)
    for comp in bad:
        print("cycle: " + " <-> ".join(comp))
    for a, b in upward_imports(edges):
        print(f"upward import: {a} -> {b}")
    n_edges = sum(len(v) for v in edges.values())
    print(f"{len(edges)} modules, {n_edges} imports, {len(bad)} cycles, {len(upward_imports(edges))} upward imports")
    return 1 if bad or upward_imports(edges) else 0


if __name__ == "__main__":
    sys.exit(main())
