"""The daemon as a test runs it: a config on disk, an in-process service, a real ``inboxd``
child process (started, stopped gracefully or killed), ``inboxd`` commands, server readings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from daemon.config import Settings, load_settings
from daemon.sandbox import Sandbox
from daemon.service.run import Service
from daemon.state import Queue
from tests.support.data import TOKEN

REPO = Path(__file__).resolve().parents[2]


def daemon_sections(
    tmp: Path, url: str, *, attempts: int = 4, **api: Any
) -> dict[str, dict[str, Any]]:
    """The config of a test daemon on ``tmp/inbox`` against ``url``, as sections: fast
    settling, retries and polls; ``api`` adds ``[api]`` keys (a token, a token file)."""
    return {
        "api": {"url": url, "timeout": 5.0, **api},
        "inbox": {"path": tmp / "inbox", "settle_seconds": 0.2},
        "state": {"path": tmp / "state" / "state.db"},
        "upload": {"stream": 1, "workers": 2, "part_concurrency": 2},
        "retry": {
            "attempts": attempts,
            "base_seconds": 0.05,
            "cap_seconds": 0.3,
            "job_backoff_cap_seconds": 0.5,
        },
        "poll": {"interval_seconds": 0.2},
        "log": {"format": "json", "level": "debug"},
    }


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write ``sections`` as a TOML file at ``path``."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def toml_value(value: Any) -> str:
    """One value in TOML (the few types test configs use)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    return str(value)


def write_config(tmp: Path, sb: Sandbox, **sections: dict[str, Any]) -> Path:
    """A config file for a daemon on ``tmp/inbox`` against ``sb``; ``sections`` override keys."""
    base = daemon_sections(tmp, sb.url, token=TOKEN)
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    (tmp / "inbox").mkdir(exist_ok=True)
    return write_toml(tmp / "config.toml", base)


@asynccontextmanager
async def running_service(config: Path, **kw: Any) -> AsyncIterator[Service]:
    """Run the daemon in this process until the block ends (then a graceful stop)."""
    settings = load_settings(config)
    service = Service(settings, handle_signals=False, grace_seconds=kw.pop("grace", 2.0), **kw)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            await tg.start(service.run)
        try:
            yield service
        finally:
            service.stop()


async def counts(settings_or_config: Settings | Path) -> dict[str, int]:
    """Job counts per state, read with a separate read-only connection."""
    settings = (
        settings_or_config
        if isinstance(settings_or_config, Settings)
        else load_settings(settings_or_config)
    )
    if not settings.state.path.exists():
        return {}
    queue = await Queue.open(settings.state.path, readonly=True)
    try:
        return await queue.counts()
    finally:
        await queue.close()


#: How the tests start ``inboxd``: this checkout, with the test venv's Python.
THIS_INBOXD = (sys.executable, "-m", "daemon")


def start_daemon(
    config: Path, log: Path, *, program: Sequence[str] = THIS_INBOXD
) -> subprocess.Popen[bytes]:
    """``inboxd run`` as a real child process (for signals and SIGKILL); ``program`` is
    another ``inboxd`` to start (an installed one)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as fh:
        return subprocess.Popen(
            [*program, "run", "--config", str(config), "--grace", "3"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )


def catches_sigterm(pid: int) -> bool:
    """Has the process installed its own SIGTERM handler yet? (/proc SigCgt bitmask)"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM (a graceful stop) once the daemon handles it; its exit status."""
    # Not before the interpreter has run its first lines: until then SIGTERM's default action
    # applies to any Python program (test_sigterm_during_start_up covers what comes after).
    deadline = time.monotonic() + 10
    while proc.poll() is None and not catches_sigterm(proc.pid):
        if time.monotonic() > deadline:
            raise AssertionError("the daemon installed no SIGTERM handler within 10 s")
        time.sleep(0.005)
    return terminate(proc, timeout)


def kill_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL: the daemon gets no chance to clean up (a crash or a power cut)."""
    proc.kill()
    proc.wait(timeout=10)


def terminate(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM to any child (a sandbox, an emulator) and its exit status; SIGKILL and
    TimeoutExpired if it does not stop in ``timeout`` seconds. For ``inboxd run`` use
    :func:`stop_daemon`, which first waits for the daemon's SIGTERM handler."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise


def inboxd(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    program: Sequence[str] = THIS_INBOXD,
) -> subprocess.CompletedProcess[str]:
    """Run an ``inboxd`` command to completion, as a user would (``program``: see above)."""
    return subprocess.run(
        [*program, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


def server_datasets(sb: Sandbox) -> dict[str, list[int]]:
    """Dataset name → ids on the sandbox (to check "exactly once")."""
    out: dict[str, list[int]] = {}
    for ds in list(sb.datasets.values()):
        out.setdefault(ds.path, []).append(ds.id)
    return out
