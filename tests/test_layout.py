"""The layout draws the flow (issue #12), checked from the source with ``ast``, not by eye.

``daemon/`` has one folder per stage: intake → state → engine → delivery → net, with service
(the composition root) and commands (the CLI) on top and the sandbox beside. These tests read
every module's imports and calls and check the rules README's "Layout" section states:

* the import graph has no cycle (module-level imports, the ones that run at import time);
* each stage imports only the stages below it (``FORBIDDEN``), the top-level modules import no
  stage (``TOP_LEVEL_MAY``, each exception with its reason), the sandbox stands on its own;
* only ``daemon/state/`` runs SQL; only ``daemon/net/`` builds HTTP clients and TLS contexts;
* no module imports another module's private name;
* every folder says its one job (a package docstring); a module over 700 lines says at its
  top why it is one module ("Why one module:");
* tests import shared helpers from ``tests/support/``, never from another test module or from
  ``conftest.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / "daemon"
STAGES = ("intake", "state", "engine", "delivery", "net", "service", "commands", "sandbox")
#: Modules every stage may use. ``retry`` is here, not in engine/: the delivery flows retry
#: their steps with the same policy the engine backs off whole jobs with, and delivery sits
#: below the engine.
TOP_LEVEL = ("config", "errors", "logs", "compat", "extras", "outcomes", "retry")

#: stage → the stages it must not import (the flow runs one way; see README "Layout").
FORBIDDEN: dict[str, set[str]] = {
    "state": {"intake", "engine", "delivery", "net", "service", "commands", "sandbox"},
    "net": {"state", "intake", "engine", "delivery", "service", "commands", "sandbox"},
    "delivery": {"intake", "engine", "service", "commands", "sandbox"},
    "intake": {"engine", "delivery", "net", "service", "commands", "sandbox"},
    "engine": {"intake", "service", "commands", "sandbox"},
    "service": {"commands", "sandbox"},
    "commands": set(),
}
#: The sandbox (a test/demo server) may use only these of the daemon's modules.
SANDBOX_MAY = ("daemon.sandbox", "daemon.net", "daemon.compat", "daemon.errors")
#: Top-level modules import no stage, except these (module → allowed module prefixes: why).
TOP_LEVEL_MAY: dict[str, dict[str, str]] = {
    # Settings are checked with the parsers their users apply, so a value that loads is a value
    # that works: the metrics endpoint's listen address, the bandwidth rates and windows.
    "daemon.config": {
        "daemon.net.addresses": "[metrics] listen is parsed as the endpoint binds it",
        "daemon.net.bandwidth": "[bandwidth] rates and windows are parsed as they are applied",
    },
}
#: The program's entry: the CLI, and the early signal catcher it installs before any import.
ENTRY: dict[str, tuple[str, ...]] = {
    "daemon.__main__": ("daemon.commands", "daemon.service.signals")
}
#: Crossings of the rules above, each with its reason (importer, imported module): why.
CROSSINGS: dict[tuple[str, str], str] = {
    # The data service names a data set per [[routes]] entry: the target asks which route a
    # file took with the same pure matching intake routed it by (no I/O, no state).
    ("daemon.delivery.data_service.target", "daemon.intake.routing"): "the file's route",
}

SQL_CALLS = {"execute", "executemany", "executescript", "execute_fetchall", "execute_insert"}
HTTP_BUILDERS = {
    ("httpx", "AsyncClient"),
    ("httpx", "Client"),
    ("httpx", "Limits"),
    ("httpx", "AsyncHTTPTransport"),
    ("httpx", "HTTPTransport"),
    ("ssl", "SSLContext"),
    ("ssl", "create_default_context"),
}
LONG_MODULE = 700


@dataclass(frozen=True)
class Import:
    """One import in a module: the module it names, the names it takes, where it sits."""

    source: str  # the importing module
    target: str  # the module named (for ``from a import b``: ``a.b`` when b is a module)
    names: tuple[str, ...]
    line: int
    module_level: bool  # runs at import time (not in a function, not under TYPE_CHECKING)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(DAEMON.rglob("*.py"))}


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(
    body: list[ast.stmt], module_level: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, module_level
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _walk(node.body, False)
            yield from _walk(node.orelse, module_level)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(list(ast.walk(node))[1:], False)  # type: ignore[arg-type]
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    stmts = [n for n in inner if isinstance(n, ast.stmt)]
                    handlers = [n for n in inner if isinstance(n, ast.ExceptHandler)]
                    yield from _walk(stmts, module_level)
                    for h in handlers:
                        yield from _walk(h.body, module_level)


def imports_of(name: str, path: Path) -> list[Import]:
    """Every import of ``daemon.*`` in the module, resolved to module names."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    seen: dict[tuple[str, int], Import] = {}
    for node, module_level in _walk(tree.body, True):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "daemon":
                    imp = Import(name, alias.name, (), node.lineno, module_level)
                    seen[(imp.target, imp.line)] = imp
            continue
        base = node.module or ""
        if node.level:
            up = package.split(".")
            up = up[: len(up) - (node.level - 1)]
            base = ".".join([*up, base] if base else up)
        if base.split(".")[0] != "daemon":
            continue
        plain = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in MODULES:
                seen[(sub, node.lineno)] = Import(name, sub, (), node.lineno, module_level)
            else:
                plain.append(alias.name)
        if plain:
            imp = Import(name, base, tuple(plain), node.lineno, module_level)
            seen[(base, node.lineno)] = imp
    return list(seen.values())


