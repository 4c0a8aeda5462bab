"""``inboxd demo``: the whole pipeline on this machine, no account needed.

Starts the built-in sandbox server, runs the daemon on a temporary inbox, drops three files
that take the three upload modes the sandbox picks by size (server, single, multipart),
waits for their imports and prints what ``inboxd status`` shows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import anyio

from daemon import logs
from daemon.commands import status
from daemon.config import load_settings
from daemon.sandbox import SandboxConfig, running_sandbox
from daemon.service.run import Service
from daemon.state import Queue

_FILES = {
    "session-1/temperatures.csv": 64 * 1024,
    "session-1/vibration.mf4": 3 * 1024 * 1024,
    "session-2/run 7 (long).parquet": 14 * 1024 * 1024,
}


def run_demo(*, keep: bool = False, timeout: float = 120.0) -> int:
    """Run the demo; returns the exit status (0 when every file was imported)."""
    root = Path(tempfile.mkdtemp(prefix="inboxd-demo-"))
    try:
        return _run(root, timeout)
    finally:
        if keep:
            print(f"demo files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, timeout: float) -> int:
    inbox = root / "inbox"
    inbox.mkdir()
    config = SandboxConfig(data_dir=root / "sandbox", import_seconds=1.0)
    with running_sandbox(config) as sb:
        cfg = root / "config.toml"
        cfg.write_text(
            f'[api]\nurl = "{sb.url}"\ntoken = "{config.token}"\n'
            f'[inbox]\npath = "{inbox}"\nsettle_seconds = 0.5\n'
            f'[state]\npath = "{root / "state.db"}"\n'
            '[upload]\nstream = "inbox"\nmetadata = { source = "inboxd demo" }\n'
            "[poll]\ninterval_seconds = 0.5\n"
            '[log]\nformat = "console"\n'
        )
        print(f"sandbox: {sb.url}   inbox: {inbox}   config: {cfg}\n")
        settings = load_settings(cfg)
        logs.configure("info", "console")
        return anyio.run(_drive, settings, inbox, timeout)


async def _drive(settings: object, inbox: Path, timeout: float) -> int:
    from daemon.config import Settings

    assert isinstance(settings, Settings)
    service = Service(settings, handle_signals=True, grace_seconds=5.0)
    result = 1
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)  # returns once the daemon is ready
        for rel, size in _FILES.items():
            path = inbox / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, size)
            print(f"dropped {rel} ({size:,} bytes)")
        deadline = time.monotonic() + timeout
        queue = service.queue
        assert queue is not None  # opened before the service is ready
        while time.monotonic() < deadline:
            counts = await queue.counts()
            if counts.get("done", 0) + counts.get("failed", 0) >= len(_FILES):
                break
            await anyio.sleep(0.3)
        snap = await status.snapshot(queue)
        print("\n" + status.render(snap) + "\n")
        counts = await queue.counts()
        result = 0 if counts.get("done", 0) == len(_FILES) else 1
        print("demo:", "every file imported exactly once" if result == 0 else "something failed")
        service.stop()
    return result


def _write(path: Path, size: int) -> None:
    # Write under a temporary name and rename, as a well-behaved logger does.
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        block = os.urandom(64 * 1024)
        left = size
        while left > 0:
            fh.write(block[: min(left, len(block))])
            left -= len(block)
    tmp.rename(path)


__all__ = ["Queue", "run_demo"]
