"""Intake as a logging PC does it: writer processes, the daemon as a process, real folders.

A file is taken when its writer is done with it (not when it was quiet for settle_seconds),
each version once; the daemon outlives its inbox folder (missing at start, deleted, moved
away, unmounted); a state database deleted or replaced under it stops it with exit 75; a
delivered file renamed within the inbox is recognised, not uploaded again.

The pauses of the writers are the scenarios themselves (longer than settle_seconds on
purpose); everything the test waits *for* is a condition with a generous timeout.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from daemon.config import load_settings
from daemon.intake.routing import matching_route
from daemon.sandbox import Sandbox
from tests.support.rig import describe_unfinished, jobs, log_records, status_json, wait_all_done
from tests.support.runner import inboxd, server_datasets, start_daemon, stop_daemon, write_config
from tests.support.waits import wait_for

pytestmark = pytest.mark.slow

SETTLE = 0.5
KiB = 1024

# A writer process driven line by line from the test; it answers "ok" once a command is done.
_WRITER = r"""
import os, random, sys
path, fh = sys.argv[1], None
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "open":
        fh = open(path, {"w": "wb", "a": "ab"}[args[0]], buffering=0)
    elif cmd == "write":
        fh.write(random.Random(int(args[1])).randbytes(int(args[0])))
    elif cmd == "close":
        fh.close()
        fh = None
    elif cmd == "rename":  # logrotate's way: the open file is renamed, the writer goes on
        os.rename(path, args[0])
        path = args[0]
    elif cmd == "path":
        path = args[0]
    print("ok", flush=True)
"""


class Writer:
    """A logger: a separate process that opens, writes, pauses, closes, renames."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _WRITER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def do(self, *command: object) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(map(str, command)) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer.strip() == "ok", f"writer: {command} -> {answer!r}"

    def write(self, size: int, seed: int) -> bytes:
        """Append ``size`` bytes; returns them."""
        self.do("write", size, seed)
        return random.Random(seed).randbytes(size)

    def stop(self) -> None:
        self.proc.communicate(timeout=10)  # end of input ends it; closes the pipes


@contextmanager
def writer(path: Path) -> Iterator[Writer]:
    w = Writer(path)
    try:
        yield w
    finally:
        w.stop()


