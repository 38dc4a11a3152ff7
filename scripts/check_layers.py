"""Import layers of `rlhf_cli` (`python scripts/check_layers.py`): every import between the package's modules, those
inside functions included, checked against the layer order below; prints the import circles and the imports that
point up a layer, and exits 1 when there is any.

A module may import from its own layer or the ones listed before it, never from a later one:
errors, jsonsafe, files, tasks -> config, registry, data, losses, models, metrics, preempt, slurm, checkpoints,
engine -> run_dir, provenance, stage_state, summary, plots -> rollout -> stages -> commands, launch, cli.

Usage: python scripts/check_layers.py [--package rlhf_cli]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

LAYERS = [
    ["errors", "jsonsafe", "files", "tasks", "assets", "__init__"],
    ["config", "registry", "data", "losses", "models", "metrics", "preempt", "slurm", "checkpoints", "engine"],
    ["run_dir", "provenance", "stage_state", "summary", "plots"],
    ["rollout"],
    ["stages"],
    ["commands", "launch", "cli", "__main__"],
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or inside functions)."""
    package = root.name
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            found = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` imports the submodule (and pkg's __init__, which is not counted)
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                found = subs or [node.module]
            for target in found:
                if target.startswith(package) and target in modules and target != name:
                    graph[name].add(target)
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next((i for i, names in enumerate(LAYERS) if top in names), len(LAYERS))


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=Path(__file__).resolve().parent.parent / "rlhf_cli")
    graph = imports(parser.parse_args().package)
    ups, loops = upward(graph), circles(graph)
    for a, b in ups:
        print(f"upward: {a} -> {b}")
    for loop in loops:
        print(f"circle: {' <-> '.join(loop)}")
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports: {len(ups)} upward, {len(loops)} circles")
    sys.exit(1 if ups or loops else 0)


if __name__ == "__main__":
    main()
