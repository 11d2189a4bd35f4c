"""The import rules of docs/architecture.md, read from the source (every import statement,
function-local and type-checking ones included):

- data_prep imports nothing else of zeroforge; model imports nothing else of zeroforge;
- pipeline imports model and data_prep, never launch; launch may import everything;
- no import cycle among the project's modules;
- no module uses another module's private (``_name``) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "data_prep", "launch", "model", "pipeline")
ALLOWED = {  # package -> the zeroforge packages it may import
    "configs": set(),
    "data_prep": {"data_prep"},
    "model": {"model"},
    "pipeline": {"pipeline", "model", "data_prep"},
    "launch": {"launch", "pipeline", "model", "data_prep"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["zeroforge." + ".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported zeroforge module, names taken from it, line) for every import in ``path``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import module` imports the module; `from mod import name` a name.
                found.append((sub, [], node.lineno) if sub in MODULES else
                             (base, [alias.name], node.lineno))
    return [(mod, names, line) for mod, names, line in found if mod.startswith("zeroforge.")]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _package(module: str) -> str:
    return module.split(".")[1]


def test_imports_follow_the_layering():
    bad = [f"{MODULES[src].relative_to(REPO)}:{line} imports {dst}"
           for src, edges in GRAPH.items() for dst, _, line in edges
           if _package(dst) not in ALLOWED[_package(src)]]
    assert not bad, "\n".join(bad)


def test_every_import_names_a_real_module():
    missing = [f"{MODULES[src].relative_to(REPO)}:{line}: {dst}" for src, edges in GRAPH.items()
               for dst, _, line in edges if dst not in MODULES]
    assert not missing, "\n".join(missing)


def test_no_import_cycles():
    edges = {src: sorted({dst for dst, _, _ in out if dst in MODULES and dst != src})
             for src, out in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_private_names_across_modules():
    bad = []
    for src, path in MODULES.items():
        aliases = {}
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) or isinstance(node, ast.Import):
                for alias in node.names:
                    aliases[alias.asname or alias.name.split(".")[-1]] = alias.name
        for dst, names, line in GRAPH[src]:
            bad += [f"{path.relative_to(REPO)}:{line}: {dst}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__") and dst != src]
        modules_here = {a for a, full in aliases.items()
                        if any(m.endswith("." + full.split(".")[-1]) or m == full
                               for m in MODULES)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in modules_here and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)
