"""The package's shape: modules that do not import each other in a circle, functions and classes a
reader can hold. (Measured on the source, so a change that breaks the rule fails here.)"""
import ast
from pathlib import Path

from llm_nb_utils.env import REPO

PACKAGE = REPO / "llm_nb_utils"
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 80, 200


def _trees() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.glob("*.py")}


def imports_of(tree: ast.Module, modules: set[str]) -> set[str]:
    """The package's modules one module imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
            elif (node.module or "").startswith("llm_nb_utils"):
                rest = node.module.split(".", 1)
                names = [rest[1]] if len(rest) > 1 else [a.name for a in node.names]
            else:
                names = []
            found |= {n.split(".")[0] for n in names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("llm_nb_utils.")}
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}        # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_module_imports_itself_through_others():
    trees = _trees()
    modules = set(trees) - {"__init__"}
    graph = {name: imports_of(tree, modules) - {name} for name, tree in trees.items() if name in modules}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]    # the check itself


def test_functions_and_classes_stay_small():
    too_long = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else
                     MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long
