"""Disk and database suite: a full state filesystem, broken state databases, SIGKILL mid-intake.

What the daemon owes a person (issue #5): it says clearly what is wrong (one line naming the
file and what to do, never a Python traceback), it never crash-loops silently (exit status
≠ 0, so systemd and the journal see it), and it never loses track of a file it has taken.

* A real small tmpfs as the state directory (root only; skipped with the reason otherwise),
  filled up while the daemon runs, and full before it starts.
* State databases that are corrupt (random bytes in the middle), truncated, empty, a
  directory, from an older schema (``user_version`` 0) or a newer one: ``inboxd run`` and
  ``inboxd status`` against each.
* SIGKILL while thousands of files are being taken at start-up, then a restart: every file
  lands exactly once.

``inboxd run`` exit statuses: 78 for a config problem, 65 (EX_DATAERR) for a state database
that is not usable (corrupt, not SQLite, a directory, a newer schema, a failed upgrade: in
``RestartPreventExitStatus=``, it never fixes itself) and 74 (EX_IOERR) for a full state
filesystem (systemd restarts it: space may be freed).

CI scale by default (2,000 files in the SIGKILL case); ``INBOXD_SUITE=long`` for 50,000 files
and five more kills at random moments.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import pytest

from daemon.sandbox import Sandbox, SandboxConfig, running_sandbox
from daemon.state import MIGRATIONS, FileIdentity, NewJob, Queue
from tests.support.data import TOKEN, write_file
from tests.support.runner import (
    REPO,
    inboxd,
    server_datasets,
    start_daemon,
    stop_daemon,
    write_config,
)
from tests.support.waits import wait_for

KiB = 1024
MiB = 1024 * KiB
EX_DATAERR, EX_IOERR = 65, 74  # sysexits.h: an unusable state database, a full state filesystem
LONG = os.environ.get("INBOXD_SUITE") == "long"
SEED = 20261122
pytestmark = pytest.mark.slow

_STATS: dict[str, Any] = {"cases": 0, "files": 0, "lost": 0, "duplicates": 0, "exit_codes": {}}


# ------------------------------------------------------------------------------- summary


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    line = {"suite": "disk_db", **_STATS, "long": LONG}
    line["seconds"] = round(time.monotonic() - started, 1)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    text = "SUITE " + json.dumps(line, sort_keys=False)
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(text, flush=True)
    else:  # pragma: no cover
        print(text, flush=True)


@pytest.fixture(autouse=True)
def _count_case() -> None:
    _STATS["cases"] += 1


# ------------------------------------------------------------------------------- helpers


def _sandbox_config(data_dir: Path) -> SandboxConfig:
    return SandboxConfig(
        data_dir=data_dir,
        token=TOKEN,
        server_max_bytes=64 * KiB,
        single_max_bytes=512 * KiB,
        part_size=256 * KiB,
        import_seconds=0.2,
    )


def _mount_tmpfs(where: Path, size: str) -> Callable[[], None]:
    """A real tmpfs of ``size`` at ``where``; returns its unmount. Skips when we may not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the full-disk cases need a real ENOSPC")
    where.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode})")

    def unmount() -> None:
        for args in (["umount", str(where)], ["umount", "-l", str(where)]):
            if subprocess.run(args, capture_output=True, check=False).returncode == 0:
                return

    return unmount


def _fill(directory: Path, name: str = "filler") -> int:
    """Write into ``directory`` until the filesystem says ENOSPC; returns the bytes written."""
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    written = 0
    try:
        for size in (64 * KiB, 4 * KiB, 1):
            block = b"\0" * size
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


def _db_counts(db: Path) -> dict[str, int]:
    """Jobs per state, read straight from SQLite (read-only); {} while there is no schema."""
    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        finally:
            con.close()
    except sqlite3.Error:
        return {}


def _delivery(sb: Sandbox, files: dict[str, bytes]) -> tuple[int, int, list[str]]:
    """(lost, duplicated, problems) of ``files`` on the sandbox."""
    names = server_datasets(sb)
    problems = []
    lost = dups = 0
    for name, data in files.items():
        ids = names.get(name, [])
        if not ids:
            lost += 1
            problems.append(f"lost {name}")
            continue
        if len(ids) > 1:
            dups += len(ids) - 1
            problems.append(f"{name} x{len(ids)}")
        if sb.dataset_bytes(ids[0]) != data:
            problems.append(f"{name}: other bytes")
    strays = sorted(set(names) - set(files))
    if strays:
        problems.append(f"unexpected datasets {strays[:5]}")
        dups += len(strays)
    return lost, dups, problems


