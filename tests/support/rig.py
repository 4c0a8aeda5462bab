"""What the reliability suites share: scale, a file mix, byte accounting, checks, the summary.

Scale: ``INBOXD_SUITE=long`` selects the long (by hand) version of every suite; anything else
the short one that CI runs. ``INBOXD_SUITE_SEED`` changes the random seed (default fixed, so a
failure reproduces).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from daemon.config import load_settings
from daemon.sandbox import Sandbox
from daemon.state import Job, Queue, QueueError
from tests.support.data import KiB, MiB, write_file
from tests.support.runner import inboxd
from tests.support.waits import wait_for

LONG = os.environ.get("INBOXD_SUITE", "").strip().lower() == "long"
SEED = int(os.environ.get("INBOXD_SUITE_SEED", "20261122"))


def scale(ci: Any, long: Any) -> Any:
    """The CI value, or the long one under ``INBOXD_SUITE=long``."""
    return long if LONG else ci


# ------------------------------------------------------------------------------ the files


@dataclass
class Expected:
    """The files dropped into the inbox: name → (size, sha256)."""

    files: dict[str, tuple[int, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, files: dict[str, bytes]) -> Expected:
        return cls({n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()})

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.files.values())

    def __len__(self) -> int:
        return len(self.files)


def mixed_size(rng: random.Random) -> int:
    """A size for the ``sandbox_config`` thresholds: ~35 % server (≤ 64 KiB), ~35 % single
    (≤ 512 KiB), ~30 % multipart (256 KiB parts, up to 2.5 MiB = 10 parts)."""
    roll = rng.random()
    if roll < 0.35:
        return rng.randint(1, 64 * KiB)
    if roll < 0.70:
        return rng.randint(64 * KiB + 1, 512 * KiB)
    return rng.randint(512 * KiB + 1, 2 * MiB + 512 * KiB)


def drop(inbox: Path, expected: Expected, rng: random.Random, n: int, prefix: str) -> None:
    """Write ``n`` files of mixed sizes (written in place: the watcher must settle them)."""
    for _ in range(n):
        i = len(expected.files)
        name = f"{prefix}/f{i:05d}.bin"
        data = write_file(inbox / name, mixed_size(rng), seed=SEED * 1000 + i)
        expected.files[name] = (len(data), hashlib.sha256(data).hexdigest())


# ------------------------------------------------------------------------ byte accounting


class UploadBytes:
    """Counts the body bytes the sandbox actually read on upload requests.

    Wraps the sandbox's inner ASGI app (behind its request log and fault gate): storage PUTs
    and ``upload/server`` POSTs. A request cut off by a kill or a reset counts what arrived.
    ``payload`` excludes the multipart/form-data framing of ``upload/server`` bodies.
    """

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.inner = sb._app
        self.received = 0
        self.payload = 0
        self.committed = 0  # payload bytes of requests answered 2xx (stored)
        self.requests = 0
        self.in_flight = 0

    @classmethod
    def install(cls, sb: Sandbox) -> UploadBytes:
        counter = cls(sb)
        sb._app = counter  # type: ignore[assignment]
        return counter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path: str = scope.get("path", "")
        if scope.get("type") != "http" or not (
            path.startswith("/storage/") or path.endswith("/upload/server")
        ):
            await self.inner(scope, receive, send)
            return
        got = 0
        status = 0

        async def counting_receive() -> Any:
            nonlocal got
            message = await receive()
            if message.get("type") == "http.request":
                got += len(message.get("body", b""))
            return message

        async def recording_send(message: Any) -> None:
            nonlocal status
            if message.get("type") == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.in_flight += 1
        self.requests += 1
        try:
            await self.inner(scope, counting_receive, recording_send)
        finally:
            self.in_flight -= 1
            payload = got - self._framing(path, scope)
            payload = max(0, payload)
            self.received += got
            self.payload += payload
            if 200 <= status < 300:
                self.committed += payload

    def _framing(self, path: str, scope: Any) -> int:
        if not path.endswith("/upload/server"):
            return 0
        length = 0
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length" and v.isdigit():
                length = int(v)
        try:
            ingestion = self.sb.ingestions[int(path.split("/")[-3])]
        except (KeyError, ValueError, IndexError):
            return 0
        return max(0, length - ingestion.file_size)


# ---------------------------------------------------------------------------- the daemon


def jobs(config: Path) -> list[Job]:
    """Every job of the daemon's queue, read with a separate read-only connection."""

    async def read() -> list[Job]:
        db = load_settings(config).state.path
        if not db.exists():
            return []
        try:
            queue = await Queue.open(db, readonly=True)
        except QueueError as exc:
            if "schema v0" in str(exc):
                # The daemon's very first start is creating the database right now (it is
                # briefly at schema v0): nothing to read yet.
                return []
            raise
        try:
            return await queue.list_jobs(None, limit=1_000_000)
        finally:
            await queue.close()

    return anyio.run(read)