ALL_IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path)]


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in STAGES:
        return parts[1]
    return None


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# ----------------------------------------------------------------------------- the tree


def test_every_stage_folder_exists_and_says_its_job() -> None:
    for stage in STAGES:
        init = DAEMON / stage / "__init__.py"
        assert init.is_file(), f"daemon/{stage}/ is missing"
    for init in DAEMON.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 20, f"{init.relative_to(ROOT)}: no docstring naming its job"


def test_no_module_outside_a_stage_but_the_top_level_ones() -> None:
    allowed = {"daemon", "daemon.__main__", *(f"daemon.{m}" for m in TOP_LEVEL)}
    stray = [m for m in MODULES if stage_of(m) is None and m not in allowed]
    assert not stray, f"modules outside the stage folders: {stray}"


def test_a_long_module_says_why_it_is_one_module() -> None:
    unexplained = []
    for name, path in MODULES.items():
        lines = path.read_text().count("\n")
        if lines > LONG_MODULE:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if "Why one module:" not in doc:
                unexplained.append(f"{name} ({lines} lines)")
    assert not unexplained, (
        f"over {LONG_MODULE} lines with no 'Why one module:' in the docstring: {unexplained}"
    )


# ----------------------------------------------------------------------------- the imports


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in ALL_IMPORTS:
        if module_level_only and not imp.module_level:
            continue
        target = imp.target
        while target not in MODULES and "." in target:
            target = target.rpartition(".")[0]  # ``import daemon.x.Name`` style: the module
        if target in MODULES and target != imp.source:
            graph[imp.source].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle() -> None:
    assert not _cycles(_graph(module_level_only=True))


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a made-up graph with a cycle is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _violations() -> list[str]:
    bad = []
    for imp in ALL_IMPORTS:
        src, dst = imp.source, imp.target
        where = f"{src}:{imp.line} imports {dst}"
        if (src, dst) in CROSSINGS:
            continue
        src_stage, dst_stage = stage_of(src), stage_of(dst)
        if src_stage == "sandbox":
            if not any(_under(dst, ok) for ok in SANDBOX_MAY):
                bad.append(f"{where} (the sandbox uses only {SANDBOX_MAY})")
            continue
        if dst_stage == "sandbox" and src_stage not in ("commands", None):
            bad.append(f"{where} (only commands start the sandbox)")
        if src_stage is not None and dst_stage in FORBIDDEN.get(src_stage, set()):
            bad.append(f"{where} ({src_stage} must not import {dst_stage})")
        if src_stage is None and dst_stage is not None:
            allowed = {**TOP_LEVEL_MAY.get(src, {})}
            for entry in ENTRY.get(src, ()):
                allowed[entry] = "entry point"
            if not any(_under(dst, ok) for ok in allowed):
                bad.append(f"{where} (a top-level module imports no stage)")
    return bad


def test_each_stage_imports_only_the_stages_below_it() -> None:
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_name() -> None:
    bad = [
        f"{imp.source}:{imp.line} imports {name} from {imp.target}"
        for imp in ALL_IMPORTS
        for name in imp.names
        if name.startswith("_") and not name.startswith("__") and imp.target != imp.source
    ]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------- SQL and HTTP boundaries


def _calls(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, owner, attribute) of every ``owner.attr(...)`` call and ``Name(...)`` call whose
    name was imported ``from owner import Name``."""
    tree = ast.parse(path.read_text())
    imported: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("httpx", "ssl"):
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else ""
            yield node.lineno, owner, func.attr
        elif isinstance(func, ast.Name) and func.id in imported:
            yield node.lineno, imported[func.id], func.id


def test_only_state_runs_sql() -> None:
    bad = []
    for name, path in MODULES.items():
        if stage_of(name) == "state":
            continue
        for line, owner, attr in _calls(path):
            if attr in SQL_CALLS or (owner in ("sqlite3", "aiosqlite") and attr == "connect"):
                bad.append(f"{name}:{line} {owner}.{attr}()")
    assert not bad, "SQL outside daemon/state/:\n" + "\n".join(bad)


def test_only_net_builds_http_clients_and_tls_contexts() -> None:
    bad = []
    for name, path in MODULES.items():
        if stage_of(name) == "net":
            continue
        for line, owner, attr in _calls(path):
            if (owner, attr) in HTTP_BUILDERS:
                bad.append(f"{name}:{line} {owner}.{attr}()")
    assert not bad, "HTTP clients built outside daemon/net/:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- the tests


def _test_files() -> list[Path]:
    return sorted((ROOT / "tests").rglob("*.py"))


def test_tests_import_helpers_only_from_support() -> None:
    """Shared helpers live in tests/support/: no test module imports another test module
    (its private helpers) and conftest.py is not imported as a library."""
    bad = []
    for path in _test_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for mod in names:
                last = mod.split(".")[-1]
                if mod.startswith("tests.") and (last.startswith("test_") or last == "conftest"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {mod}")
    assert not bad, "\n".join(bad)


def test_tests_take_no_private_helper_from_support() -> None:
    bad = []
    for path in _test_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name} from {node.module}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not bad, "\n".join(bad)


SHARED = ("wait_for", "wait_until", "_wait", "_wait_for", "_stop", "stop_daemon", "_kill")


def test_each_shared_helper_is_defined_once() -> None:
    """The waits and the daemon's stop exist once (tests/support/), not per test module."""
    where: dict[str, list[str]] = {}
    for path in _test_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in SHARED:
                where.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    twice = {name: files for name, files in where.items() if len(files) > 1}
    assert not twice, f"defined more than once (use tests/support/): {twice}"