def _account(lost: int, dups: int, files: int) -> None:
    _STATS["lost"] += lost
    _STATS["duplicates"] += dups
    _STATS["files"] += files


_LOG_LINE = re.compile(r"^\{.*\}$")


def _human_lines(stderr: str) -> list[str]:
    """What ``inboxd`` printed for a person: everything but the JSON log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]


def assert_one_clear_line(stderr: str, *needles: str) -> str:
    """stderr holds one line for a person (``inboxd: …``), containing every needle."""
    assert "Traceback" not in stderr, f"a Python traceback instead of a reason:\n{stderr[-3000:]}"
    lines = _human_lines(stderr)
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n" + "\n".join(lines[:20])
    (line,) = lines
    assert line.startswith("inboxd: "), line
    for needle in needles:
        assert re.search(needle, line, re.IGNORECASE), f"{needle!r} not in {line!r}"
    return line


def _run_briefly(
    config: Path,
    seconds: float = 8.0,
    until: Callable[[], bool] | None = None,
    prefix: list[str] | None = None,
) -> tuple[int | None, str]:
    """``inboxd run`` for at most ``seconds`` (or until ``until()``, checked while it runs):
    (exit status, or None if it was still running and we stopped it; its stderr).
    ``prefix`` runs it through e.g. ``setpriv`` as another user."""
    log = config.parent / f"run-{time.monotonic_ns()}.log"
    args = ["-m", "daemon", "run", "--config", str(config), "--grace", "2"]
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [*(prefix or []), sys.executable, *args],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + seconds
    code: int | None = None
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None or (until is not None and until()):
            break
        time.sleep(0.05)
    if code is None:
        stop_daemon(proc)
    return code, log.read_text(errors="replace")


# ===================================================================== (a) a full state disk

_FULL_CLEAR = r"(disk|file ?system|device)( is)? full|no space left"


@dataclass
class FullDiskRun:
    """What happened when the state filesystem filled up under a running daemon."""

    exit_code: int | None = None  # None: still running when we looked
    seconds_to_exit: float | None = None
    output: str = ""
    status_while_full: subprocess.CompletedProcess[str] | None = None
    lost: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)
    files: int = 0


@pytest.fixture(scope="module")
def full_while_running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullDiskRun]:
    """Start the daemon on a 16 MiB tmpfs, fill the tmpfs while it uploads, then free it and
    restart: the record of what it said and what the sandbox got in the end."""
    tmp = tmp_path_factory.mktemp("fullrun")
    state = tmp / "state"
    unmount = _mount_tmpfs(state, "16m")
    result = FullDiskRun()
    try:
        with running_sandbox(_sandbox_config(tmp / "sandbox")) as sb:
            sb.faults.storage_delay_per_mib = 1.5  # multipart uploads are mid-way when it fills
            config = write_config(
                tmp, sb, upload={"workers": 2, "part_concurrency": 1}, log={"level": "info"}
            )
            inbox = tmp / "inbox"
            rng = random.Random(SEED)
            files: dict[str, bytes] = {}
            for i in range(12):
                size = rng.choice([3 * KiB, 40 * KiB, 300 * KiB, 900 * KiB])
                files[f"early/{i:02d}.bin"] = write_file(inbox / f"early/{i:02d}.bin", size, i)
            log = tmp / "daemon.log"
            proc = start_daemon(config, log)
            try:
                db = state / "state.db"
                wait_for(lambda: _db_counts(db).get("done", 0) >= 1, 60, "a file done")
                wal = state / "state.db-wal"
                _STATS["wal_bytes_at_fill"] = wal.stat().st_size if wal.exists() else 0
                _fill(state)
                # Files keep arriving: their jobs need new pages (the WAL could otherwise be
                # rewritten in place for a while without asking the filesystem for space).
                for i in range(40):
                    name = f"late/{i:02d}.csv"
                    files[name] = write_file(inbox / name, 2 * KiB + i, 100 + i)
                started = time.monotonic()
                try:
                    result.exit_code = proc.wait(timeout=20)
                    result.seconds_to_exit = round(time.monotonic() - started, 1)
                except subprocess.TimeoutExpired:
                    result.exit_code = None
                result.status_while_full = inboxd("status", "--config", str(config), "--json")
            finally:
                if proc.poll() is None:
                    stop_daemon(proc)
            result.output = log.read_text(errors="replace")
            # The operator frees space and systemd (or they) start it again.
            (state / "filler").unlink()
            sb.faults.storage_delay_per_mib = 0.0
            proc = start_daemon(config, tmp / "daemon2.log")
            try:
                wait_for(
                    lambda: _db_counts(db).get("done", 0) == len(files),
                    90,
                    f"all {len(files)} files done after the restart",
                )
            finally:
                assert stop_daemon(proc) == 0
            result.files = len(files)
            result.lost, result.duplicates, result.problems = _delivery(sb, files)
            assert not [i for i in sb.ingestions.values() if i.state == "UPLOADING"]
        _STATS["exit_codes"]["disk_full_while_running"] = result.exit_code
        _account(result.lost, result.duplicates, result.files)
        yield result
    finally:
        unmount()


def test_full_state_disk_while_running_loses_nothing(full_while_running: FullDiskRun) -> None:
    r = full_while_running
    assert (r.lost, r.duplicates) == (0, 0), r.problems
    assert r.problems == []


def test_full_state_disk_while_running_is_not_silent(full_while_running: FullDiskRun) -> None:
    """Whatever it does, it may not carry on as if nothing happened, nor exit 0."""
    r = full_while_running
    assert r.exit_code != 0
    assert re.search(_FULL_CLEAR, r.output, re.IGNORECASE), r.output[-2000:]


def test_full_state_disk_while_running_says_so_in_one_line(
    full_while_running: FullDiskRun,
) -> None:
    r = full_while_running
    assert "Traceback" not in r.output, r.output[-4000:]
    lines = _human_lines(r.output)
    assert any(re.search(_FULL_CLEAR, line, re.IGNORECASE) for line in lines), lines


def test_full_state_disk_while_running_exits_74(full_while_running: FullDiskRun) -> None:
    """EX_IOERR, not 65: systemd restarts it (a full disk may clear up), see the unit."""
    assert full_while_running.exit_code == EX_IOERR, full_while_running.output[-2000:]


def test_status_while_the_state_disk_is_full(full_while_running: FullDiskRun) -> None:
    """`inboxd status` right after the daemon stopped on the full disk, still full."""
    out = full_while_running.status_while_full
    assert out is not None
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    counts = json.loads(out.stdout)["counts"]
    assert counts["done"] >= 1, counts  # the fixture filled the disk after the first was done


@pytest.fixture
def full_state(tmp_path: Path, sandbox: Sandbox) -> Iterator[tuple[Path, Path]]:
    """(config, state dir) with the state dir on a tiny tmpfs; the caller fills it."""
    unmount = _mount_tmpfs(tmp_path / "state", "512k")
    try:
        config = write_config(tmp_path, sandbox)
        write_file(tmp_path / "inbox" / "waiting.csv", 1000)
        yield config, tmp_path / "state"
    finally:
        unmount()


def test_start_on_full_fresh_state_dir_says_so(full_state: tuple[Path, Path]) -> None:
    config, state = full_state
    _fill(state)
    code, stderr = _run_briefly(config)
    _STATS["exit_codes"]["disk_full_at_start_fresh"] = code
    assert code == EX_IOERR, stderr[-2000:]
    assert_one_clear_line(stderr, re.escape(str(state)), _FULL_CLEAR, r"free space")


@pytest.mark.parametrize("command", ["run", "status"])
def test_start_on_full_state_dir_with_a_database(
    full_state: tuple[Path, Path], command: str
) -> None:
    config, state = full_state
    _make_db(state / "state.db", 3)  # the database of an earlier run, closed cleanly
    (state / "state.db.lock").write_text("4242")  # and the lock file that run left
    _fill(state)
    if command == "run":
        code, stderr = _run_briefly(config)
        _STATS["exit_codes"]["disk_full_at_start_existing_db"] = code
        assert code == EX_IOERR, stderr[-2000:]
        assert_one_clear_line(
            stderr, re.escape(str(state / "state.db")), _FULL_CLEAR, r"free space"
        )
    else:
        # `status` needs no room: it reads the closed database without creating -shm.
        out = inboxd("status", "--config", str(config), "--json")
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr, out.stderr
        assert json.loads(out.stdout)["counts"]["queued"] == 3


# ================================================ (b) a database other users have touched


def _as_nobody() -> list[str]:
    """The ``setpriv`` prefix that runs a command as ``nobody``; skips when not possible."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the daemon as another user than `status`")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import daemon"], cwd=REPO, check=False)
    if probe.returncode != 0:
        pytest.skip("setpriv cannot run the daemon as nobody here")
    return prefix


