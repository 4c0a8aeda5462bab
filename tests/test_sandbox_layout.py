"""The sandbox's modules import without cycles: each can be the first one imported.

Its three servers (the Marple DB API, the older Marple API, the data service) share
``daemon/sandbox/common.py`` instead of importing each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SANDBOX = Path(__file__).resolve().parent.parent / "daemon" / "sandbox"
MODULES = sorted(p.stem for p in SANDBOX.glob("*.py") if p.stem != "__init__")


def _imports(module: str) -> set[str]:
    """The sandbox modules ``module`` imports anywhere in its text: at the top, inside
    functions and under ``if TYPE_CHECKING`` alike (a cycle that only the type checker follows
    is still two modules that each need the other)."""
    tree = ast.parse((SANDBOX / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "daemon.sandbox":
                found |= {alias.name for alias in node.names if alias.name in MODULES}
            elif node.module.startswith("daemon.sandbox."):
                found.add(node.module.removeprefix("daemon.sandbox.").split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("daemon.sandbox."):
                    found.add(alias.name.removeprefix("daemon.sandbox.").split(".")[0])
    return found - {module}


def test_the_sandbox_import_graph_has_no_cycle() -> None:
    graph = {module: _imports(module) for module in MODULES}
    assert graph["app"] >= {"common", "legacy", "dataservice"}  # the graph is really read
    for server in ("legacy", "dataservice"):
        assert "app" not in graph[server] and "common" in graph[server]
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in MODULES:
        visit(module, [])


@pytest.mark.parametrize("module", MODULES)
def test_each_sandbox_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    ran = subprocess.run(
        [sys.executable, "-c", f"import daemon.sandbox.{module}"],
        capture_output=True,
        text=True,
        cwd=SANDBOX.parent.parent,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