@contextmanager
def daemon(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``inboxd run`` as a process until the block ends; it must still be running then."""
    ready_before = len(log_records(log, ("daemon.ready",))) if log.exists() else 0
    proc = start_daemon(config, log)
    try:
        wait_for(
            lambda: (
                len(log_records(log, ("daemon.ready",))) > ready_before or proc.poll() is not None
            ),
            30,
            "daemon.ready",
        )
        assert proc.poll() is None, f"inboxd run exited {proc.returncode}:\n{log.read_text()}"
        yield proc
        assert proc.poll() is None, f"inboxd run exited {proc.returncode}:\n{log.read_text()}"
    finally:
        stop_daemon(proc)


def _config(tmp_path: Path, sb: Sandbox, **sections: dict[str, Any]) -> Path:
    inbox = {"settle_seconds": SETTLE, **sections.pop("inbox", {})}
    return write_config(tmp_path, sb, inbox=inbox, **sections)


def _delivered(sb: Sandbox) -> dict[str, list[bytes]]:
    """Dataset name → the bytes of each dataset of that name."""
    return {name: [sb.dataset_bytes(i) for i in ids] for name, ids in server_datasets(sb).items()}


def _jobs_per_path(config: Path) -> Counter[str]:
    return Counter(j.identity.rel for j in jobs(config))


def _assert_once(sb: Sandbox, config: Path, expected: dict[str, bytes]) -> None:
    """Each file one dataset with exactly its final bytes, from one job: nothing split."""
    assert _delivered(sb) == {name: [data] for name, data in expected.items()}
    assert _jobs_per_path(config) == dict.fromkeys(expected, 1), describe_unfinished(config)
    assert len(sb.ingestions) == len(expected)
    assert not [i for i in sb.ingestions.values() if i.state == "UPLOADING"]


# ---------------------------------------------------------------------------- writers


def test_writer_pausing_with_the_file_open_gives_one_dataset(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
    with daemon(config, log), writer(tmp_path / "inbox" / "run.csv") as w:
        w.do("open", "w")
        data = w.write(20 * KiB, 1)
        time.sleep(3 * SETTLE)  # the logger pauses, file open
        data += w.write(20 * KiB, 2)
        time.sleep(3 * SETTLE)
        assert jobs(config) == []
        data += w.write(20 * KiB, 3)
        w.do("close")
        wait_all_done(config, 1, 30)
    _assert_once(sandbox, config, {"run.csv": data})
    held = log_records(log, ("watcher.held_open",))
    assert [(e["rel"], e["seen_by"]) for e in held] == [("run.csv", "inotify")]


def test_append_by_reopen_after_a_pause_gives_one_dataset(sandbox: Sandbox, tmp_path: Path) -> None:
    config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
    with daemon(config, log), writer(tmp_path / "inbox" / "log.csv") as w:
        w.do("open", "w")
        data = w.write(10 * KiB, 1)
        w.do("close")
        w.do("open", "a")  # within settle_seconds; the first append only after it
        time.sleep(3 * SETTLE)
        assert jobs(config) == []
        data += w.write(10 * KiB, 2)
        w.do("close")
        wait_all_done(config, 1, 30)
    _assert_once(sandbox, config, {"log.csv": data})


def test_write_then_rename_gives_one_dataset_under_the_final_name(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
    with daemon(config, log), writer(inbox / "x.tmp") as w:
        w.do("open", "w")
        data = w.write(30 * KiB, 1)
        time.sleep(3 * SETTLE)
        data += w.write(30 * KiB, 2)
        w.do("close")
        w.do("rename", inbox / "x.csv")
        wait_all_done(config, 1, 30)
    _assert_once(sandbox, config, {"x.csv": data})


def test_rotation_delivers_each_version_once(sandbox: Sandbox, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
    with daemon(config, log), writer(inbox / "app.log") as w:
        w.do("open", "w")
        first = w.write(20 * KiB, 1)
        time.sleep(3 * SETTLE)
        w.do("rename", inbox / "app.log.1")  # rotated while open; the last lines go there
        first += w.write(5 * KiB, 2)
        w.do("close")
        w.do("path", inbox / "app.log")  # the logger reopens its log: a new file
        w.do("open", "w")
        second = w.write(20 * KiB, 3)
        time.sleep(3 * SETTLE)
        second += w.write(5 * KiB, 4)
        w.do("close")
        wait_all_done(config, 2, 30)
    _assert_once(sandbox, config, {"app.log.1": first, "app.log": second})


def test_file_open_at_start_up_is_taken_only_once_closed(sandbox: Sandbox, tmp_path: Path) -> None:
    config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
    with writer(tmp_path / "inbox" / "long.csv") as w:
        w.do("open", "w")
        data = w.write(20 * KiB, 1)
        time.sleep(SETTLE + 0.5)  # quiet for longer than settle_seconds: it looks complete
        with daemon(config, log):
            time.sleep(3 * SETTLE)
            assert jobs(config) == []
            held = log_records(log, ("watcher.held_open",))
            assert [(e["rel"], e["seen_by"]) for e in held] == [("long.csv", "/proc")]
            data += w.write(20 * KiB, 2)
            w.do("close")
            wait_all_done(config, 1, 30)
    _assert_once(sandbox, config, {"long.csv": data})
    method = log_records(log, ("watcher.completeness",))
    assert len(method) == 1 and "checked in /proc" in method[0]["method"]


# ---------------------------------------------------------------------------- renames


def test_delivered_file_renamed_or_moved_is_not_uploaded_again(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
    data = random.Random(1).randbytes(10 * KiB)
    (inbox / "a.csv").write_bytes(data)
    with daemon(config, log):
        wait_all_done(config, 1, 30)
        (inbox / "sub").mkdir()
        os.rename(inbox / "a.csv", inbox / "sub" / "b.csv")
        wait_for(lambda: "sub/b.csv" in _jobs_per_path(config), 30, "the renamed file's job")
        # A hard link is a second name for a file whose first name still holds it.
        os.link(inbox / "sub" / "b.csv", inbox / "c.csv")
        wait_all_done(config, 3, 30)
        status = status_json(config)
    assert _delivered(sandbox) == {"a.csv": [data], "c.csv": [data]}
    renamed = next(j for j in status["jobs"] if j["path"] == "sub/b.csv")
    assert renamed["state"] == "done"
    assert renamed["note"].startswith("renamed from a.csv: already delivered as dataset 'a.csv'")
    assert [e["renamed_from"] for e in log_records(log, ("watcher.renamed",))] == ["a.csv"]
    text = inboxd("status", "--config", str(config)).stdout
    assert "sub/b.csv" in text and "renamed from a.csv" in text


def test_upload_renamed_true_uploads_a_renamed_file_again(sandbox: Sandbox, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    config = _config(tmp_path, sandbox, inbox={"upload_renamed": True})
    data = random.Random(1).randbytes(10 * KiB)
    (inbox / "a.csv").write_bytes(data)
    with daemon(config, tmp_path / "daemon.log"):
        wait_all_done(config, 1, 30)
        os.rename(inbox / "a.csv", inbox / "b.csv")
        wait_all_done(config, 2, 30)
    assert _delivered(sandbox) == {"a.csv": [data], "b.csv": [data]}


def test_route_globs_match_in_any_letter_case(sandbox: Sandbox, tmp_path: Path) -> None:
    config = _config(tmp_path, sandbox)
    with config.open("a") as fh:
        fh.write('[[routes]]\nglob = "logs/*.csv"\nstream = 7\n')
    settings = load_settings(config)
    for rel in ("logs/run.csv", "LOGS/RUN.CSV", "Logs/Run.Csv"):
        found = matching_route(rel, settings)
        assert found is not None and found.stream == 7, rel
    assert matching_route("logs/run.mf4", settings) is None


# ---------------------------------------------------------------------------- the inbox folder


def test_inbox_missing_at_start_is_waited_for_not_exit_78(sandbox: Sandbox, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
    inbox.rmdir()
    with daemon(config, log):  # ready (READY=1), running
        problem = wait_for(
            lambda: status_json(config)["daemon"]["inbox_problem"], 10, "an inbox problem"
        )
        assert "does not exist" in problem["problem"]
        assert "INBOX MISSING since" in inboxd("status", "--config", str(config)).stdout
        inbox.mkdir()
        data = random.Random(1).randbytes(5 * KiB)
        (inbox / "first.csv").write_bytes(data)
        wait_all_done(config, 1, 30)
        wait_for(lambda: status_json(config)["daemon"]["inbox_problem"] is None, 10, "clear")
    assert _delivered(sandbox) == {"first.csv": [data]}
    assert len(log_records(log, ("watcher.inbox_missing",))) == 1
    assert len(log_records(log, ("watcher.inbox_back",))) == 1


def test_inbox_deleted_while_running_is_not_a_crash(sandbox: Sandbox, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
    (inbox / "before.csv").write_bytes(b"before")
    with daemon(config, log) as proc:
        wait_all_done(config, 1, 30)
        shutil.rmtree(inbox)
        wait_for(lambda: status_json(config)["daemon"]["inbox_problem"], 10, "inbox_problem")
        beat = status_json(config)["daemon"]["heartbeat_at"]
        # The heartbeat used to die measuring free space on the missing folder (exit 1).
        wait_for(lambda: status_json(config)["daemon"]["heartbeat_at"] > beat + 2, 10, "beats")
        assert proc.poll() is None
        inbox.mkdir()
        (inbox / "after.csv").write_bytes(b"after")
        wait_all_done(config, 2, 30)
    assert sorted(_delivered(sandbox)) == ["after.csv", "before.csv"]
    assert not log_records(log, ("watcher.events_failed",))


def _bind(source: Path, target: Path) -> bool:
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, check=False)


@pytest.mark.parametrize("how", ["moved away", "unmounted"])
def test_queued_files_wait_for_their_folder_instead_of_failing(
    sandbox: Sandbox, tmp_path: Path, how: str
) -> None:
    inbox, away = tmp_path / "inbox", tmp_path / "away"
    disk = tmp_path / "disk"  # the filesystem mounted on the inbox ("unmounted")
    inbox.mkdir()
    disk.mkdir()
    try:
        if how == "unmounted":
            mounted = (
                os.geteuid() == 0
                and not subprocess.run(
                    ["mount", "-t", "tmpfs", "tmpfs", str(disk)], capture_output=True
                ).returncode
            )
            if not mounted:
                pytest.skip("mounting needs root (and CAP_SYS_ADMIN)")
            assert _bind(disk, inbox)
        config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
        files = {f"f{i}.csv": random.Random(i).randbytes(4 * KiB) for i in range(4)}
        for name, data in files.items():
            (inbox / name).write_bytes(data)
        sandbox.faults.api_503_rate = 1.0  # an outage: the files stay queued
        with daemon(config, log):
            wait_for(lambda: len(jobs(config)) == len(files), 30, "the jobs")
            if how == "moved away":
                os.rename(inbox, away)
            else:
                _umount(inbox)
            wait_for(lambda: status_json(config)["daemon"]["inbox_problem"], 10, "the problem")
            sandbox.faults.api_503_rate = 0.0  # the service is back; the folder is not
            time.sleep(3)  # a bounded look: nothing may fail (or upload) meanwhile
            states = Counter(str(j.state) for j in jobs(config))
            assert states == {"queued": len(files)}, describe_unfinished(config)
            if how == "moved away":
                os.rename(away, inbox)
            else:
                assert _bind(disk, inbox)
            wait_all_done(config, len(files), 60)
        delivered = _delivered(sandbox)
        assert delivered == {name: [data] for name, data in files.items()}
        assert not [j for j in jobs(config) if str(j.state) == "failed"]
        back = log_records(log, ("watcher.inbox_back",))
        assert len(back) == 1 and back[0]["replaced"] is False
    finally:
        if how == "unmounted":
            _umount(inbox)
            _umount(disk)


# ---------------------------------------------------------------------------- the state file


@pytest.mark.parametrize("what", ["deleted", "replaced", "wal deleted"])
def test_state_database_lost_under_the_daemon_stops_it_with_75(
    sandbox: Sandbox, tmp_path: Path, what: str
) -> None:
    config, log = _config(tmp_path, sandbox), tmp_path / "daemon.log"
    db = load_settings(config).state.path
    (tmp_path / "inbox" / "a.csv").write_bytes(b"delivered before")
    proc = start_daemon(config, log)
    try:
        wait_all_done(config, 1, 30)
        wait_for(lambda: db.with_name("state.db-wal").exists(), 10, "the WAL")
        if what == "deleted":
            db.unlink()
        elif what == "replaced":
            other = db.with_name("restored.db")
            shutil.copy(db, other)
            os.replace(other, db)
        else:
            db.with_name("state.db-wal").unlink()
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            stop_daemon(proc)
    assert code == 75
    lost = log_records(log, ("state.lost",))
    assert len(lost) == 1
    text = log.read_text()
    assert "was deleted while inboxd was running" in text or "was replaced" in text
    assert "Traceback" not in text
    # What the unit then does: start again, on the database now at that path.
    with daemon(config, log):
        wait_for(lambda: status_json(config)["daemon"]["alive"], 30, "the restarted daemon")


def test_check_says_how_completeness_is_decided(sandbox: Sandbox, tmp_path: Path) -> None:
    config = _config(tmp_path, sandbox)
    ok = inboxd("check", "--config", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    line = next(x for x in ok.stdout.splitlines() if "completeness:" in x)
    assert "inotify close events" in line and "/proc" in line
    (tmp_path / "inbox").rmdir()
    missing = inboxd("check", "--config", str(config))
    assert missing.returncode == 0  # a warning: the daemon starts and waits for it
    line = next(x for x in missing.stdout.splitlines() if "completeness:" in x)
    assert line.startswith("! ") and "is not a folder (yet)" in line