def test_status_as_root_while_stopped_does_not_lock_the_daemon_out(sandbox: Sandbox) -> None:
    """`sudo inboxd status` (the way to read a 0700 /var/lib/inboxd) while the daemon is
    stopped creates state.db-wal/-shm as root; SQLite hands them to the database file's owner
    (it fchowns when running as root), so the daemon, as its own user, still starts."""
    prefix = _as_nobody()
    base = Path(tempfile.mkdtemp(prefix="inboxd-owner-"))
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir()
        os.chown(state, 65534, 65534)
        config = write_config(base, sandbox)
        config.chmod(0o644)
        write_file(base / "inbox" / "first.csv", 300)

        def delivered(name: str) -> Callable[[], bool]:
            return lambda: name in server_datasets(sandbox)

        code, err = _run_briefly(config, 20, until=delivered("first.csv"), prefix=prefix)
        assert code is None and delivered("first.csv")(), err[-2000:]
        out = inboxd("status", "--config", str(config))  # as root, the daemon stopped
        assert out.returncode == 0, out.stderr
        left = {p.name: p.stat().st_uid for p in state.iterdir()}
        _STATS["files_left_by_root_status"] = left
        assert set(left.values()) == {65534}, left
        write_file(base / "inbox" / "second.csv", 300, 2)
        code, err = _run_briefly(config, 20, until=delivered("second.csv"), prefix=prefix)
        _STATS["exit_codes"]["run_after_root_status"] = code
        assert code is None, f"the daemon could not start after `status` as root: {err[-1500:]}"
        assert delivered("second.csv")()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ============================================================== (c) broken state databases


