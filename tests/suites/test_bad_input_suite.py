"""Bad input suite: one daemon run over an inbox that holds a whole corpus of awkward files.

Each bad item must end with a clear reason recorded (on its job, shown by ``inboxd status
--json``; for things that never become a job — symlinks, FIFOs — a ``watcher.skip`` log line),
the daemon keeps running, and every good file beside them lands exactly once, byte for byte.

The corpus (all at once, plus good files): an empty file; files that vanish, change in place
or get truncated while a slow multipart upload of them runs (``storage_delay_per_mib``); a file
that keeps growing for a while; an unreadable file (``chmod 000``: the daemon runs as
``nobody`` through ``setpriv`` when the suite runs as root); symlinks pointing inside, outside
and in a loop; a FIFO; a non-UTF-8 name; 255-byte names; a 60-level deep tree; a route to a
stream that does not exist; and, mid-run, a revoked token (uploads pause, then resume).

Separate cases: a burst of tiny files at start-up (5,000; 50,000 with ``INBOXD_SUITE=long``),
``follow_symlinks = true``, a route naming an unknown stream, and a table of bad config values
for ``inboxd check`` (exit 78, one line per problem naming the key).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from daemon.commands.cli import main as cli_main
from daemon.compat import BaseExceptionGroup
from daemon.sandbox import Sandbox
from daemon.state import Job, JobState, Queue
from tests.support.data import TOKEN, write_file
from tests.support.runner import (
    REPO,
    counts,
    running_service,
    server_datasets,
    start_daemon,
    stop_daemon,
    write_config,
)
from tests.support.waits import wait_for, wait_until

KiB = 1024
MiB = 1024 * KiB
LONG = os.environ.get("INBOXD_SUITE") == "long"
SEED = 20261122
NOBODY = 65534

_STATS: dict[str, Any] = {
    "cases": 0,
    "files": 0,
    "lost": 0,
    "duplicates": 0,
    "bad_items": 0,
    "reasons_checked": 0,
    "config_cases": 0,
    "not_tested": [],
}


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    line = {"suite": "bad_input", **_STATS, "long": LONG}
    line["seconds"] = round(time.monotonic() - started, 1)
    text = "SUITE " + json.dumps(line)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(text, flush=True)
    else:  # pragma: no cover
        print(text, flush=True)


@pytest.fixture(autouse=True)
def _count_case() -> None:
    _STATS["cases"] += 1


# ------------------------------------------------------------------------ running the daemon

# `inboxd run`, with the paused-token probe at 1 s instead of 30 s (not configurable; the
# suite would otherwise spend half a minute waiting for the resume).
_WRAPPER = """
import sys
from daemon.service.signals import catch_early_signals
catch_early_signals()
import daemon.service.run
daemon.service.run.Service.__init__.__kwdefaults__["probe_seconds"] = 1.0
from daemon.commands.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class DaemonUser:
    """How the daemon is run: the command prefix, and whether unreadable files can be tested."""

    prefix: list[str]
    uid: int | None
    unreadable_testable: bool
    why_not: str = ""


def _daemon_user() -> DaemonUser:
    if os.geteuid() != 0:
        return DaemonUser([], None, True)
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", "import daemon"], cwd=REPO, check=False
        )
        if probe.returncode == 0:
            return DaemonUser(prefix, NOBODY, True)
    return DaemonUser(
        [],
        None,
        False,
        "running as root without a working `setpriv` to drop to nobody: root reads a "
        "chmod 000 file anyway, so the unreadable-file case cannot be tested",
    )


