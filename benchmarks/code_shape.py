"""The shape of the code: the longest function per package, every function over 60 lines,
import circles, and imports that go up against the layer order of DESIGN.md.

A function's length is its lines without its docstring (the signature, comments and
blank lines count): an argument list documented in full is not what makes a function
hard to enter.

    python benchmarks/code_shape.py [--out benchmarks/results/code_shape.json]

Reads the source with ``ast`` (nothing is imported). Every import of a ``dymu`` module
counts, at module level or inside a function (a lazy import is still a dependency). The
layers, lowest first, follow the data flow:

    base (config, errors, io, registry, artifacts, lock, dist) -> tasks -> data -> models
    -> space -> affinity -> losses, hypernet -> train, run, weighting -> evaluate, search,
    baselines, pareto (the comparison methods) -> compile -> cli

The space comes before the affinity estimate (DESIGN.md lists them the other way): the
space needs only the models, while the gradient-based affinity estimators run the tasks
on trees of the space (``TreeSpec``, ``TreeNet``).

A module may import its own layer and those below; an import of a higher layer is
"upward". Prints a summary and writes JSON.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "dymu": ROOT / "dymu",
    "dymu.affinity": ROOT / "affinity",
    "dymu.compile": ROOT / "compile",
}

LAYERS = [
    ["dymu", "dymu.config", "dymu.errors", "dymu.io", "dymu.registry", "dymu.artifacts",
     "dymu.lock", "dymu.dist"],
    ["dymu.tasks"],
    ["dymu.data"],
    ["dymu.models"],
    ["dymu.space"],
    ["dymu.affinity"],
    ["dymu.losses", "dymu.hypernet"],
    ["dymu.train", "dymu.run", "dymu.weighting"],
    ["dymu.evaluate", "dymu.search", "dymu.baselines", "dymu.pareto"],
    ["dymu.compile"],
    ["dymu.cli", "dymu.__main__"],
]  # fmt: skip


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if "bundle_files" in path.parts:  # shipped to the device, not part of dymu
                continue
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "dymu" and parts and parts[0] in ("affinity", "compile"):
                continue
            found[name] = path
    return found


def layer_of(name: str) -> int:
    """The layer of a module: that of the longest layer entry it falls under."""
    best, depth = 0, -1
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if (name == entry or name.startswith(entry + ".")) and entry.count(".") > depth:
                best, depth = i, entry.count(".")
    return best


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            # ``from pkg import sub`` imports the submodule; ``from pkg import name``, pkg
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs + ([base] if len(subs) < len(node.names) else [])
        for t in targets:
            # the deepest known module the target names
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


LONG = 60
"""Functions longer than this many lines are listed one by one."""


def longest_functions(path: Path) -> list[tuple[int, str]]:
    """(lines without the docstring, qualified name) of every function in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                qual = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                first = child.body[0]
                docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                if docstring and isinstance(first.value.value, str):
                    lines -= first.end_lineno - first.lineno + 1
                out.append((lines, qual))
                visit(child, qual + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (import circles)."""
    import networkx as nx

    g = nx.DiGraph([(a, b) for a, bs in graph.items() for b in bs])
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/code_shape.json"))
    args = parser.parse_args()
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    upward = sorted((a, b) for a, bs in graph.items() for b in bs if layer_of(b) > layer_of(a))
    circles = cycles(graph)
    per_package: dict[str, tuple[int, str]] = {}
    long: list[tuple[int, str]] = []
    for name, path in mods.items():
        package = name.rpartition(".")[0] if path.name != "__init__.py" else name
        for lines, func in longest_functions(path):
            if lines > per_package.get(package, (0, ""))[0]:
                per_package[package] = (lines, f"{name}.{func}")
            if lines > LONG:
                long.append((lines, f"{name}.{func}"))
    print("longest function per package (lines without the docstring):")
    for lines, func in sorted(per_package.values(), reverse=True):
        print(f"  {lines:4d}  {func}")
    print(f"functions over {LONG} lines: {len(long) or 'none'}")
    for lines, func in sorted(long, reverse=True):
        print(f"  {lines:4d}  {func}")
    print(f"import circles: {len(circles) or 'none'}")
    for c in circles:
        print("  " + " <-> ".join(c))
    print(f"upward imports: {len(upward) or 'none'}")
    for a, b in upward:
        print(f"  {a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})")
    result = {
        "command": "python benchmarks/code_shape.py",
        "longest_function_per_package": {
            p: {"lines": n, "function": f} for p, (n, f) in sorted(per_package.items())
        },
        f"functions_over_{LONG}_lines": [
            {"lines": n, "function": f} for n, f in sorted(long, reverse=True)
        ],
        "import_circles": circles,
        "upward_imports": [list(p) for p in upward],
        "layers": LAYERS,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