def _make_db(path: Path, jobs: int) -> None:
    async def build() -> None:
        async with await Queue.open(path) as q:
            await q.enqueue_many(
                [
                    NewJob(FileIdentity(f"old/{i:05d}.csv", 10 + i, i, i + 1), 1, f"{i}", {})
                    for i in range(jobs)
                ]
            )

    anyio.run(build)


def _corrupt_middle(db: Path) -> None:
    _make_db(db, 3000)
    data = bytearray(db.read_bytes())
    start, end = int(len(data) * 0.3), int(len(data) * 0.7)
    data[start:end] = random.Random(SEED).randbytes(end - start)
    db.write_bytes(bytes(data))


def _corrupt_header(db: Path) -> None:
    _make_db(db, 10)
    data = bytearray(db.read_bytes())
    data[:100] = random.Random(SEED).randbytes(100)
    db.write_bytes(bytes(data))


def _truncate(db: Path) -> None:
    _make_db(db, 3000)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def _zero_bytes(db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"")


def _directory(db: Path) -> None:
    (db / "something").mkdir(parents=True)


def _newer(db: Path) -> None:
    _make_db(db, 3)
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 4}")
    con.close()


def _older_stamped(db: Path) -> None:
    """An old layout: user_version 0, and a jobs table without a column today's code needs."""
    _make_db(db, 3)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("ALTER TABLE jobs DROP COLUMN fell_back")
    con.execute("PRAGMA user_version = 0")
    con.close()