def _popen_daemon(user: DaemonUser, config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    with log.open("ab") as fh:
        args = ["-c", _WRAPPER, "run", "--config", str(config), "--grace", "3"]
        return subprocess.Popen(
            [*user.prefix, sys.executable, *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )


def _status(user: DaemonUser, config: Path) -> dict[str, Any]:
    args = ["-m", "daemon", "status", "--config", str(config), "--json", "--limit", "1000"]
    out = subprocess.run(
        [*user.prefix, sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _jobs(db: Path) -> list[Job]:
    """Every job, superseded ones included (status --json does not list those)."""

    async def read() -> list[Job]:
        async with await Queue.open(db, readonly=True) as q:
            return await q.list_jobs(None, limit=1_000_000)

    try:
        return anyio.run(read)
    except Exception:  # the database is still being created
        return []


def _log_events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


# ------------------------------------------------------------------------------ the corpus


@dataclass
class Corpus:
    """What is in the inbox and what each item must end as."""

    good: dict[str, bytes] = field(default_factory=dict)  # dataset name → bytes
    #: rel → (final state of its last job, error_kind, regex on the error)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: rel → regex on the watcher.skip reason (never a job, never a dataset)
    skipped: dict[str, str] = field(default_factory=dict)
    #: rel → what is done to it while its upload runs
    victims: dict[str, Callable[[Path], bytes | None]] = field(default_factory=dict)


def _build_corpus(inbox: Path, outside: Path, unreadable: bool) -> Corpus:
    c = Corpus()
    rng = random.Random(SEED)
    sizes = [10, 3 * KiB, 60 * KiB, 100 * KiB, 400 * KiB, 700 * KiB, 900 * KiB]
    for i, size in enumerate(sizes):
        name = f"good/run{i:02d} ü.bin"
        c.good[name] = write_file(inbox / name, size, i)
    for i in range(6):
        name = f"good/small/{i:02d}.csv"
        c.good[name] = write_file(inbox / name, rng.randint(1, 4 * KiB), 50 + i)

    # Odd names and shapes that must simply work.
    raw = os.fsencode(inbox) + b"/caf\xe9 latin-1.csv"
    with open(raw, "wb") as fh:
        fh.write(b"a;b\n1;2\n")
    c.good["caf%E9 latin-1.csv"] = b"a;b\n1;2\n"
    ascii255 = "A" * 251 + ".csv"
    c.good[ascii255] = write_file(inbox / ascii255, 777, 3)
    utf255 = "é" * 125 + "x.csv"  # 250 + 5 bytes
    assert len(os.fsencode(utf255)) == 255
    c.good[utf255] = write_file(inbox / utf255, 888, 4)
    deep = "/".join(f"d{i:02d}" for i in range(60)) + "/deep.csv"
    c.good[deep] = write_file(inbox / deep, 1234, 5)

    # Bad items that become jobs with a reason.
    (inbox / "empty.csv").write_bytes(b"")
    c.failed["empty.csv"] = (
        "empty_file",
        r"^empty\.csv: the file is empty \(0 bytes\) — Marple DB refuses empty files",
    )
    if unreadable:
        write_file(inbox / "unreadable.csv", 2000, 6)
        os.chmod(inbox / "unreadable.csv", 0)
        c.failed["unreadable.csv"] = (
            "file",
            r"unreadable\.csv: permission denied — make the file readable",
        )
    write_file(inbox / "unknown-stream" / "x.csv", 500, 7)
    c.failed["unknown-stream/x.csv"] = (
        "not_found",
        r"stream 999 does not exist or this token cannot see it — fix the stream in "
        r"\[upload\] or \[\[routes\]\], then `inboxd retry --all-failed`",
    )

    # Things that never become jobs.
    (inbox / "link-inside.csv").symlink_to(inbox / "good" / "small" / "00.csv")
    write_file(outside / "secret.csv", 100, 8)
    (inbox / "link-outside.csv").symlink_to(outside / "secret.csv")
    (inbox / "loop-a").symlink_to(inbox / "loop-b")
    (inbox / "loop-b").symlink_to(inbox / "loop-a")
    os.mkfifo(inbox / "pipe.csv")
    for name in ("link-inside.csv", "link-outside.csv", "loop-a", "loop-b"):
        c.skipped[name] = r"^symlink \(follow_symlinks is off\)$"
    c.skipped["pipe.csv"] = r"^is a FIFO, not a regular file$"

    # Victims: 1 MiB multipart files, changed while a slowed upload of them runs.
    for i, name in enumerate(("mid/vanish.bin", "mid/change.bin", "mid/truncate.bin")):
        write_file(inbox / name, 1024 * KiB, 20 + i)

    def vanish(path: Path) -> None:
        path.unlink()

    def change(path: Path) -> bytes:
        data = bytearray(path.read_bytes())
        data[:4096] = b"\xff" * 4096  # same size, same inode, new bytes and mtime
        with path.open("r+b") as fh:
            fh.write(data[:4096])
        return bytes(data)

    def truncate(path: Path) -> bytes:
        os.truncate(path, 300 * KiB)
        return path.read_bytes()

    c.victims = {"mid/vanish.bin": vanish, "mid/change.bin": change, "mid/truncate.bin": truncate}
    c.failed["mid/vanish.bin"] = (
        "file_vanished",
        r"^file vanished before its upload finished: vanish\.bin: the file vanished",
    )
    return c


def _in_flight(sb: Sandbox, name: str) -> bool:
    """Is a multipart upload of dataset ``name`` running, with a part already on its way?"""
    for ing in list(sb.ingestions.values()):
        ds = sb.datasets.get(ing.dataset_id)
        if ds is None or ds.path != name or ing.state != "UPLOADING":
            continue
        prefix = f"/storage/{ing.id}/"
        if any(r.path.startswith(prefix) for r in list(sb.requests)):
            return True
    return False


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A folder the unprivileged daemon can reach (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="inboxd-badinput-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_bad_input_corpus(sandbox: Sandbox, workdir: Path) -> None:
    user = _daemon_user()
    if not user.unreadable_testable:
        _STATS["not_tested"].append(f"unreadable file: {user.why_not}")
    inbox, state, outside = workdir / "inbox", workdir / "state", workdir / "outside"
    for d in (inbox, state, outside):
        d.mkdir()
    if user.uid is not None:
        os.chown(state, user.uid, user.uid)
    state.chmod(0o700)
    sandbox.faults.storage_delay_per_mib = 2.0  # 0.5 s per 256 KiB part
    config = write_config(
        workdir,
        sandbox,
        inbox={"settle_seconds": 0.5},
        upload={"workers": 3, "part_concurrency": 1},
        log={"level": "info"},
    )
    with config.open("a") as fh:
        fh.write('[[routes]]\nglob = "unknown-stream/*"\nstream = 999\n')
    config.chmod(0o644)
    corpus = _build_corpus(inbox, outside, user.unreadable_testable)

    # A file that keeps growing for 2.5 s, a little every 0.1 s (under settle_seconds).
    grow = inbox / "grow" / "growing.csv"
    grow.parent.mkdir()
    stop_growing = threading.Event()

    def writer() -> None:
        with grow.open("ab") as fh:
            for i in range(25):
                if stop_growing.is_set():
                    return
                fh.write(f"{i},{'x' * 200}\n".encode())
                fh.flush()
                time.sleep(0.1)

    grower = threading.Thread(target=writer, daemon=True)
    grower.start()

    db = state / "state.db"
    log = workdir / "daemon.log"
    proc = _popen_daemon(user, config, log)
    revoked: dict[str, Any] = {}
    try:
        # --- mid-upload victims
        acted: dict[str, bytes | None] = {}
        deadline = time.monotonic() + 60
        while len(acted) < len(corpus.victims) and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            for rel, action in corpus.victims.items():
                if rel not in acted and _in_flight(sandbox, rel):
                    acted[rel] = action(inbox / rel)
            time.sleep(0.02)
        assert len(acted) == len(corpus.victims), (
            f"never saw in flight: {set(corpus.victims) - set(acted)}"
        )
        sandbox.faults.storage_delay_per_mib = 0.0
        grower.join(10)
        corpus.good["grow/growing.csv"] = grow.read_bytes()
        corpus.good["mid/change.bin"] = acted["mid/change.bin"] or b""
        corpus.good["mid/truncate.bin"] = acted["mid/truncate.bin"] or b""

        def quiet() -> bool:
            jobs = _jobs(db)
            done = {j.remote_name for j in jobs if j.state == JobState.DONE}
            busy = [j for j in jobs if j.state in (JobState.QUEUED, JobState.UPLOADING)]
            busy += [j for j in jobs if j.state == JobState.IMPORTING]
            return not busy and set(corpus.good) <= done

        wait_for(quiet, 90, "the corpus to be processed")
        assert proc.poll() is None, "the daemon stopped"
        failed_before = _status(user, config)["counts"]["failed"]

        # --- a revoked token mid-run: pause, no failures, resume once it is valid again
        sandbox.config.token = "rotated-token"
        late = {
            f"after-revoke/r{i}.csv": write_file(inbox / f"after-revoke/r{i}.csv", 300 + i, 90 + i)
            for i in range(3)
        }

        def paused() -> Any:
            return _status(user, config)["daemon"]["paused"]

        wait_for(paused, 30, "uploads to pause on the refused token")
        doc = _status(user, config)
        revoked = {"paused": doc["daemon"]["paused"], "failed": doc["counts"]["failed"]}
        time.sleep(1.5)  # a few worker and probe rounds while paused
        doc = _status(user, config)
        assert doc["counts"]["failed"] == failed_before, doc["counts"]
        late_jobs = [j for j in doc["jobs"] if j["path"].startswith("after-revoke/")]
        assert all(j["state"] in ("queued", "settling") for j in late_jobs), late_jobs
        sandbox.config.token = TOKEN
        corpus.good.update(late)
        wait_for(lambda: not paused(), 20, "uploads to resume")
        wait_for(quiet, 30, "the late files after the resume")

        # --- what status says, while the daemon still runs
        final = _status(user, config)
        assert proc.poll() is None
        assert final["daemon"]["alive"] is True
        jobs = _jobs(db)
    finally:
        stop_growing.set()
        code = stop_daemon(proc)
        sandbox.config.token = TOKEN
    assert code == 0, log.read_text()[-3000:]

    # Revoked token: paused with a reason naming the token problem, nothing failed.
    assert re.search(r"HTTP 403.*token", revoked["paused"]), revoked
    _STATS.setdefault("reasons", {})["(revoked token)"] = "paused: " + revoked["paused"][:100]
    assert TOKEN not in json.dumps(final)

    # Every bad job: its recorded reason, in the queue and in `status --json`.
    by_rel: dict[str, list[Job]] = {}
    for job in sorted(jobs, key=lambda j: j.id):
        by_rel.setdefault(job.identity.rel, []).append(job)
    shown = {j["path"]: j for j in final["jobs"]}
    for rel, (kind, pattern) in corpus.failed.items():
        last = by_rel[rel][-1]
        assert last.state == JobState.FAILED, (rel, last.state, last.last_error)
        assert last.error_kind == kind, (rel, last.error_kind, last.last_error)
        assert re.search(pattern, last.last_error or ""), (rel, last.last_error)
        assert shown[rel]["state"] == "failed" and shown[rel]["error"] == last.last_error
        _STATS["reasons_checked"] += 1
        _STATS.setdefault("reasons", {})[rel] = (last.last_error or "")[:110]
    for rel in ("mid/change.bin", "mid/truncate.bin"):
        states = [j.state for j in by_rel[rel]]
        assert states[-1] == JobState.DONE and JobState.SUPERSEDED in states, (rel, states)
        reasons = [j.last_error or "" for j in by_rel[rel] if j.state == JobState.SUPERSEDED]
        assert any(re.search(r"^file changed: ", r) for r in reasons), reasons
        _STATS["reasons_checked"] += 1
        _STATS.setdefault("reasons", {})[rel] = reasons[0][:110]
    truncated = [j.last_error or "" for j in by_rel["mid/truncate.bin"]]
    assert any(re.search(r"truncated|now 307200 bytes", e) for e in truncated), truncated

    # Skipped items: a watcher.skip line with the reason; no job, no dataset.
    events = _log_events(log)
    skips = {e.get("path"): e.get("reason", "") for e in events if e.get("event") == "watcher.skip"}
    for rel, pattern in corpus.skipped.items():
        assert rel in skips, f"no watcher.skip for {rel}"
        assert re.search(pattern, skips[rel]), (rel, skips[rel])
        assert rel not in by_rel
        _STATS["reasons_checked"] += 1
        _STATS.setdefault("reasons", {})[rel] = "log: " + skips[rel][:100]
    assert not any("Traceback" in line for line in log.read_text(errors="replace").splitlines())

    # Good files: exactly once, identical bytes, import finished; nothing else delivered.
    names = server_datasets(sandbox)
    lost = [n for n in corpus.good if n not in names]
    dups = {n: ids for n, ids in names.items() if n in corpus.good and len(ids) > 1}
    for name, data in corpus.good.items():
        if name in names and name not in dups:
            assert sandbox.dataset_bytes(names[name][0]) == data, name
            assert sandbox.datasets[names[name][0]].import_status == "FINISHED", name
    allowed_other = {"unreadable.csv", "mid/vanish.bin"}  # created, then aborted with a reason
    strays = set(names) - set(corpus.good) - allowed_other
    for name in set(names) & allowed_other:
        assert all(sandbox.datasets[i].import_status == "FAILED" for i in names[name]), name
    for ing in sandbox.ingestions.values():
        assert ing.state != "UPLOADING", ing
    grow_ingestions = [
        i
        for i in sandbox.ingestions.values()
        if sandbox.datasets[i.dataset_id].path == "grow/growing.csv"
    ]
    assert len(grow_ingestions) == 1, "the growing file was uploaded before it stopped growing"
    _STATS["files"] += len(corpus.good)
    _STATS["lost"] += len(lost)
    _STATS["duplicates"] += sum(len(ids) - 1 for ids in dups.values()) + len(strays)
    _STATS["bad_items"] += len(corpus.failed) + len(corpus.skipped) + 2
    _STATS["corpus_daemon_user"] = "nobody" if user.uid is not None else "self"
    assert (lost, dups, strays) == ([], {}, set())


# ------------------------------------------------------------------------- start-up burst


@pytest.mark.timeout(3600 if LONG else 300)
def test_burst_of_tiny_files_at_start_up(sandbox: Sandbox, tmp_path: Path) -> None:
    """Thousands of tiny files already in the inbox when the daemon starts: all taken, all
    delivered once, with four workers."""
    n = 50_000 if LONG else 5_000
    sandbox.config.import_seconds = 0.05
    config = write_config(
        tmp_path,
        sandbox,
        upload={"workers": 4},
        log={"level": "warning"},
        poll={"interval_seconds": 0.5, "batch_size": 500},
    )
    inbox = tmp_path / "inbox"
    files: dict[str, bytes] = {}
    for i in range(n):
        name = f"burst/{i // 1000:03d}/{i:06d}.csv"
        path = inbox / name
        if i % 1000 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        data = f"{i}\n".encode()
        path.write_bytes(data)
        files[name] = data
    db = tmp_path / "state" / "state.db"

    def done() -> int:
        if not db.exists():
            return 0
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                row = con.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()
            finally:
                con.close()
        except sqlite3.Error:
            return 0
        return int(row[0])

    started = time.monotonic()
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(lambda: done() == n, 2400 if LONG else 240, f"{n} files done", step=0.5)
        seconds = time.monotonic() - started
    finally:
        assert stop_daemon(proc) == 0
    names = server_datasets(sandbox)
    lost = [name for name in files if name not in names]
    dups = [name for name, ids in names.items() if len(ids) > 1]
    strays = set(names) - set(files)
    for name, data in files.items():
        if name in names:
            assert sandbox.dataset_bytes(names[name][0]) == data
    _STATS["files"] += n
    _STATS["lost"] += len(lost)
    _STATS["duplicates"] += len(dups) + len(strays)
    _STATS["burst"] = {"files": n, "seconds": round(seconds, 1), "files_per_s": round(n / seconds)}
    assert (lost[:5], dups[:5], strays) == ([], [], set())


# ------------------------------------------------------------------------ symlinks followed


async def test_follow_symlinks_refuses_outside_loops_dangling_and_folders(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path, sandbox, inbox={"follow_symlinks": True})
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    outside.mkdir()
    write_file(outside / "o.csv", 10)
    data = write_file(inbox / "real.csv", 100)
    (inbox / "sub").mkdir()
    links = {
        "outside.csv": (outside / "o.csv", r"^symlink points outside the inbox \(to .*o\.csv\)$"),
        "loop-a.csv": (inbox / "loop-b.csv", r"^symlink loop \(points to .*loop-b\.csv\)$"),
        "loop-b.csv": (inbox / "loop-a.csv", r"^symlink loop \(points to .*loop-a\.csv\)$"),
        "dangling.csv": (inbox / "gone.csv", r"^dangling symlink: points to .*gone\.csv"),
        "folder.csv": (inbox / "sub", r"^symlink points to a folder \(.*sub\); only files"),
    }
    for name, (target, _) in links.items():
        (inbox / name).symlink_to(target)
    with structlog.testing.capture_logs() as logs:
        async with running_service(config):
            await wait_until(lambda: "real.csv" in server_datasets(sandbox), timeout=20)
            await anyio.sleep(0.5)
    skips = {
        e["path"]: e["reason"] for e in logs if e.get("event") == "watcher.skip" and "path" in e
    }
    for name, (_, pattern) in links.items():
        assert re.search(pattern, skips.get(name, "")), (name, skips.get(name))
        assert name not in server_datasets(sandbox)
        _STATS["reasons_checked"] += 1
    assert sandbox.dataset_bytes(server_datasets(sandbox)["real.csv"][0]) == data


async def test_follow_symlinks_uploads_a_link_to_a_file_inside(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Was a bug (the upload refused the link as 'not a regular file'); fixed upstream by
    workers.py resolving the link inside the inbox. Kept as a regression test."""
    config = write_config(tmp_path, sandbox, inbox={"follow_symlinks": True})
    inbox = tmp_path / "inbox"
    data = write_file(inbox / "data" / "real.csv", 100)
    (inbox / "link.csv").symlink_to(inbox / "data" / "real.csv")
    async with running_service(config) as svc:
        await wait_until(lambda: "data/real.csv" in server_datasets(sandbox), timeout=20)

        async def settled() -> bool:
            c = await counts(config)
            return c.get("done", 0) + c.get("failed", 0) >= 2

        await wait_until(settled, timeout=20)
        assert svc.queue is not None
        (job,) = await svc.queue.find_by_rel("link.csv")
    assert job.state == JobState.DONE, job.last_error
    names = server_datasets(sandbox)
    assert sandbox.dataset_bytes(names["link.csv"][0]) == data


# -------------------------------------------------------------------- unknown stream by name


async def test_unknown_stream_name_in_a_route_fails_that_file_only(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Was a bug: intake retried the lookup forever, so nothing after that file was taken."""
    config = write_config(tmp_path, sandbox)
    base = config.read_text()
    config.write_text(base + '[[routes]]\nglob = "named/*"\nstream = "No Such Stream"\n')
    inbox = tmp_path / "inbox"
    named = write_file(inbox / "named" / "a.csv", 100)
    other = write_file(inbox / "other" / "b.csv", 100, 2)
    try:
        async with running_service(config) as svc:
            later = write_file(inbox / "later.csv", 100, 3)
            wanted = {"other/b.csv", "later.csv"}
            await wait_until(lambda: wanted <= set(server_datasets(sandbox)), timeout=5)
            assert svc.queue is not None
            queue = svc.queue

            async def failed() -> Job | None:
                (job,) = await queue.find_by_rel("named/a.csv")
                return job if job.state == JobState.FAILED else None

            job = await wait_until(failed, timeout=5)
    except BaseExceptionGroup as group:  # running_service's task group wraps what we raised
        raise group.exceptions[0] from None
    assert job.error_kind == "not_found"
    assert re.fullmatch(
        r"GET /streams: stream 'No Such Stream' not found on the server — fix the \[\[routes\]\] "
        r"entry with glob 'named/\*' in the config \(`inboxd check` lists the streams this "
        r"token can see\) or create the stream, then `inboxd retry --all-failed`",
        job.last_error or "",
    ), job.last_error
    _STATS["reasons_checked"] += 1
    names = server_datasets(sandbox)
    assert "named/a.csv" not in names
    assert sandbox.dataset_bytes(names["other/b.csv"][0]) == other
    assert sandbox.dataset_bytes(names["later.csv"][0]) == later

    # What the reason says to do works: fix the route, `inboxd retry`, and the file goes to the
    # stream the route names now (looked up when it is uploaded, not when it was queued).
    config.write_text(base + '[[routes]]\nglob = "named/*"\nstream = "vehicle logs"\n')
    retry = ["retry", "--all-failed", "--config", str(config)]
    code, out, err = await anyio.to_thread.run_sync(lambda: _check(retry))
    assert (code, out) == (0, "requeued 1 job(s)\n"), err
    async with running_service(config):
        await wait_until(lambda: "named/a.csv" in server_datasets(sandbox), timeout=10)
    (dataset_id,) = server_datasets(sandbox)["named/a.csv"]
    assert sandbox.datasets[dataset_id].stream_id == 2  # "Vehicle Logs", matched ignoring case
    assert sandbox.dataset_bytes(dataset_id) == named


async def test_stream_lookup_outage_queues_files_and_fails_none(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """GET /streams answers 503: files routed by stream name are queued, not failed, and not
    held back at intake; they upload to the right stream once the server answers again."""
    config = write_config(tmp_path, sandbox)
    with config.open("a") as fh:
        fh.write('[[routes]]\nglob = "named/*"\nstream = "Vehicle Logs"\n')
    inbox = tmp_path / "inbox"
    sandbox.faults.fail_next["GET /streams"] = [503] * 100_000
    data = {
        "named/a.csv": write_file(inbox / "named" / "a.csv", 100),
        "named/b.csv": write_file(inbox / "named" / "b.csv", 100, 2),
        "plain.csv": write_file(inbox / "plain.csv", 100, 3),
    }
    async with running_service(config) as svc:
        assert svc.queue is not None
        queue = svc.queue

        async def all_tried() -> bool:
            jobs = [j for rel in data for j in await queue.find_by_rel(rel)]
            return len(jobs) == len(data) and all(j.attempts >= 1 for j in jobs)

        await wait_until(all_tried, timeout=10)
        jobs = [j for rel in data for j in await queue.find_by_rel(rel)]
        assert {j.state for j in jobs} <= {JobState.QUEUED, JobState.UPLOADING}, jobs
        assert all("503" in (j.last_error or "") for j in jobs), [j.last_error for j in jobs]
        sandbox.faults.fail_next.clear()
        await wait_until(lambda: set(data) <= set(server_datasets(sandbox)), timeout=15)
    names = server_datasets(sandbox)
    for rel, content in data.items():
        (dataset_id,) = names[rel]
        assert sandbox.dataset_bytes(dataset_id) == content
        assert sandbox.datasets[dataset_id].stream_id == (1 if rel == "plain.csv" else 2), rel


# ----------------------------------------------------------------------- bad config values

_TOKEN_VALUE = "s3cr3t-config-token"
#: (id, TOML, key the problem line starts with, regex on that line, marks)
BAD_CONFIG: list[tuple[str, str, str, str, Any]] = [
    (
        "url-scheme",
        '[api]\nurl = "ftp://nowhere"',
        "api.url",
        r"must start with http:// or https://",
        (),
    ),
    ("url-type", "[api]\nurl = 42", "api.url", r"= 42: Input should be a valid string", ()),
    ("timeout-negative", "[api]\ntimeout = -1", "api.timeout", r"greater than 0", ()),
    ("timeout-word", '[api]\ntimeout = "fast"', "api.timeout", r"valid number", ()),
    ("verify-tls", '[api]\nverify_tls = "maybe"', "api.verify_tls", r"valid boolean", ()),
    (
        "ca-file-missing",
        '[api]\nca_file = "/nonexistent/ca.pem"',
        "api.ca_file",
        r"no such file",
        (),
    ),
    ("unknown-key", '[api]\ncolour = "blue"', "api.colour", r"unknown key", ()),
    ("unknown-section", "[colour]\nx = 1", "colour", r"unknown key", ()),
    ("workers-zero", "[upload]\nworkers = 0", "upload.workers", r"greater than or equal to 1", ()),
    ("workers-huge", "[upload]\nworkers = 1000", "upload.workers", r"less than or equal to 64", ()),
    ("workers-word", '[upload]\nworkers = "two"', "upload.workers", r"valid integer", ()),
    ("workers-fraction", "[upload]\nworkers = 2.5", "upload.workers", r"fractional part", ()),
    (
        "parts-zero",
        "[upload]\npart_concurrency = 0",
        "upload.part_concurrency",
        r">= ?1|greater than or equal to 1",
        (),
    ),
    (
        "name-clash-enum",
        '[upload]\non_name_clash = "explode"',
        "upload.on_name_clash",
        r"'rename', 'fail' or 'overwrite'",
        (),
    ),
    (
        "dataset-name",
        '[upload]\ndataset_name = "static"',
        "upload.dataset_name",
        r"must contain \{path\} or \{name\}",
        (),
    ),
    (
        "metadata-nested",
        "[upload]\nmetadata = { a = { b = 1 } }",
        "upload.metadata",
        r"string|number|boolean",
        (),
    ),
    (
        "metadata-date",
        "[upload]\nmetadata = { day = 2024-01-01 }",
        "upload.metadata",
        r"'day' must be a string, number or boolean, not a date/time — quote it",
        (),
    ),
    (
        "stream-fraction",
        "[upload]\nstream = 1.5",
        "upload.stream",
        r"^upload\.stream = 1\.5: must be a stream id \(a whole number, e\.g\. 1\) or a "
        r"stream name",
        (),
    ),
    (
        "stream-bool",
        "[upload]\nstream = true",
        "upload.stream",
        r"stream id .* or a stream name",
        (),
    ),
    (
        "stream-negative",
        "[upload]\nstream = -3",
        "upload.stream",
        r"= -3: a stream id is 1 or more",
        (),
    ),
    (
        "stream-zero-text",
        '[upload]\nstream = "0"',
        "upload.stream",
        r"a stream id is 1 or more",
        (),
    ),
    (
        "stream-empty",
        '[upload]\nstream = ""',
        "upload.stream",
        r"stream name must not be empty",
        (),
    ),
    (
        "stream-blank",
        '[upload]\nstream = "  "',
        "upload.stream",
        r"stream name must not be empty",
        (),
    ),
    (
        "route-stream-zero",
        '[[routes]]\nglob = "*"\nstream = 0',
        "routes.0.stream",
        r"a stream id is 1 or more",
        (),
    ),
    (
        "route-stream-empty",
        '[[routes]]\nglob = "*"\nstream = ""',
        "routes.0.stream",
        r"stream name must not be empty",
        (),
    ),
    (
        "route-metadata-array",
        '[[routes]]\nglob = "*"\nmetadata = { a = [1] }',
        "routes.0.metadata",
        r"'a' must be a string, number or boolean, not an array",
        (),
    ),
    (
        "settle-negative",
        "[inbox]\nsettle_seconds = -1",
        "inbox.settle_seconds",
        r"greater than or equal to 0",
        (),
    ),
    (
        "after-upload-enum",
        '[inbox]\nafter_upload = "shred"',
        "inbox.after_upload",
        r"'keep', 'archive' or 'delete'",
        (),
    ),
    (
        "archive-without-path",
        '[inbox]\nafter_upload = "archive"',
        "inbox.after_upload",
        r"needs inbox\.archive_path",
        (),
    ),
    ("include-not-list", '[inbox]\ninclude = "*.csv"', "inbox.include", r"valid list", ()),
    (
        "include-empty",
        "[inbox]\ninclude = []",
        "inbox.include",
        r"= \[\]: takes no file at all",
        (),
    ),
    (
        "include-empty-glob",
        '[inbox]\ninclude = ["*.csv", ""]',
        "inbox.include",
        r"an empty glob matches no file",
        (),
    ),
    ("exclude-ints", "[inbox]\nexclude = [1]", "inbox.exclude", r"valid string", ()),
    (
        "rescan-negative",
        "[inbox]\nrescan_seconds = -5",
        "inbox.rescan_seconds",
        r"greater than or equal to 0",
        (),
    ),
    (
        "polling-word",
        '[inbox]\nforce_polling = "sometimes"',
        "inbox.force_polling",
        r"valid boolean",
        (),
    ),
    ("inbox-path-type", "[inbox]\npath = 5", "inbox.path", r"not a valid path", ()),
    (
        "prune-zero",
        "[state]\nprune_after_days = 0",
        "state.prune_after_days",
        r"greater than 0",
        (),
    ),
    (
        "attempts-huge",
        "[retry]\nattempts = 1000",
        "retry.attempts",
        r"less than or equal to 100",
        (),
    ),
    (
        "cap-below-base",
        "[retry]\nbase_seconds = 5\ncap_seconds = 1",
        "retry.cap_seconds",
        r">= retry\.base_seconds",
        (),
    ),
    (
        "poll-interval",
        "[poll]\ninterval_seconds = 0",
        "poll.interval_seconds",
        r"greater than 0",
        (),
    ),
    (
        "poll-batch",
        "[poll]\nbatch_size = 5000",
        "poll.batch_size",
        r"less than or equal to 1000",
        (),
    ),
    (
        "log-level",
        '[log]\nlevel = "loud"',
        "log.level",
        r"'debug', 'info', 'warning' or 'error'",
        (),
    ),
    ("log-format", '[log]\nformat = "xml"', "log.format", r"'auto', 'json' or 'console'", ()),
    (
        "metrics-public",
        '[metrics]\nlisten = "0.0.0.0:9464"',
        "metrics.listen",
        r"^metrics\.listen = '0\.0\.0\.0:9464': '0\.0\.0\.0' is not a loopback address",
        (),
    ),
    (
        "metrics-garbage",
        '[metrics]\nlisten = "nonsense"',
        "metrics.listen",
        r"^metrics\.listen = 'nonsense': expected 'host:port'",
        (),
    ),
    (
        "bandwidth-word",
        '[bandwidth]\nlimit = "fast"',
        "bandwidth.limit",
        r"expected a number of bytes per second",
        (),
    ),
    ("bandwidth-negative", "[bandwidth]\nlimit = -5", "bandwidth.limit", r"upload rate -5", ()),
    (
        "bandwidth-fraction",
        "[bandwidth]\nlimit = 1.5",
        "bandwidth.limit",
        r"bytes per second \(a whole number\) or a rate such as",
        (),
    ),
    (
        "window-time",
        '[bandwidth]\nwindows = ["25:00-07:00"]',
        "bandwidth.windows",
        r"25:00 is not a time of day",
        (),
    ),
    (
        "window-day",
        '[bandwidth]\nwindows = ["Funday 00:00-01:00"]',
        "bandwidth.windows",
        r"unknown day",
        (),
    ),
    (
        "retention-percent",
        "[retention]\nmin_free_percent = 150",
        "retention.min_free_percent",
        r"less than or equal to 100",
        (),
    ),
    ("route-glob-type", "[[routes]]\nglob = 5", "routes.0.glob", r"valid string", ()),
    ("route-glob-missing", "[[routes]]\nstream = 1", "routes.0.glob", r"required", ()),
    ("toml-syntax", "[api\nurl =", "--config", r"not valid TOML", ()),
]


def _config_text(snippet: str) -> str:
    # The token goes into [api]: appended to the snippet's own [api] table when it has one.
    if snippet.startswith("[api]"):
        return f'{snippet}\ntoken = "{_TOKEN_VALUE}"\n'
    return f'[api]\ntoken = "{_TOKEN_VALUE}"\n{snippet}\n'


def _check(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("snippet", "key", "pattern"),
    [pytest.param(s, k, p, id=i, marks=m) for i, s, k, p, m in BAD_CONFIG],
)
def test_bad_config_value(tmp_path: Path, snippet: str, key: str, pattern: str) -> None:
    _STATS["config_cases"] += 1
    path = tmp_path / "config.toml"
    path.write_text(_config_text(snippet))
    code, out, err = _check(["check", "--config", str(path)])
    assert code == 78, f"exit {code}: {out}{err}"
    lines = err.splitlines()
    assert lines[0] == "inboxd: configuration problem:", err
    problems = lines[1:]
    assert problems and all(line.startswith("  ") for line in problems), err
    assert len(problems) == 1, f"one problem, {len(problems)} lines:\n{err}"
    line = problems[0].strip()
    # The key, maybe with a list index (inbox.exclude.0), then " = value: …" or ": …".
    named = re.match(re.escape(key) + r"(\.\d+)?[ :]", line)
    assert named, f"{key!r} not named: {line!r}"
    assert re.search(pattern, line), line
    assert _TOKEN_VALUE not in out + err
    assert "Traceback" not in err


def test_many_bad_values_one_line_each_and_the_real_command(tmp_path: Path) -> None:
    """All at once through `inboxd check` and `inboxd run` as processes: 78, one line each."""
    _STATS["config_cases"] += 1
    path = tmp_path / "config.toml"
    path.write_text(
        f'[api]\nurl = "ftp://x"\ntoken = "{_TOKEN_VALUE}"\ntimeout = 0\n'
        '[upload]\nworkers = 0\non_name_clash = "explode"\n'
        '[inbox]\nafter_upload = "shred"\nsettle_seconds = -2\n'
        '[log]\nlevel = "loud"\n[bogus]\nx = 1\n'
    )
    keys = ["api.url", "api.timeout", "upload.workers", "upload.on_name_clash"]
    keys += ["inbox.after_upload", "inbox.settle_seconds", "log.level", "bogus"]
    for command in ("check", "run"):
        out = subprocess.run(
            [sys.executable, "-m", "daemon", command, "--config", str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
            check=False,
        )
        assert out.returncode == 78, (command, out.returncode, out.stderr)
        problems = out.stderr.splitlines()[1:]
        assert len(problems) == len(keys), out.stderr
        for key in keys:
            assert sum(p.strip().startswith(key) for p in problems) == 1, (key, out.stderr)
        assert _TOKEN_VALUE not in out.stdout + out.stderr


def test_bad_value_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _STATS["config_cases"] += 1
    path = tmp_path / "config.toml"
    path.write_text(_config_text("[upload]\nworkers = 2"))
    monkeypatch.setenv("INBOXD_UPLOAD__WORKERS", "many")
    monkeypatch.setenv("INBOXD_POLL__BATCH_SIZE", "-1")
    code, _, err = _check(["check", "--config", str(path)])
    assert code == 78
    assert "  upload.workers = 'many': Input should be a valid integer" in err
    assert "  poll.batch_size = '-1': Input should be greater than or equal to 1" in err
