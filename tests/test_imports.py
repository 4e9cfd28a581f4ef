"""No import circles inside patternnet: not at module level, not through imports inside
functions, not for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "patternnet"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = SRC / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The patternnet modules ``path`` imports anywhere: at module level, inside functions
    (imported when called) and for type checking."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        for child in ast.walk(node):
            if isinstance(child, ast.Import):
                found |= {a.name for a in child.names if a.name.startswith("patternnet")}
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if not target.startswith("patternnet"):
                    continue
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if is_module(sub) else target)
    found.discard(name)
    return found


def test_no_import_circles() -> None:
    graph = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
    # a package's __init__ importing its own submodules is how packages work: only a circle
    # that passes through another module counts
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                packages = [m for m in cycle[:-1] if (SRC / Path(*m.split("."))).is_dir()]
                inner = [m for m in cycle[:-1] if m not in packages]
                if not (packages and all(m.startswith(packages[0] + ".") for m in inner)):
                    cycles.append(" → ".join(cycle))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import circles:\n" + "\n".join(cycles)
