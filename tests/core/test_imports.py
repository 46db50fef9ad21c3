"""fedprune_core's imports point down only: nothing from the layers above, and no circle inside."""

from __future__ import annotations

import ast
from pathlib import Path

import fedprune_core

ROOT = Path(fedprune_core.__file__).parent
ABOVE = ("flows", "tasks", "infra", "prefect", "mlflow", "boto3")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[str]:
    """Modules a file imports when it runs (function bodies included, `if TYPE_CHECKING:` left out)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.extend(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for imported in _runtime_imports(ast.parse(path.read_text())):
            module = imported if imported in files else imported.rpartition(".")[0]
            while module and module not in files:  # `from pkg import name`: the package
                module = module.rpartition(".")[0]
            deps |= {module} | {p for p in files if module.startswith(f"{p}.")}  # its packages run first
        # a module's own packages are being imported already when it runs: no edge back to them
        graph[name] = {d for d in deps if d and d != name and not name.startswith(f"{d}.")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph`, or [] (depth-first search for a back edge)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := walk(dep, [*path, dep])):
                return found
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := walk(start, [start])):
            return found
    return []


def test_the_core_imports_nothing_from_the_layers_above_it() -> None:
    for path in ROOT.rglob("*.py"):
        above = [m for m in _runtime_imports(ast.parse(path.read_text())) if m.split(".")[0] in ABOVE]
        assert not above, f"{path.relative_to(ROOT.parent)} imports {above}: the core is pure torch"


def test_no_module_of_the_core_imports_itself_through_others() -> None:
    graph = _graph()
    assert "fedprune_core.units" in graph["fedprune_core.prunable"]  # the graph sees imports
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def test_a_circle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