def _v1_previous_release(db: Path) -> None:
    """The schema of the previous release (v1), as its daemon left it: one file done (still in
    the inbox, after_upload = keep) and one file queued (the case's own file)."""
    inbox = db.parent.parent / "inbox"
    kept = inbox / "kept.csv"
    kept.write_bytes(b"done before the upgrade\n")
    queued = next(p for p in inbox.iterdir() if p.name.endswith(".csv") and p != kept)
    now = time.time()

    async def build() -> None:
        db.parent.mkdir(parents=True, exist_ok=True)
        async with aiosqlite.connect(db, isolation_level=None) as con:
            await con.execute("PRAGMA journal_mode = WAL")
            await MIGRATIONS[0](con)
            await con.execute("PRAGMA user_version = 1")
            for path, state, stage, extra in (
                (kept, "done", "completed", {"dataset_id": 4242, "after_upload": "kept"}),
                (queued, "queued", "new", {"dataset_id": None, "after_upload": None}),
            ):
                st = path.stat()
                await con.execute(
                    "INSERT INTO jobs (rel, size, mtime_ns, inode, state, stage, stream_id,"
                    " dataset_name, metadata, upload_key, next_attempt_at, created_at,"
                    " updated_at, finished_at, dataset_id, after_upload)"
                    " VALUES (?, ?, ?, ?, ?, ?, 1, ?, '{}', ?, ?, ?, ?, ?, ?, ?)",
                    (
                        os.fsencode(path.name),
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ino,
                        state,
                        stage,
                        path.name,
                        os.urandom(16).hex(),
                        now,
                        now,
                        now,
                        now if state == "done" else None,
                        extra["dataset_id"],
                        extra["after_upload"],
                    ),
                )

    anyio.run(build)


def _v0_hand_made(db: Path) -> None:
    """What tests/test_queue.py calls a v0 file: a database with no inboxd schema yet."""
    db.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE unrelated (x)")
    con.close()


#: case → (breaker, run: needles or "starts", status: needles, status's exit status). `run`
#: exits EX_DATAERR whenever it does not start; `status` exits 1 where only an upgrade is due.
BROKEN: dict[str, tuple[Callable[[Path], None], Any, tuple[str, ...], int]] = {
    "corrupt-middle": (
        _corrupt_middle,
        (r"state\.db", r"malformed|not a valid|corrupt", r"move it away", r"backup", r"-wal"),
        (r"state\.db", r"malformed|not a valid|corrupt"),
        EX_DATAERR,
    ),
    "corrupt-header": (
        _corrupt_header,
        (r"state\.db", r"not a valid SQLite database", r"move it away", r"backup"),
        (r"state\.db", r"not a valid SQLite database"),
        EX_DATAERR,
    ),
    "truncated-half": (
        _truncate,
        (r"state\.db", r"not a valid SQLite database|malformed", r"move it away"),
        (r"state\.db", r"not a valid SQLite database|malformed"),
        EX_DATAERR,
    ),
    "zero-bytes": (
        _zero_bytes,
        "starts",  # indistinguishable from a file Queue.open created just before a crash
        (r"state\.db", r"schema v0", r"start the daemon once"),
        1,
    ),
    "directory": (
        _directory,
        (r"state\.db", r"is a directory|not a (regular )?file"),
        (r"state\.db", r"is a directory|not a (regular )?file"),
        EX_DATAERR,
    ),
    "newer-schema": (
        _newer,
        (r"state\.db", r"newer inboxd", rf"schema v{len(MIGRATIONS) + 4}", r"upgrade inboxd"),
        (r"state\.db", r"newer inboxd", r"upgrade inboxd"),
        EX_DATAERR,
    ),
    "older-schema-stamped-v0": (
        _older_stamped,
        (r"state\.db", r"cannot upgrade", rf"schema v0 to v{len(MIGRATIONS)}", r"left unchanged"),
        (r"state\.db", r"schema v0"),
        1,
    ),
    "v1-previous-release": (
        _v1_previous_release,
        "starts",  # migrated in place; its done file is not uploaded again
        (r"state\.db", r"schema v1", r"start the daemon once"),
        1,
    ),
    "v0-hand-made": (
        _v0_hand_made,
        "starts",  # migrated in place
        (r"state\.db", r"schema v0", r"start the daemon once"),
        1,
    ),
}


@pytest.fixture(scope="module")
def broken_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    with running_sandbox(_sandbox_config(tmp_path_factory.mktemp("broken-sb"))) as sb:
        yield sb


