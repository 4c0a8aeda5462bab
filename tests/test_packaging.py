"""Packaging for field PCs: the core install, the extras, the locks, install-files, the bundle.

A field PC installs only ``requirements.lock`` (README "Install on a logging PC"). The tests
marked ``field`` run the *installed* ``inboxd`` of such a venv, as a subprocess, against the
sandbox served from this (the test) venv. The venv is ``$INBOXD_CORE_VENV`` when set (CI points
it at the venv the offline bundle's ``install.sh`` made with no index, see ``.ci/run``), else
one made here with uv from ``requirements.lock`` and a wheel of this checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from daemon.commands.install_files import DOC_DIR, SHIPPED, files
from daemon.compat import UTC, StrEnum, fromisoformat, sqlite_errorname, tomllib
from daemon.sandbox import Sandbox
from daemon.state import JobState
from tests.support.data import write_file
from tests.support.runner import REPO, inboxd, start_daemon, write_config
from tests.support.waits import wait_for

#: the modules only the extras bring: a core install has none of them
EXTRA_MODULES = ("starlette", "uvicorn", "authlib", "cryptography")
LOCKS = {
    "core": REPO / "requirements.lock",
    "sandbox": REPO / "requirements-sandbox.lock",
    "data-service": REPO / "requirements-data-service.lock",
    "dev": REPO / "requirements-dev.lock",
}


# ---- the core install ----------------------------------------------------------------------


def _run(*command: str | Path) -> None:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(map(str, command))}:\n{done.stdout}{done.stderr}"


def _make_core_venv(where: Path) -> Path:
    """A venv of requirements.lock plus this checkout's wheel: what a field PC installs."""
    uv = Path(sys.executable).parent / "uv"
    assert uv.is_file(), "uv is missing from the test venv: install requirements-dev.lock"
    venv = where / "venv"
    _run(uv, "venv", "--quiet", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    lock = LOCKS["core"]
    _run(uv, "pip", "install", "--quiet", "--python", python, "--require-hashes", "-r", lock)
    _run(uv, "build", "--quiet", "--wheel", "--out-dir", where / "dist", REPO)
    (wheel,) = (where / "dist").glob("inboxd-*.whl")
    _run(uv, "pip", "install", "--quiet", "--python", python, "--no-deps", wheel)
    return venv


@pytest.fixture(scope="session")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only the core install (asserted: none of the extras' modules)."""
    given = os.environ.get("INBOXD_CORE_VENV")
    venv = Path(given) if given else _make_core_venv(tmp_path_factory.mktemp("core"))
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util, json, sys; "
            "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))",
            *EXTRA_MODULES,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(probe.stdout) == [], f"{venv} is not a core install"
    return venv


@pytest.fixture
def core(core_venv: Path) -> Sequence[str]:
    """The installed ``inboxd`` of the core venv (a console script: it never imports this
    checkout, whatever the working directory)."""
    return (str(core_venv / "bin" / "inboxd"),)


def _status(config: Path, program: Sequence[str]) -> dict[str, Any]:
    out = inboxd("status", "--config", str(config), "--json", program=program)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


@pytest.mark.field
@pytest.mark.parametrize("kind", ["marple-db", "marple"])
def test_a_core_install_runs_the_daemon_for_marple_db_and_marple(
    kind: str, core: Sequence[str], sandbox: Sandbox, tmp_path: Path
) -> None:
    """check, push, run, status and retry, from a venv without starlette, uvicorn or authlib."""
    cfg = write_config(tmp_path, sandbox, api={"kind": kind})
    checked = inboxd("check", "--config", str(cfg), program=core)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "✗" not in checked.stdout

    write_file(tmp_path / "pushed.csv", 2000, seed=1)
    pushed = inboxd("push", "--config", str(cfg), str(tmp_path / "pushed.csv"), program=core)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr

    log = tmp_path / "daemon.log"
    daemon = start_daemon(cfg, log, program=core)
    try:
        write_file(tmp_path / "inbox" / "run.csv", 3000, seed=2)
        (tmp_path / "inbox" / "empty.csv").write_bytes(b"")

        def settled() -> dict[str, Any] | None:
            if not (tmp_path / "state" / "state.db").exists():
                return None  # the daemon is still starting
            snap = _status(cfg, core)
            counts = snap["counts"]
            return snap if counts["done"] == 1 and counts["failed"] == 1 else None

        snap = wait_for(settled, 60, "the status to settle", step=0.2)
        assert snap["daemon"]["alive"], log.read_text()
        (failed,) = [job for job in snap["jobs"] if job["state"] == "failed"]
        assert failed["path"] == "empty.csv" and failed["error_kind"] == "empty_file"
        retried = inboxd("retry", str(failed["id"]), "--config", str(cfg), program=core)
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.startswith(f"requeued job {failed['id']}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.field
def test_a_core_install_names_the_extra_a_command_needs(
    core: Sequence[str], tmp_path: Path
) -> None:
    """One line with the extra to install, exit 78, nothing started: sandbox, demo, and a
    data-service config for check, push and run."""
    for command in (["sandbox", "--port", "0"], ["demo"]):
        result = inboxd(*command, program=core)
        assert result.returncode == 78, result.stderr
        line = _one_line(result)
        assert f"`inboxd {command[0]}` needs inboxd's optional 'sandbox' part" in line
        assert "requirements-sandbox.lock" in line and "--extras sandbox" in line

    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[api]\nkind = "data-service"\nurl = "http://127.0.0.1:9/data-service"\n'
        f'[inbox]\npath = "{tmp_path / "inbox"}"\n'
        f'[state]\npath = "{tmp_path / "state" / "state.db"}"\n'
        '[data_service]\nconsumer_key = "k"\nconsumer_secret = "cs"\ntoken = "t"\n'
        'token_secret = "ts"\n'
    )
    (tmp_path / "inbox").mkdir()
    write_file(tmp_path / "a.csv", 100)
    for command in (["check"], ["run"], ["push", str(tmp_path / "a.csv")]):
        result = inboxd(*command, "--config", str(cfg), program=core)
        assert result.returncode == 78, result.stdout + result.stderr
        line = _one_line(result)
        assert "needs inboxd's optional 'data-service' part" in line, line
        assert "(no authlib)" in line and "requirements-data-service.lock" in line
    assert not (tmp_path / "state").exists()  # `run` stopped before it made anything


@pytest.mark.field
def test_a_core_install_installs_its_files_from_the_package(
    core_venv: Path, core: Sequence[str], tmp_path: Path
) -> None:
    """install-files reads the wheel's package data (no checkout needed) and points the unit's
    ExecStart= at the installed inboxd."""
    where = subprocess.run(
        [str(core_venv / "bin" / "python"), "-c", "import daemon; print(daemon.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    package = Path(where.stdout.strip()).parent
    assert package.is_relative_to(core_venv) and (package / "share").is_dir()
    for name, source in SHIPPED.items():
        assert (package / "share" / name).read_bytes() == (REPO / source).read_bytes(), name

    done = inboxd("install-files", "--prefix", str(tmp_path / "root"), program=core)
    assert done.returncode == 0, done.stderr
    unit = (tmp_path / "root/etc/systemd/system/inboxd.service").read_text()
    assert f"\nExecStart={core_venv}/bin/inboxd run --config /etc/inboxd/config.toml" in unit


# ---- install-files --------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_install_files_puts_each_file_in_place_and_never_overwrites_a_config(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    dry = inboxd("install-files", "--prefix", str(root), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("dry run: nothing is written\n")
    assert not root.exists()

    first = inboxd("install-files", "--prefix", str(root))
    assert first.returncode == 0, first.stderr
    # ExecStart= names the inboxd of the venv that runs install-files, when it has one.
    unit_text = (REPO / "systemd/inboxd.service").read_text()
    mine = Path(sys.prefix) / "bin" / "inboxd"
    if mine.is_file():
        old_exec = "\nExecStart=/opt/inboxd/bin/inboxd run "
        assert unit_text.count(old_exec) == 1
        unit_text = unit_text.replace(old_exec, f"\nExecStart={mine} run ")
    bash = inboxd("completion", "bash").stdout.encode()
    zsh = inboxd("completion", "zsh").stdout.encode()
    assert _tree(root) == {
        "etc/inboxd/config.toml": (REPO / "config.example.toml").read_bytes(),
        "etc/systemd/system/inboxd.service": unit_text.encode(),
        "usr/lib/sysusers.d/inboxd.conf": (REPO / "systemd/inboxd.sysusers").read_bytes(),
        "usr/share/bash-completion/completions/inboxd": bash,
        "usr/local/share/zsh/site-functions/_inboxd": zsh,
        "usr/share/doc/inboxd/README.md": (REPO / "README.md").read_bytes(),
        "usr/share/doc/inboxd/config.example.toml": (REPO / "config.example.toml").read_bytes(),
        "usr/share/doc/inboxd/LICENSE": (REPO / "LICENSE").read_bytes(),
    }
    for path in root.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
    assert first.stdout.count("\nwrite ") + first.stdout.startswith("write ") == 8

    config = root / "etc/inboxd/config.toml"
    config.write_text("[api]\nurl = 'https://mine.example/api/v1'\n")
    unit = root / "etc/systemd/system/inboxd.service"
    unit.write_text("stale\n")
    again = inboxd("install-files", "--prefix", str(root))
    assert again.returncode == 0, again.stderr
    assert config.read_text() == "[api]\nurl = 'https://mine.example/api/v1'\n"
    assert f"kept       {config} (exists: never overwritten" in again.stdout
    assert f"replace    {unit}" in again.stdout
    assert unit.read_text() == unit_text
    assert f"unchanged  {root / 'usr/lib/sysusers.d/inboxd.conf'}" in again.stdout


def test_the_units_documentation_is_a_file_install_files_writes() -> None:
    unit = (REPO / "systemd/inboxd.service").read_text()
    (doc,) = re.findall(r"^Documentation=file:(\S+)$", unit, re.M)
    assert doc == f"{DOC_DIR}/README.md"
    assert doc in {f.target for f in files(lambda shell: "")}


def test_the_wheel_ships_every_file_install_files_reads() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    included = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert included == {source: f"daemon/share/{name}" for name, source in SHIPPED.items()}


def test_the_licence_matches_pyproject() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "MIT"}
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the inboxd authors\n")


# ---- the locks ------------------------------------------------------------------------------


def _pins(lock: Path) -> dict[str, set[str]]:
    """name -> the versions pinned (two when a marker splits them by Python version)."""
    pins: dict[str, set[str]] = {}
    for name, version in re.findall(
        r"^([a-z0-9._-]+)==(\S+?)(?: ;.*)? \\$", lock.read_text(), re.M
    ):
        pins.setdefault(name, set()).add(version)
    return pins


def test_the_locks_hold_what_each_install_needs_and_agree_with_the_tested_versions() -> None:
    pins = {use: _pins(lock) for use, lock in LOCKS.items()}
    assert not set(pins["core"]) & {"starlette", "uvicorn", "authlib", "cryptography", "click"}
    assert {"starlette", "uvicorn"} <= set(pins["sandbox"]) and "authlib" not in pins["sandbox"]
    assert "authlib" in pins["data-service"] and "starlette" not in pins["data-service"]
    for use in ("core", "sandbox", "data-service"):
        assert set(pins["core"]) <= set(pins[use])
        for name, versions in pins[use].items():  # the versions the tests ran, nothing else
            assert versions <= pins["dev"][name], (use, name, versions)
    core = LOCKS["core"].read_text()
    for backport in ("tomli", "exceptiongroup"):  # 3.10 only
        assert re.search(rf"^{backport}==\S+ ; python_full_version < '3.11' \\$", core, re.M)
    for lock in LOCKS.values():
        head = lock.read_text().splitlines()[:3]
        assert "made by `bash packaging/lock.sh`" in head[0], lock
        assert "--universal --python-version 3.10 --generate-hashes" in head[1], lock
        assert all(
            "--hash=sha256:" in block for block in lock.read_text().split(" \\\n    # via")[:-1]
        )


def _bundle_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bundle", REPO / "packaging" / "bundle.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundle_takes_the_pins_of_the_target_python_not_of_this_one() -> None:
    bundle = _bundle_module()
    lock = LOCKS["data-service"].read_text()
    for python, tomli, settings, joserfc in (
        ("3.10", True, "2.15.0", "1.7.7"),
        ("3.13", False, "2.16.3", "1.8.0"),
    ):
        chosen = bundle._applicable(lock, bundle._environment(python, "x86_64"))
        names = dict(re.findall(r"^(\S+)==(\S+) \\$", chosen, re.M))
        assert ("tomli" in names) is tomli and ("exceptiongroup" in names) is tomli
        assert names["pydantic-settings"] == settings and names["joserfc"] == joserfc
        assert "pywin32" not in names and "cffi" in names
        assert ";" not in chosen  # no marker left for pip to evaluate on the wrong Python
        blocks = chosen.split("\n")
        hashes = [line for line in blocks if line.strip().startswith("--hash=sha256:")]
        assert len(hashes) >= len(names)
    assert bundle._platforms("x86_64", "2.35")[-3:] == [
        "manylinux2014_x86_64",
        "linux_x86_64",
        "any",
    ]
    assert "manylinux_2_36_x86_64" not in bundle._platforms("x86_64", "2.35")


# ---- Python 3.10 -----------------------------------------------------------------------------


def test_the_compat_names_behave_as_on_python_3_11() -> None:
    assert issubclass(JobState, StrEnum) and isinstance(JobState.DONE, str)
    assert str(JobState.DONE) == "done" and f"{JobState.DONE}" == "done"
    assert f"{JobState.DONE:>6}" == "  done" and json.dumps(JobState.DONE) == '"done"'
    assert JobState("failed") is JobState.FAILED
    noon = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    assert fromisoformat("2026-11-20T12:00:00Z") == noon
    assert fromisoformat("2026-11-20T14:00:00+02:00") == noon
    assert fromisoformat("2026-11-20T12:00:00.5Z") == noon.replace(microsecond=500_000)
    assert fromisoformat("2026-11-20T14:00+0200") == noon
    assert fromisoformat("2026-11-20").tzinfo is None
    with pytest.raises(ValueError, match="isoformat"):
        fromisoformat("20 November")
    assert tomllib.loads("a = 1") == {"a": 1}


def test_sqlite_errors_are_named_on_every_python(tmp_path: Path) -> None:
    """The state database's error mapping needs the SQLite error's name (3.11 has an attribute,
    3.10 only the message)."""
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all\n" * 100)
    con = sqlite3.connect(garbage)
    try:
        with pytest.raises(sqlite3.DatabaseError) as caught:
            con.execute("SELECT * FROM sqlite_master").fetchall()
    finally:
        con.close()
    assert sqlite_errorname(caught.value) == "SQLITE_NOTADB"
    with pytest.raises(sqlite3.OperationalError) as missing:
        sqlite3.connect(f"file:{tmp_path / 'none' / 'x.db'}?mode=ro", uri=True)
    assert sqlite_errorname(missing.value) == "SQLITE_CANTOPEN"
    assert sqlite_errorname(sqlite3.OperationalError("no such table: jobs")) == ""
