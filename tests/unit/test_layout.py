"""The house rules of the code's layout, checked: rooms import forward along the way a comment
travels (api -> storage -> live -> live/redis, with model, config and metrics for everyone),
there is no import circle, and no module or class grows into a room of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "livecomments"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 280
# Which rooms a room may import from (besides itself and the shared modules).
SHARED = {"model", "config", "metrics", "backoff", "urls"}
MAY_IMPORT = {
    "api": {"storage", "live"},
    "storage": set(),
    "live": set(),
    "cli": {"api", "storage"},
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (imports inside functions are deliberate and lazy)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("livecomments"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("livecomments"))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    return {name: top_level_imports(path) & set(MODULES) for name, path in MODULES.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "livecomments"


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_rooms_import_forward_only():
    wrong = []
    for module, imports in graph().items():
        here = room(module)
        allowed = MAY_IMPORT.get(here)
        if allowed is None:
            continue
        for imported in imports:
            there = room(imported)
            if there not in {here, "livecomments"} | SHARED | allowed:
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_no_module_or_class_outgrows_its_room():
    too_big = []
    for module, path in MODULES.items():
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{module}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{module}.{node.name}: {size} lines")
    assert too_big == []