@pytest.mark.parametrize("command", ["run", "status"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_state_database(
    broken_sandbox: Sandbox,
    tmp_path: Path,
    case: str,
    command: str,
) -> None:
    breaker, run_expect, status_expect, status_exit = BROKEN[case]
    config = write_config(tmp_path, broken_sandbox, log={"level": "info"})
    data = write_file(tmp_path / "inbox" / f"{case}.csv", 500)
    db = tmp_path / "state" / "state.db"
    breaker(db)
    before = db.read_bytes() if db.is_file() else None
    if command == "status":
        out = inboxd("status", "--config", str(config), timeout=30)
        _STATS["exit_codes"][f"status:{case}"] = out.returncode
        assert out.returncode == status_exit, f"status exited {out.returncode} on a {case} "
        f"database:\n{out.stdout[:500]}{out.stderr[-1500:]}"
        assert_one_clear_line(out.stderr, *status_expect)
        if before is not None:
            assert db.read_bytes() == before, "status changed the database"
        return

    def delivered() -> bool:
        return f"{case}.csv" in server_datasets(broken_sandbox)

    code, stderr = _run_briefly(
        config, seconds=10 if run_expect == "starts" else 8, until=delivered
    )
    _STATS["exit_codes"][f"run:{case}"] = code
    if run_expect == "starts":
        assert code is None, f"exited {code}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr
        names = server_datasets(broken_sandbox)
        assert len(names.get(f"{case}.csv", [])) == 1
        assert broken_sandbox.dataset_bytes(names[f"{case}.csv"][0]) == data
        assert "kept.csv" not in names  # done under the old schema: never uploaded again
        return
    # A broken database never fixes itself: the daemon must stop, loudly, and touch nothing.
    assert code is not None, "the daemon kept running on a broken state database"
    assert code == EX_DATAERR, stderr[-2000:]
    assert_one_clear_line(stderr, *run_expect)
    if before is not None:
        assert db.read_bytes() == before, "run changed the broken database"
    assert f"{case}.csv" not in server_datasets(broken_sandbox)


# ======================================================== (d) SIGKILL during a heavy intake


def _tiny_files(inbox: Path, n: int) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        name = f"burst/{i // 1000:03d}/f{i:06d}.csv"
        data = f"{i},{i * 7}\n".encode()
        path = inbox / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[name] = data
    return files


@pytest.mark.timeout(3600 if LONG else 300)
def test_sigkill_during_heavy_intake_then_restart(sandbox: Sandbox, tmp_path: Path) -> None:
    """Thousands of files at start-up; SIGKILL while they are being scanned and enqueued, again
    while the first ones upload, then a restart: every file lands exactly once."""
    n = 50_000 if LONG else 2_000  # the daemon takes ~9 ms of CPU per tiny file
    sandbox.config.import_seconds = 0.05
    config = write_config(
        tmp_path,
        sandbox,
        upload={"workers": 4},
        inbox={"settle_seconds": 0.2},
        log={"level": "warning"},
        poll={"interval_seconds": 0.5, "batch_size": 500},
    )
    files = _tiny_files(tmp_path / "inbox", n)
    db = tmp_path / "state" / "state.db"
    log = tmp_path / "daemon.log"
    kills: list[dict[str, int]] = []

    def total() -> int:
        return sum(_db_counts(db).values())

    # 1: while the start-up scan hands over its first batches (enqueued, not all).
    proc = start_daemon(config, log)
    try:
        wait_for(lambda: total() > 0, 60, "the first enqueued batch")
    finally:
        proc.kill()
        proc.wait(10)
    kills.append(_db_counts(db))
    # 2: with everything taken and uploads under way.
    proc = start_daemon(config, log)
    try:
        wait_for(
            lambda: _db_counts(db).get("done", 0) + _db_counts(db).get("importing", 0) > 20,
            60,
            "uploads under way",
        )
    finally:
        proc.kill()
        proc.wait(10)
    kills.append(_db_counts(db))
    if LONG:  # 3..: more kills at random moments
        rng = random.Random(SEED)
        for _ in range(5):
            proc = start_daemon(config, log)
            time.sleep(rng.uniform(1.0, 6.0))
            proc.kill()
            proc.wait(10)
            kills.append(_db_counts(db))
    proc = start_daemon(config, log)
    try:
        wait_for(
            lambda: _db_counts(db).get("done", 0) == n,
            2400 if LONG else 200,
            f"{n} done",
            step=0.5 if LONG else 0.1,
        )
    finally:
        assert stop_daemon(proc) == 0
    counts = _db_counts(db)
    assert counts == {"done": n}, counts
    lost, dups, problems = _delivery(sandbox, files)
    _account(lost, dups, n)
    _STATS["sigkill_intake"] = {"files": n, "kills": len(kills), "counts_at_kills": kills}
    assert (lost, dups) == (0, 0), problems[:20]
    assert problems == []
    assert not [i for i in sandbox.ingestions.values() if i.state == "UPLOADING"]
    assert kills[0].get("done", 0) < n  # the first kill really hit the intake