def job_states(config: Path) -> Counter[str]:
    return Counter(str(j.state) for j in jobs(config))


def all_done(config: Path, n: int) -> Callable[[], bool]:
    def check() -> bool:
        states = job_states(config)
        return states.get("done", 0) >= n

    return check


def wait_all_done(
    config: Path, n: int, timeout: float, *, when: str = "", step: float = 0.25
) -> float:
    """Wait until ``n`` jobs are done and return the seconds it took; on timeout the message
    lists the unfinished ones."""
    started = time.monotonic()
    wait_for(
        all_done(config, n),
        timeout,
        lambda: f"all {n} files done{when}:\n{describe_unfinished(config)}",
        step=step,
    )
    return time.monotonic() - started


def describe_unfinished(config: Path) -> str:
    """The jobs that are not done, with their errors (for assertion messages)."""
    lines = [
        f"  {j.identity.rel}: {j.state} stage={j.stage} attempts={j.attempts} "
        f"kind={j.error_kind} error={j.last_error}"
        for j in jobs(config)
        if str(j.state) != "done"
    ]
    return "\n".join(lines[:40]) or "  (none)"


def log_records(
    log: Path, names: tuple[str, ...], t0: float = 0.0, t1: float = float("inf")
) -> list[dict[str, Any]]:
    """The daemon's JSON log events with these names in [t0, t1), each with ``ts`` (unix)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
            stamp = str(ev["timestamp"]).replace("Z", "+00:00")
            ev["ts"] = datetime.fromisoformat(stamp).timestamp()
        except (ValueError, KeyError):
            continue
        if ev.get("event") in names and t0 <= ev["ts"] < t1:
            out.append(ev)
    return out


def log_events(
    log: Path, names: tuple[str, ...], t0: float = 0.0, t1: float = float("inf")
) -> dict[str, int]:
    """How many of the daemon's JSON log events with these names fall in [t0, t1)."""
    out = dict.fromkeys(names, 0)
    for ev in log_records(log, names, t0, t1):
        out[ev["event"]] += 1
    return out


def status_json(config: Path) -> dict[str, Any]:
    out = inboxd("status", "--config", str(config), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ checking


@dataclass
class Delivery:
    """What the sandbox holds compared with what was dropped."""

    lost: list[str]
    duplicates: list[str]
    corrupt: list[str]
    open_ingestions: list[int]
    ingestion_states: dict[str, int]

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.corrupt or self.open_ingestions)

    def describe(self) -> str:
        return (
            f"lost={self.lost[:10]} duplicates={self.duplicates[:10]} "
            f"corrupt={self.corrupt[:10]} open_ingestions={self.open_ingestions[:10]} "
            f"ingestions={self.ingestion_states}"
        )


def check_delivery(sb: Sandbox, expected: Expected) -> Delivery:
    """Every file exactly once, byte for byte (sha256); no ingestion left UPLOADING.

    A dataset that is not one of the dropped files (``f1.bin (2)``, say: a second dataset for
    a file whose first answer was lost) counts as a duplicate, as does a second dataset of a
    dropped name (in another stream).
    """
    by_name: dict[str, list[int]] = {}
    for ds in list(sb.datasets.values()):
        by_name.setdefault(ds.path, []).append(ds.id)
    lost, duplicates, corrupt = [], [], []
    for name, (size, digest) in expected.files.items():
        ids = by_name.get(name, [])
        if not ids:
            lost.append(name)
            continue
        if len(ids) > 1:
            duplicates.append(name)
        try:
            data = sb.dataset_bytes(ids[0])
        except LookupError:
            lost.append(name)
            continue
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            corrupt.append(name)
    duplicates += [name for name in by_name if name not in expected.files]
    states = Counter(i.state for i in list(sb.ingestions.values()))
    open_ = [i.id for i in list(sb.ingestions.values()) if i.state == "UPLOADING"]
    return Delivery(lost, duplicates, corrupt, open_, dict(states))


def summary(suite: str, **fields: Any) -> dict[str, Any]:
    """Print the one-line ``SUITE {...}`` summary (run pytest with -s to see it)."""
    line = {"suite": suite, "scale": "long" if LONG else "ci", "seed": SEED, **fields}
    print("\nSUITE " + json.dumps(line, sort_keys=False), flush=True)
    return line
