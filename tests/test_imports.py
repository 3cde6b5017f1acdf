"""The package's import graph: no circles between transerve's modules, and the step contract without torch.

Read from the source with `ast`: module-level imports and imports inside functions count (a lazy import
that closes a circle is still a circle), those under `if TYPE_CHECKING:` do not.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "transerve"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement in `tree` may load (the module, or module.member)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in (or is)
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges among transerve modules, top-level outside packages each module imports directly)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    outside: dict[str, set[str]] = {}
    for module, path in paths.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        graph[module] = {name for name in names if name in paths and name != module}
        outside[module] = {name.split(".")[0] for name in names if not name.startswith("transerve")}
    return graph, outside


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_walker_sees_lazy_imports_and_skips_type_checking_ones():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
                     "def f():\n    from .c import d\n")
    assert imported_names(tree, "transerve.engine.x", False) == {"typing", "typing.TYPE_CHECKING", "b",
                                                                  "transerve.engine.c", "transerve.engine.c.d"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles_in_the_package():
    graph, _ = import_graph()
    assert len(graph) > 50 and "transerve.engine.step" in graph["transerve.engine.core"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_step_contract_imports_no_torch():
    graph, outside = import_graph()
    reached, todo = set(), ["transerve.engine.step"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    heavy = {m: outside[m] & {"torch", "transformers", "triton", "numpy"} for m in reached}
    assert not any(heavy.values()), {m: names for m, names in heavy.items() if names}
    # And at run time: importing it loads no torch.
    code = "import sys, transerve.engine.step, transerve.actors.messages; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
