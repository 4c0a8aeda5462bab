"""Tests for daemon.intake.watcher: real files in tmp_path, real inotify events.

Negative assertions ("x is never reported") use a sentinel: a file written *after* the thing
under test. Events are handled in order and every file waits the same settle time, so once the
sentinel is reported anything that was going to be reported already has been.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import watchfiles

from daemon.intake.watcher import MAX_BATCH, Watcher, WatchRules
from daemon.state import FileIdentity

SETTLE = 0.2


class Recorder:
    """Collects what the watcher reports."""

    def __init__(self) -> None:
        self.batches: list[list[FileIdentity]] = []
        self.ready_at: dict[str, list[float]] = {}
        self.skips: list[tuple[str, str]] = []
        self.settling: list[tuple[str, int | None]] = []

    async def on_ready(self, batch: list[FileIdentity]) -> None:
        self.batches.append(list(batch))
        now = time.time()
        for f in batch:
            self.ready_at.setdefault(f.rel, []).append(now)

    async def on_skip(self, rel: str, reason: str) -> None:
        self.skips.append((rel, reason))

    async def on_settling(self, rel: str, size: int | None) -> None:
        self.settling.append((rel, size))

    @property
    def ready(self) -> list[FileIdentity]:
        return [f for batch in self.batches for f in batch]

    def rels(self) -> list[str]:
        return [f.rel for f in self.ready]

    def times(self, rel: str) -> int:
        return len(self.ready_at.get(rel, []))

    def last(self, rel: str) -> FileIdentity:
        return [f for f in self.ready if f.rel == rel][-1]

    def skip_reasons(self, rel: str) -> list[str]:
        return [reason for r, reason in self.skips if r == rel]

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        with anyio.fail_after(timeout):
            while not cond():
                await anyio.sleep(0.01)

    async def wait_ready(self, *rels: str, timeout: float = 5.0) -> None:
        await self.wait_for(lambda: all(rel in self.ready_at for rel in rels), timeout)


@asynccontextmanager
async def watching(
    inbox: Path,
    rec: Recorder,
    rules: WatchRules | None = None,
    *,
    clock: Callable[[], float] = time.time,
    cls: type[Watcher] = Watcher,
) -> AsyncIterator[Watcher]:
    watcher = cls(
        inbox,
        rules or WatchRules(settle_seconds=SETTLE),
        on_ready=rec.on_ready,
        on_skip=rec.on_skip,
        on_settling=rec.on_settling,
        clock=clock,
    )
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(watcher.run)
        yield watcher
        cancelled_at = time.monotonic()
        tg.cancel_scope.cancel()
    # Stopping must not wait for watchfiles' 5 s timeout.
    assert time.monotonic() - cancelled_at < 1.0


def write(path: Path | bytes, data: bytes = b"x") -> os.stat_result:
    p = Path(os.fsdecode(path))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p.stat()


def make_old(path: Path) -> None:
    os.utime(path, (time.time() - 3600, time.time() - 3600))


def later(seconds: float) -> Callable[[], float]:
    """A clock running ahead, so files just written count as old (ctime cannot be set back)."""
    return lambda: time.time() + seconds


def inotify_watches() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every folder any inotify instance of this process watches, as the
    kernel lists them in /proc/self/fdinfo (whoever added the watch, watchfiles included)."""
    out: set[tuple[int, int]] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        for m in re.finditer(r"^inotify wd:\S+ ino:([0-9a-f]+) sdev:([0-9a-f]+)", info, re.M):
            sdev = int(m[2], 16)  # the kernel's dev_t: major << 20 | minor
            out.add((os.makedev(sdev >> 20, sdev & 0xFFFFF), int(m[1], 16)))
    return out


def dev_ino(path: Path | str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def real_dirs(root: Path) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of root and every folder under it, not following symlinks."""
    out = {dev_ino(root)}
    for base, dirs, _ in os.walk(root):
        out |= {dev_ino(os.path.join(base, d)) for d in dirs if not os.path.islink(f"{base}/{d}")}
    return out


def root_and_top_dirs() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of / and the folders in it: what a walk of / would watch first."""
    return {dev_ino("/")} | {dev_ino(e.path) for e in os.scandir("/") if e.is_dir()}


def not_under(paths: list[str], root: Path) -> list[str]:
    """The paths that do not resolve to root or something under it."""
    base = os.path.realpath(root) + "/"
    return [p for p in paths if not (os.path.realpath(p) + "/").startswith(base)]


def max_queued_events() -> int:
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")


def identity(inbox: Path, rel: str) -> FileIdentity:
    st = os.stat(os.path.join(inbox, rel))
    return FileIdentity(rel=rel, size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    return path


# ---------------------------------------------------------------------------- start-up


async def test_old_files_at_startup_are_ready_before_started(inbox: Path) -> None:
    write(inbox / "a.csv", b"hello")
    write(inbox / "sub" / "b.mf4", b"")
    rec = Recorder()
    async with watching(inbox, rec, clock=later(60)) as w:
        # Handed over before started(): nothing to wait for.
        assert sorted(rec.rels()) == ["a.csv", "sub/b.mf4"]
        assert rec.last("a.csv") == identity(inbox, "a.csv")
        assert w.pending() == 0
        assert rec.settling == []


async def test_fresh_file_at_startup_waits_for_settle(inbox: Path) -> None:
    st = write(inbox / "fresh.csv", b"12345")
    rec = Recorder()
    async with watching(inbox, rec) as w:
        assert rec.ready == []
        assert w.pending() == 1
        assert rec.settling == [("fresh.csv", 5)]
        await rec.wait_ready("fresh.csv")
        assert rec.ready_at["fresh.csv"][0] >= st.st_ctime + SETTLE - 0.01
        assert w.pending() == 0
        assert rec.settling == [("fresh.csv", 5), ("fresh.csv", None)]


async def test_missing_inbox_at_start_is_waited_for(tmp_path: Path) -> None:
    inbox = tmp_path / "later"
    rec = Recorder()
    async with watching(inbox, rec) as w:  # started at once, although there is no folder
        trouble = w.inbox_trouble()
        assert trouble is not None and trouble.hold and "does not exist" in trouble.reason
        state = w.inbox_state()
        assert state is not None and "does not exist" in str(state["problem"])
        inbox.mkdir()
        write(inbox / "first.csv")
        await rec.wait_ready("first.csv", timeout=10)
        assert w.inbox_trouble() is None and w.inbox_state() is None
        write(inbox / "sub" / "live.csv")  # events flow from the folder that appeared
        await rec.wait_ready("sub/live.csv")


async def test_5000_files_at_startup_handed_over_in_batches(inbox: Path) -> None:
    for d in range(10):
        sub = inbox / f"d{d}"
        sub.mkdir()
        for i in range(500):
            (sub / f"f{i}.csv").write_bytes(b"x")
    rec = Recorder()
    started = time.monotonic()
    async with watching(inbox, rec, clock=later(60)):
        elapsed = time.monotonic() - started
        assert len(rec.ready) == 5000
        assert len(set(rec.rels())) == 5000
    assert elapsed < 3.0
    assert all(1 <= len(b) <= MAX_BATCH for b in rec.batches)
    assert len(rec.batches) >= 5


async def test_files_due_in_the_same_tick_share_one_call(inbox: Path) -> None:
    for i in range(1500):
        (inbox / f"f{i}.csv").write_bytes(b"x")
    # A clock running behind makes every timestamp look "in the future"; the watcher then
    # counts from its own first look, which is the same moment for the whole scan chunk.
    rec = Recorder()
    async with watching(inbox, rec, clock=later(-30)) as w:
        assert w.pending() == 1500
        assert len(rec.settling) == 1500
        await rec.wait_for(lambda: len(rec.ready) == 1500)
    # One tick: one call per MAX_BATCH files, not one call per file.
    assert [len(b) for b in rec.batches] == [1000, 500]
    assert w.pending() == 0


# ---------------------------------------------------------------------------- while running


async def test_file_dropped_while_running(inbox: Path) -> None:
    rec = Recorder()
    async with watching(inbox, rec) as w:
        written = time.time()
        st = write(inbox / "drop.csv", b"abc")
        await rec.wait_ready("drop.csv")
        reported = rec.ready_at["drop.csv"][0]
        assert rec.last("drop.csv") == FileIdentity("drop.csv", 3, st.st_mtime_ns, st.st_ino)
        assert reported >= st.st_ctime + SETTLE - 0.01
        assert reported - written < SETTLE + 1.0
        assert rec.settling == [("drop.csv", 3), ("drop.csv", None)]
        assert w.pending() == 0


async def test_growing_file_reported_once_with_final_size(inbox: Path) -> None:
    settle = 0.5  # well above the 0.1 s append interval, even on a busy machine
    rec = Recorder()
    path = inbox / "growing.mf4"
    async with watching(inbox, rec, WatchRules(settle_seconds=settle)):
        with path.open("wb") as f:
            for _ in range(10):
                f.write(b"x" * 1000)
                f.flush()
                last_write = time.time()
                await anyio.sleep(0.1)
        await rec.wait_ready("growing.mf4")
        write(inbox / "sentinel.csv")
        await rec.wait_ready("sentinel.csv")
    assert rec.times("growing.mf4") == 1
    assert rec.last("growing.mf4").size == 10_000
    assert rec.ready_at["growing.mf4"][0] >= last_write + settle - 0.05
    # Announced once when it started waiting (not on every write), released when reported.
    sizes = [size for rel, size in rec.settling if rel == "growing.mf4"]
    assert len(sizes) == 2
    assert sizes[0] is not None and sizes[0] < 10_000
    assert sizes[1] is None


async def test_changed_file_reported_again(inbox: Path) -> None:
    rec = Recorder()
    path = inbox / "a.csv"
    async with watching(inbox, rec):
        first = write(path, b"one")
        await rec.wait_ready("a.csv")

        # ctime-only change: reported again. A chmod looks exactly like an in-place rewrite
        # that restored the mtime (issue 10, point 2): only the ctime tells, so it is a new
        # version (docs/reliability.md, the ledger's identity rules).
        path.chmod(0o600)
        await rec.wait_for(lambda: rec.times("a.csv") == 2)
        assert rec.last("a.csv").ctime_ns == path.stat().st_ctime_ns

        # Replaced by a new file (new inode), like an atomic save: reported again.
        write(inbox / "a.csv.tmp", b"two")
        os.replace(inbox / "a.csv.tmp", path)
        await rec.wait_for(lambda: rec.times("a.csv") == 3)
        second = rec.last("a.csv")
        assert second.inode != first.st_ino
        assert second == identity(inbox, "a.csv")

        # Appended in place: new size, reported again.
        with path.open("ab") as f:
            f.write(b"three")
        await rec.wait_for(lambda: rec.times("a.csv") == 4)
        assert rec.last("a.csv").size == 8


async def test_empty_file_settles_and_is_reported(inbox: Path) -> None:
    rec = Recorder()
    async with watching(inbox, rec):
        st = write(inbox / "empty.csv", b"")
        await rec.wait_ready("empty.csv")
    assert rec.last("empty.csv").size == 0
    assert rec.ready_at["empty.csv"][0] >= st.st_ctime + SETTLE - 0.01


async def test_file_vanishing_while_settling_is_dropped(inbox: Path) -> None:
    rec = Recorder()
    async with watching(inbox, rec, WatchRules(settle_seconds=0.5)) as w:
        write(inbox / "gone.csv", b"abc")
        await rec.wait_for(lambda: ("gone.csv", 3) in rec.settling)
        (inbox / "gone.csv").unlink()
        await rec.wait_for(lambda: ("gone.csv", None) in rec.settling)
        assert w.pending() == 0
        write(inbox / "sentinel.csv")
        await rec.wait_ready("sentinel.csv")
    assert "gone.csv" not in rec.rels()
    assert rec.skips == []


async def test_new_nested_directories_are_picked_up(inbox: Path, outside: Path) -> None:
    rec = Recorder()
    async with watching(inbox, rec):
        # mkdir -p then write at once: the file may exist before inotify watches the folder.
        (inbox / "a" / "b" / "c").mkdir(parents=True)
        write(inbox / "a" / "b" / "c" / "deep.csv")
        # A whole tree moved in produces a single event, for its top folder.
        write(outside / "tree" / "x" / "one.csv")
        write(outside / "tree" / "two.csv")
        (outside / "tree").rename(inbox / "tree")
        await rec.wait_ready("a/b/c/deep.csv", "tree/x/one.csv", "tree/two.csv")
        # Folders created later inside the moved tree are watched too.
        write(inbox / "tree" / "x" / "y" / "three.csv")
        await rec.wait_ready("tree/x/y/three.csv")
    assert sorted(rec.rels()) == sorted(
        ["a/b/c/deep.csv", "tree/x/one.csv", "tree/two.csv", "tree/x/y/three.csv"]
    )


async def test_folder_moved_out_is_forgotten_and_a_new_one_scanned(
    inbox: Path, outside: Path
) -> None:
    rec = Recorder()
    async with watching(inbox, rec) as w:
        write(inbox / "d" / "sub" / "a.csv")
        await rec.wait_ready("d/sub/a.csv")
        # One event, for the folder: everything known under it goes.
        (inbox / "d").rename(outside / "d_old")
        await rec.wait_for(lambda: "d/sub/a.csv" not in w._reported and "d/sub" not in w._dirs)
        # Another tree moved in under the same name is walked afresh.
        write(outside / "other" / "sub" / "b.csv")
        (outside / "other").rename(inbox / "d")
        await rec.wait_ready("d/sub/b.csv")
    assert sorted(rec.rels()) == ["d/sub/a.csv", "d/sub/b.csv"]


async def test_files_in_a_new_folder_before_its_watch_are_found(inbox: Path) -> None:
    # No periodic rescan: only the events and the scan of each new folder can find the files.
    # A folder is watched only once its creation event has been handled, so files written
    # into it right away (and folders under it) exist before its watch: the scan finds them.
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0)
    rec = Recorder()
    expected = []
    async with watching(inbox, rec, rules) as w:
        for i in range(20):
            for sub in ("", "/x", "/x/y"):
                for j in range(10):
                    rel = f"new{i}{sub}/{j}.csv"
                    write(inbox / rel)
                    expected.append(rel)
        await rec.wait_ready(*expected, timeout=20)
        assert w._scan_count == 1
    assert sorted(rec.rels()) == sorted(expected)


async def test_folder_renamed_inside_is_watched_under_its_new_name(
    inbox: Path, outside: Path
) -> None:
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0)
    rec = Recorder()
    async with watching(inbox, rec, rules):
        write(inbox / "a" / "sub" / "one.csv")
        await rec.wait_ready("a/sub/one.csv")
        (inbox / "a").rename(inbox / "b")
        await rec.wait_ready("b/sub/one.csv")
        # The watches moved with the folders: a new file is reported under the new name.
        write(inbox / "b" / "sub" / "two.csv")
        await rec.wait_ready("b/sub/two.csv")
        if sys.platform.startswith("linux"):
            assert real_dirs(inbox) <= inotify_watches()
        # Moved out of the inbox, a folder is no longer watched where it went (a watch
        # follows the folder, not its name).
        (inbox / "b").rename(outside / "gone")
        write(outside / "gone" / "sub" / "late.csv")
        write(inbox / "sentinel.csv")
        await rec.wait_ready("sentinel.csv")
        if sys.platform.startswith("linux"):
            assert not real_dirs(outside) & inotify_watches()
    assert sorted(rec.rels()) == ["a/sub/one.csv", "b/sub/one.csv", "b/sub/two.csv", "sentinel.csv"]


async def test_inbox_removed_and_made_again_is_watched_again(inbox: Path) -> None:
    # No periodic rescan: only restarting the event source (which rescans) finds the file.
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0)
    rec = Recorder()
    async with watching(inbox, rec, rules):
        write(inbox / "sub" / "before.csv")
        await rec.wait_ready("sub/before.csv")
        shutil.rmtree(inbox)
        await anyio.sleep(0.3)  # the source fails, and fails again while the folder is missing
        write(inbox / "sub" / "after.csv")
        await rec.wait_ready("sub/after.csv", timeout=10)
        write(inbox / "sub" / "live.csv")  # events flow again, from the new folder
        await rec.wait_ready("sub/live.csv")


async def test_copy2_of_old_file_waits_for_settle(inbox: Path, outside: Path) -> None:
    src = outside / "old.csv"
    write(src, b"data" * 100)
    make_old(src)
    rec = Recorder()
    async with watching(inbox, rec):
        shutil.copy2(src, inbox / "old.csv")
        st = (inbox / "old.csv").stat()
        assert st.st_mtime < time.time() - 3000  # mtime says old...
        await rec.wait_ready("old.csv")
    # ...but ctime says just written: it must still settle.
    assert rec.ready_at["old.csv"][0] >= st.st_ctime + SETTLE - 0.01
    assert ("old.csv", 400) in rec.settling


# ---------------------------------------------------------------------------- filters


EXCLUDED = [
    ".hidden.csv",
    "x.tmp",
    "y.part",
    "z.partial",
    "~$report.xlsx",
    "v.swp",
    "dl.crdownload",
    ".dotdir/inner.csv",
    "sub/.dotdir2/inner.csv",
    "sub/.hidden2.csv",
    "UPPER.TMP",
]


async def test_default_excludes(inbox: Path) -> None:
    for rel in EXCLUDED:
        write(inbox / rel)
    rec = Recorder()
    async with watching(inbox, rec):
        assert rec.rels() == []
        assert rec.settling == []
        for rel in EXCLUDED:
            write(inbox / "live" / rel)
        write(inbox / "live" / "sentinel.csv")
        await rec.wait_ready("live/sentinel.csv")
    assert rec.rels() == ["live/sentinel.csv"]
    assert rec.skips == []
    assert {rel for rel, _ in rec.settling} == {"live/sentinel.csv"}


async def test_include_globs(tmp_path: Path) -> None:
    names = [
        "a.csv",
        "B.CSV",
        "b.txt",
        "runs/x.mf4",
        "runs/d/e/y.mf4",
        "other/z.mf4",
        "nested/c.csv",
    ]
    expected = ["B.CSV", "a.csv", "nested/c.csv", "runs/d/e/y.mf4", "runs/x.mf4"]
    rules = WatchRules(settle_seconds=SETTLE, include=("*.csv", "runs/**/*.mf4"))
    at_start, live = tmp_path / "at_start", tmp_path / "live"
    for rel in names:
        write(at_start / rel)
    live.mkdir()
    rec = Recorder()
    async with watching(at_start, rec, rules, clock=later(60)):
        assert sorted(rec.rels()) == expected
    rec = Recorder()
    async with watching(live, rec, rules):
        for rel in names:
            write(live / rel)
        write(live / "zz_sentinel.csv")
        await rec.wait_ready("zz_sentinel.csv")
    assert sorted(rec.rels()) == [*expected, "zz_sentinel.csv"]


async def test_ignore_dirs(inbox: Path) -> None:
    archive = inbox / "archive"
    write(archive / "done.csv")
    write(inbox / "keep.csv")
    rules = WatchRules(settle_seconds=SETTLE, ignore_dirs=(archive,))
    rec = Recorder()
    async with watching(inbox, rec, rules, clock=later(60)) as w:
        assert rec.rels() == ["keep.csv"]
        write(archive / "sub" / "new.csv")
        # The uploader moves finished files into the archive: forgotten, not re-reported.
        (inbox / "keep.csv").rename(archive / "keep.csv")
        write(inbox / "sentinel.csv")
        await rec.wait_ready("sentinel.csv")
        assert "keep.csv" not in w._reported
    assert sorted(rec.rels()) == ["keep.csv", "sentinel.csv"]


# ---------------------------------------------------------------------------- special files


async def test_symlinks_skipped_by_default(inbox: Path, outside: Path) -> None:
    write(inbox / "target.csv")
    write(outside / "secret.csv")
    write(outside / "dir" / "in_dir.csv")
    (inbox / "inside.csv").symlink_to(inbox / "target.csv")
    (inbox / "outside.csv").symlink_to(outside / "secret.csv")
    (inbox / "loop1.csv").symlink_to(inbox / "loop2.csv")
    (inbox / "loop2.csv").symlink_to(inbox / "loop1.csv")
    (inbox / "dangling.csv").symlink_to(inbox / "nothing.csv")
    (inbox / "linkdir").symlink_to(outside / "dir")
    links = ["dangling.csv", "inside.csv", "linkdir", "loop1.csv", "loop2.csv", "outside.csv"]
    rec = Recorder()
    async with watching(inbox, rec, clock=later(60)):
        assert rec.rels() == ["target.csv"]
        assert sorted(rec.skips) == [(rel, "symlink (follow_symlinks is off)") for rel in links]
        # inotify (notify crate) does follow folder symlinks and reports writes behind them;
        # the watcher must still never report anything through one.
        write(outside / "dir" / "later.csv")
        (inbox / "live.csv").symlink_to(outside / "secret.csv")
        write(inbox / "sentinel.csv")
        await rec.wait_ready("sentinel.csv")
    assert sorted(rec.rels()) == ["sentinel.csv", "target.csv"]
    assert rec.skip_reasons("live.csv") == ["symlink (follow_symlinks is off)"]
    assert len(rec.skips) == len(links) + 1


async def test_symlinks_followed_only_to_files_inside(inbox: Path, outside: Path) -> None:
    write(inbox / "data" / "target.csv", b"12345")
    write(outside / "secret.csv")
    write(outside / "dir" / "in_dir.csv")
    (inbox / "inside.csv").symlink_to(inbox / "data" / "target.csv")
    (inbox / "relative.csv").symlink_to(Path("data") / "target.csv")
    (inbox / "outside.csv").symlink_to(outside / "secret.csv")
    (inbox / "escape.csv").symlink_to(Path("..") / "outside" / "secret.csv")
    (inbox / "loop1.csv").symlink_to(inbox / "loop2.csv")
    (inbox / "loop2.csv").symlink_to(inbox / "loop1.csv")
    (inbox / "dangling.csv").symlink_to(inbox / "nothing.csv")
    (inbox / "linkdir").symlink_to(outside / "dir")
    (inbox / "innerdir").symlink_to(inbox / "data")
    rules = WatchRules(settle_seconds=SETTLE, follow_symlinks=True)
    rec = Recorder()
    async with watching(inbox, rec, rules, clock=later(60)):
        pass
    target = identity(inbox, "data/target.csv")
    assert sorted(rec.rels()) == ["data/target.csv", "inside.csv", "relative.csv"]
    assert rec.last("inside.csv") == FileIdentity(
        "inside.csv", target.size, target.mtime_ns, target.inode
    )
    reasons = dict(rec.skips)
    assert "outside the inbox" in reasons["outside.csv"]
    assert str(outside / "secret.csv") in reasons["outside.csv"]
    assert "outside the inbox" in reasons["escape.csv"]
    assert "loop" in reasons["loop1.csv"] and "loop" in reasons["loop2.csv"]
    assert "dangling" in reasons["dangling.csv"]
    assert "nothing.csv" in reasons["dangling.csv"]
    assert "outside the inbox" in reasons["linkdir"]  # never entered, whatever it holds
    assert "points to a folder" in reasons["innerdir"]  # its files are reported as themselves
    assert "linkdir/in_dir.csv" not in rec.rels()
    assert len(rec.skips) == 7


async def test_symlink_dropped_while_running_is_followed(inbox: Path, outside: Path) -> None:
    write(outside / "secret.csv")
    rules = WatchRules(settle_seconds=SETTLE, follow_symlinks=True)
    rec = Recorder()
    async with watching(inbox, rec, rules):
        write(inbox / "t.csv")
        (inbox / "link.csv").symlink_to(inbox / "t.csv")
        (inbox / "out.csv").symlink_to(outside / "secret.csv")
        await rec.wait_ready("t.csv", "link.csv")
        await rec.wait_for(lambda: bool(rec.skip_reasons("out.csv")))
    assert "outside the inbox" in rec.skip_reasons("out.csv")[0]


@linux_only
@pytest.mark.parametrize("follow", [False, True])
async def test_symlink_to_root_is_never_listed_or_watched(
    inbox: Path, outside: Path, follow: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(inbox / "real" / "deeper" / "a.csv")
    write(outside / "dir" / "secret.csv")
    (inbox / "root").symlink_to("/")
    (inbox / "outdir").symlink_to(Path("..") / "outside" / "dir")
    # Every folder the watcher opens or lists, from any thread.
    opened: list[str] = []
    real_open, real_scandir = os.open, os.scandir

    def spy_open(path: str, flags: int, *args: int, **kwargs: int) -> int:
        opened.append(os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def spy_scandir(path: str | int = ".") -> os._ScandirIterator[str]:
        if not isinstance(path, int):
            opened.append(os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "scandir", spy_scandir)
    rules = WatchRules(settle_seconds=SETTLE, follow_symlinks=follow, rescan_seconds=0.1)
    rec = Recorder()
    async with watching(inbox, rec, rules, clock=later(60)) as w:
        assert rec.rels() == ["real/deeper/a.csv"]
        (inbox / "live_root").symlink_to("/")  # one dropped while running, too
        scans = w._scan_count
        await rec.wait_for(lambda: w._scan_count >= scans + 2)
        write(inbox / "sentinel.csv")
        await rec.wait_ready("sentinel.csv")
        watched = inotify_watches()
    # Before the checks below list folders themselves. /proc is read on purpose: the writer
    # check (daemon.intake.writers) lists processes' open files there.
    listed = [p for p in opened if p != "/proc" and not p.startswith("/proc/")]
    assert real_dirs(inbox) <= watched
    assert not (watched & (root_and_top_dirs() | real_dirs(outside)))
    assert listed
    assert not_under(listed, inbox) == []
    assert sorted(rec.rels()) == ["real/deeper/a.csv", "sentinel.csv"]
    assert {rel for rel, _ in rec.skips} == {"root", "outdir", "live_root"}


@linux_only
async def test_event_queue_overflow_rescans(inbox: Path) -> None:
    limit = max_queued_events()
    if limit > 50_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many files to overflow it")
    # Each file is two events (create, close): the kernel's queue overflows while the loop is
    # blocked. No periodic rescan: only the overflow can bring back what was dropped.
    n = limit // 2 + 500
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0)
    rec = Recorder()
    async with watching(inbox, rec, rules) as w:
        for i in range(n):
            (inbox / f"f{i:05d}.csv").write_bytes(b"")  # the loop is blocked meanwhile
        # The overflow's rescan reports files as it goes and counts itself when it is done:
        # wait for both (the count may lag the last report).
        await rec.wait_for(lambda: len(rec.ready) == n and w._scan_count >= 2, timeout=60)
    assert len(set(rec.rels())) == n


async def test_fifo_skipped_once_and_never_opened(inbox: Path) -> None:
    os.mkfifo(inbox / "pipe.csv")
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0.1)
    rec = Recorder()
    async with watching(inbox, rec, rules) as w:
        assert rec.skips == [("pipe.csv", "is a FIFO, not a regular file")]
        os.mkfifo(inbox / "live_pipe")
        await rec.wait_for(lambda: bool(rec.skip_reasons("live_pipe")))
        # Rescans see both FIFOs again; the reason is reported only once.
        scans = w._scan_count
        await rec.wait_for(lambda: w._scan_count >= scans + 2)
    assert rec.skips == [
        ("pipe.csv", "is a FIFO, not a regular file"),
        ("live_pipe", "is a FIFO, not a regular file"),
    ]
    assert rec.ready == []
    assert rec.settling == []


async def test_unreadable_subfolder_is_skipped(
    inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root can list any folder, so simulate the EACCES that a chmod 000 folder gives (the
    # watcher opens a folder to list it).
    write(inbox / "locked" / "a.csv")
    write(inbox / "open" / "b.csv")
    real_open = os.open

    def fake_open(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if os.fspath(path).endswith("/locked"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    rec = Recorder()
    async with watching(inbox, rec, clock=later(60)):
        pass
    assert rec.rels() == ["open/b.csv"]
    assert rec.skips == [("locked", "cannot list folder: Permission denied")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can list a chmod 000 folder")
async def test_unreadable_subfolder_real_permissions(inbox: Path) -> None:
    write(inbox / "locked" / "a.csv")
    write(inbox / "open" / "b.csv")
    (inbox / "locked").chmod(0)
    try:
        rec = Recorder()
        async with watching(inbox, rec, clock=later(60)):
            pass
    finally:
        (inbox / "locked").chmod(0o755)
    assert rec.rels() == ["open/b.csv"]
    assert rec.skips == [("locked", "cannot list folder: Permission denied")]


# ---------------------------------------------------------------------------- odd names


ODD = [
    "with space.csv",
    "ünïcødé_数据.csv",
    "x" * 251 + ".csv",  # 255 bytes, the longest name ext4 allows
    "/".join(["lvl"] * 100) + "/deep.csv",  # 100 folders down
]
BAD = b"bad\xff\xfe name.csv"  # not valid UTF-8


async def test_odd_names_at_startup(inbox: Path) -> None:
    for rel in ODD:
        write(inbox / rel)
    write(os.fsencode(inbox) + b"/" + BAD)
    rec = Recorder()
    async with watching(inbox, rec, clock=later(60)):
        pass
    assert sorted(rec.rels()) == sorted([*ODD, os.fsdecode(BAD)])
    assert rec.last(os.fsdecode(BAD)) == identity(inbox, os.fsdecode(BAD))


async def test_odd_names_while_running(inbox: Path) -> None:
    rec = Recorder()
    async with watching(inbox, rec):
        for rel in ODD:
            write(inbox / "live" / rel)
        await rec.wait_ready(*[f"live/{rel}" for rel in ODD])
    assert sorted(rec.rels()) == sorted(f"live/{rel}" for rel in ODD)


async def test_non_utf8_name_while_running(inbox: Path) -> None:
    # watchfiles cannot represent such a name and fails the whole batch: the watcher restarts
    # it and rescans, so the file is still found and later files still come through.
    rec = Recorder()
    async with watching(inbox, rec):
        write(os.fsencode(inbox) + b"/" + BAD, b"abc")
        await rec.wait_ready(os.fsdecode(BAD))
        write(inbox / "after.csv")
        await rec.wait_ready("after.csv")
    assert rec.last(os.fsdecode(BAD)).size == 3
    assert rec.times(os.fsdecode(BAD)) == 1


# ---------------------------------------------------------------------------- safety net


class NoEventsWatcher(Watcher):
    """A watcher whose event stream never delivers anything: every event is 'lost'."""

    @asynccontextmanager
    async def _events(
        self, stop: anyio.Event
    ) -> AsyncGenerator[AsyncIterator[set[tuple[watchfiles.Change, str]]], None]:
        async def nothing() -> AsyncGenerator[set[tuple[watchfiles.Change, str]], None]:
            await stop.wait()
            no_changes: list[set[tuple[watchfiles.Change, str]]] = []
            for batch in no_changes:  # an async generator that never yields
                yield batch

        yield nothing()


async def test_rescan_finds_files_whose_events_were_lost(inbox: Path) -> None:
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0.2)
    write(inbox / "before.csv")
    rec = Recorder()
    async with watching(inbox, rec, rules, cls=NoEventsWatcher) as w:
        write(inbox / "missed.csv", b"abc")
        await rec.wait_ready("before.csv", "missed.csv")
        assert rec.last("missed.csv") == identity(inbox, "missed.csv")
        # Later rescans see the same files unchanged: not reported again.
        scans = w._scan_count
        await rec.wait_for(lambda: w._scan_count >= scans + 2)
        assert rec.times("missed.csv") == 1 and rec.times("before.csv") == 1
        # A deletion whose event was lost is noticed too, so memory does not grow forever.
        (inbox / "missed.csv").unlink()
        await rec.wait_for(lambda: "missed.csv" not in w._reported)


async def test_no_periodic_rescan_when_disabled(inbox: Path) -> None:
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0)
    rec = Recorder()
    async with watching(inbox, rec, rules, cls=NoEventsWatcher) as w:
        write(inbox / "missed.csv")
        # Proving that nothing happens takes a bounded wait.
        await anyio.sleep(0.5)
        assert w._scan_count == 1  # the start-up scan only
    assert rec.ready == []


async def test_force_polling(inbox: Path) -> None:
    rules = WatchRules(settle_seconds=SETTLE, force_polling=True, rescan_seconds=0)
    write(inbox / "sub" / "before.csv")
    rec = Recorder()
    async with watching(inbox, rec, rules):
        # Our own scans poll (watchfiles' poller would follow symlinked folders): no watches.
        if sys.platform.startswith("linux"):
            assert not real_dirs(inbox) & inotify_watches()
        write(inbox / "polled.csv")
        write(inbox / "new" / "deep" / "polled.csv")
        await rec.wait_ready("sub/before.csv", "polled.csv", "new/deep/polled.csv")
        (inbox / "polled.csv").write_bytes(b"changed")
        await rec.wait_for(lambda: rec.times("polled.csv") == 2)
    assert rec.last("polled.csv").size == 7


class WatchfilesWatcher(Watcher):
    """The watcher as it runs where there is no inotify: events from watchfiles."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._events_kind = "watchfiles"


async def test_watchfiles_events_where_there_is_no_inotify(inbox: Path) -> None:
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0)
    rec = Recorder()
    async with watching(inbox, rec, rules, cls=WatchfilesWatcher) as w:
        write(inbox / "drop.csv")
        (inbox / "a" / "b").mkdir(parents=True)
        write(inbox / "a" / "b" / "deep.csv")
        await rec.wait_ready("drop.csv", "a/b/deep.csv")
        assert w._scan_count == 1


# ---------------------------------------------------------------------------- shutdown


async def test_cancel_while_files_settle(inbox: Path) -> None:
    rec = Recorder()
    async with watching(inbox, rec, WatchRules(settle_seconds=30)) as w:
        write(inbox / "slow.csv")
        await rec.wait_for(lambda: w.pending() == 1)
    # watching() asserts the prompt exit; nothing is reported half-way.
    assert rec.ready == []


async def test_cancel_during_startup_scan(inbox: Path) -> None:
    for i in range(1000):
        (inbox / f"f{i}.csv").write_bytes(b"x")
    rec = Recorder()
    w = Watcher(inbox, WatchRules(settle_seconds=SETTLE), on_ready=rec.on_ready)
    started = time.monotonic()
    with anyio.move_on_after(0.01):
        await w.run()
    assert time.monotonic() - started < 1.0
    # A second run starts from scratch and works.
    async with anyio.create_task_group() as tg:
        await tg.start(w.run)
        tg.cancel_scope.cancel()


async def test_run_twice_at_once_is_refused(inbox: Path) -> None:
    rec = Recorder()
    async with watching(inbox, rec) as w:
        with pytest.raises(RuntimeError):
            await w.run()


# ---------------------------------------------------------------------------- writers
# The writer is this test process (an open file handle): inotify sees its writes and close,
# /proc/self/fd shows it holding the file. tests/test_intake.py does the same with writer
# processes and the whole daemon.


@linux_only
async def test_file_held_open_is_not_taken_while_its_writer_pauses(inbox: Path) -> None:
    rec = Recorder()
    async with watching(inbox, rec) as w:
        with (inbox / "run.csv").open("wb", buffering=0) as fh:
            fh.write(b"a" * 10)
            # The pauses are the scenario: far longer than settle_seconds, the file held open.
            await anyio.sleep(4 * SETTLE)
            assert rec.ready == [] and w.pending() == 1
            fh.write(b"b" * 10)
            await anyio.sleep(4 * SETTLE)
            assert rec.ready == []
        await rec.wait_ready("run.csv")
    assert rec.times("run.csv") == 1
    assert rec.last("run.csv") == identity(inbox, "run.csv")
    assert rec.last("run.csv").size == 20


@linux_only
async def test_truncated_by_path_is_no_open_writer(inbox: Path) -> None:
    # truncate(2) modifies a file that nobody has open: IN_MODIFY without IN_OPEN must not
    # make the watcher wait for a close that never comes.
    rec = Recorder()
    async with watching(inbox, rec) as w:
        write(inbox / "cut.csv", b"0123456789")
        await rec.wait_ready("cut.csv")
        os.truncate(inbox / "cut.csv", 3)
        await rec.wait_for(lambda: rec.times("cut.csv") == 2)
        assert w.pending() == 0
    assert rec.last("cut.csv").size == 3


@linux_only
async def test_modified_under_a_reader_is_taken_once_the_reader_closes(inbox: Path) -> None:
    # An open followed by a modify looks like a writer; the reader's close (our own upload's,
    # when a file is changed while it is uploaded) says it was not one.
    rec = Recorder()
    async with watching(inbox, rec) as w:
        write(inbox / "read.csv", b"0123456789")
        await rec.wait_ready("read.csv")
        with (inbox / "read.csv").open("rb"):
            os.truncate(inbox / "read.csv", 4)
            await anyio.sleep(3 * SETTLE)
        await rec.wait_for(lambda: rec.times("read.csv") == 2)
        assert w.pending() == 0
    assert rec.last("read.csv").size == 4


@linux_only
async def test_reopened_to_append_after_a_pause_is_one_file(inbox: Path) -> None:
    rec = Recorder()
    path = inbox / "log.csv"
    async with watching(inbox, rec):
        with path.open("wb", buffering=0) as fh:
            fh.write(b"first\n")
            await anyio.sleep(3 * SETTLE)
        # Closed after a pause: it must now stay unchanged for settle_seconds; reopened at
        # once, and the first append only comes after settle_seconds (only the open tells).
        with path.open("ab", buffering=0) as fh:
            await anyio.sleep(3 * SETTLE)
            assert rec.ready == []
            fh.write(b"second\n")
        await rec.wait_ready("log.csv")
    assert rec.times("log.csv") == 1 and rec.last("log.csv").size == 13


@linux_only
@pytest.mark.parametrize("polling", [False, True])
async def test_file_open_for_writing_at_startup_waits_for_its_close(
    inbox: Path, polling: bool
) -> None:
    path = inbox / "open.csv"
    fh = path.open("wb", buffering=0)
    try:
        fh.write(b"half")
        write(inbox / "closed.csv")
        rules = WatchRules(settle_seconds=SETTLE, force_polling=polling, rescan_seconds=0)
        rec = Recorder()
        # The clock runs ahead: both files look long settled, only /proc tells them apart.
        async with watching(inbox, rec, rules, clock=later(60)) as w:
            assert rec.rels() == ["closed.csv"]
            assert w.pending() == 1
            await anyio.sleep(3 * SETTLE)
            assert rec.rels() == ["closed.csv"]
            fh.write(b" and the rest")
            fh.close()
            # Without events (polling) /proc is asked again every 2 s.
            await rec.wait_ready("open.csv", timeout=10)
    finally:
        fh.close()
    assert rec.times("open.csv") == 1 and rec.last("open.csv").size == 17


@linux_only
async def test_held_file_is_taken_after_the_writer_timeout(inbox: Path) -> None:
    rules = WatchRules(settle_seconds=SETTLE, writer_timeout=1.0)
    rec = Recorder()
    async with watching(inbox, rec, rules):
        with (inbox / "stuck.csv").open("wb", buffering=0) as fh:
            fh.write(b"never closed")
            written = time.time()
            await rec.wait_ready("stuck.csv", timeout=10)  # while it is still open
            assert rec.ready_at["stuck.csv"][0] - written >= 1.0 - 0.05
    assert rec.last("stuck.csv").size == 12


@linux_only
async def test_writer_timeout_zero_takes_open_files_by_settle_alone(inbox: Path) -> None:
    rules = WatchRules(settle_seconds=SETTLE, writer_timeout=0)
    rec = Recorder()
    async with watching(inbox, rec, rules):
        with (inbox / "open.csv").open("wb", buffering=0) as fh:
            fh.write(b"data")
            await rec.wait_ready("open.csv")


_SCAN_AS_OTHER_USER = """
import json, os, sys
from pathlib import Path
from daemon.intake import writers
fh = open(sys.argv[1], "wb")
st = os.fstat(fh.fileno())
seen = writers.scan(None)
line = writers.visibility(Path(sys.argv[2]), "inotify", 3600.0)
print(json.dumps({"mine": (st.st_dev, st.st_ino) in seen.writing, "hidden": seen.hidden,
                  "complete": seen.complete, "ok": line.ok, "text": line.text}), flush=True)
sys.stdin.read()
"""


def _as_nobody(*args: str) -> subprocess.Popen[bytes] | None:
    """A Python process as user nobody (daemon.intake.writers needs only the standard library), or
    None when no interpreter here is reachable for that user (a venv under /root)."""
    from tests.support.runner import REPO

    for python in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        kw: dict[str, Any] = {"cwd": "/", "user": "nobody", "group": "nogroup"}
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
        try:
            subprocess.run(
                [python, "-c", "import daemon.intake.writers"], env=env, check=True, **kw
            )
        except (OSError, subprocess.CalledProcessError):
            continue
        return subprocess.Popen(
            [python, "-c", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, **kw
        )
    return None


@linux_only
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_proc_pass_as_a_user_sees_only_its_own_writers() -> None:
    from daemon.intake import writers

    folder = Path(tempfile.mkdtemp(prefix="inboxd-writers-"))
    try:
        folder.chmod(0o777)
        target = folder / "held.csv"
        proc = _as_nobody(_SCAN_AS_OTHER_USER, str(target), str(folder))
        if proc is None:
            pytest.skip("no Python interpreter that user nobody may run")
        try:
            assert proc.stdout is not None
            seen = json.loads(proc.stdout.readline())
            # Its own writer is found; root's processes (pid 1 at least) cannot be read, and
            # the line says so instead of claiming to see every writer.
            assert seen["mine"] is True
            assert seen["hidden"] > 0 and seen["complete"] is False
            assert "processes cannot be read by uid 65534" in seen["text"]
            # Root sees the processes of every user, that one's writer included (a process
            # may still be protected from it, e.g. a VM's init: that is counted, not hidden).
            st = target.stat()
            as_root = writers.scan({(st.st_dev, st.st_ino)})
            assert as_root.writing == {(st.st_dev, st.st_ino)}
            assert as_root.hidden < seen["hidden"]
        finally:
            proc.communicate(b"", timeout=10)
    finally:
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------- the inbox folder


@pytest.mark.parametrize("source", ["inotify", "polling", "watchfiles"])
async def test_inbox_deleted_is_waited_for_and_its_new_folder_scanned(
    inbox: Path, tmp_path: Path, source: str
) -> None:
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0, force_polling=source == "polling")
    cls = WatchfilesWatcher if source == "watchfiles" else Watcher
    # rm -rf + mkdir may give the new folder the old one's inode number: only inotify's
    # IN_DELETE_SELF then tells it is a new folder. Without inotify, a new folder that
    # existed next to the old one (a restore moved into place) is told by its inode.
    fresh = tmp_path / "fresh"
    if source != "inotify":
        fresh.mkdir()
    rec = Recorder()
    async with watching(inbox, rec, rules, cls=cls) as w:
        write(inbox / "before.csv")
        await rec.wait_ready("before.csv")
        shutil.rmtree(inbox)
        await rec.wait_for(lambda: w.inbox_state() is not None, timeout=5)
        trouble = w.inbox_trouble()
        assert trouble is not None and trouble.hold and "does not exist" in trouble.reason
        if source == "inotify":
            os.mkdir(inbox)
        else:
            os.rename(fresh, inbox)
        write(inbox / "after.csv")  # maybe before the folder is watched: the scan finds it
        await rec.wait_ready("after.csv", timeout=10)
        assert w.inbox_state() is None
        # A new folder: a file missing from it is given time to be put back.
        trouble = w.inbox_trouble()
        assert trouble is not None and not trouble.hold and "replaced" in trouble.reason
        assert 0 < trouble.wait <= 30
        write(inbox / "live.csv")
        await rec.wait_ready("live.csv")
    assert rec.times("before.csv") == 1


async def test_inbox_moved_away_and_back_is_the_same_folder(inbox: Path, tmp_path: Path) -> None:
    away = tmp_path / "away"
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0)
    rec = Recorder()
    async with watching(inbox, rec, rules) as w:
        write(inbox / "kept.csv")
        await rec.wait_ready("kept.csv")
        os.rename(inbox, away)
        await rec.wait_for(lambda: w.inbox_state() is not None, timeout=5)
        write(away / "while_away.csv")  # not watched from the inbox's path: not reported
        await anyio.sleep(3 * SETTLE)
        assert "while_away.csv" not in rec.ready_at
        os.rename(away, inbox)
        await rec.wait_ready("while_away.csv", timeout=10)  # the full scan on its return
        assert w.inbox_trouble() is None  # the same folder: nothing to wait for
        write(inbox / "live.csv")
        await rec.wait_ready("live.csv")
    assert rec.times("kept.csv") == 1 and rec.times("while_away.csv") == 1


async def test_inbox_swapped_for_another_folder(inbox: Path, tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    write(new / "waiting.csv")
    make_old(new / "waiting.csv")
    rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0)
    rec = Recorder()
    async with watching(inbox, rec, rules) as w:
        os.rename(inbox, old)
        os.rename(new, inbox)
        await rec.wait_ready("waiting.csv", timeout=10)
        trouble = w.inbox_trouble()
        assert trouble is not None and not trouble.hold
        write(old / "stale.csv")  # the old folder is no longer watched
        write(inbox / "live.csv")
        await rec.wait_ready("live.csv")
    assert "stale.csv" not in rec.ready_at


def _mount(*args: str) -> None:
    import subprocess

    subprocess.run(["mount", *args], check=True, capture_output=True)


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", str(path)], check=False, capture_output=True)


@linux_only
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
async def test_inbox_unmounted_is_waited_for_not_taken_as_empty(
    inbox: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        _mount("-t", "tmpfs", "tmpfs", str(disk))
    except Exception as exc:  # a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount here: {exc}")
    try:
        _mount("--bind", str(disk), str(inbox))
        write(inbox / "on_disk.csv")
        rules = WatchRules(settle_seconds=SETTLE, rescan_seconds=0)
        rec = Recorder()
        async with watching(inbox, rec, rules, clock=later(60)) as w:
            assert rec.rels() == ["on_disk.csv"]
            _umount(inbox)
            await rec.wait_for(lambda: w.inbox_state() is not None, timeout=5)
            trouble = w.inbox_trouble()
            assert trouble is not None and trouble.hold and "not mounted" in trouble.reason
            write(inbox / "on_mount_point.csv")  # the empty folder it was mounted on
            write(disk / "written_meanwhile.csv")
            await anyio.sleep(3 * SETTLE)
            assert rec.rels() == ["on_disk.csv"]
            _mount("--bind", str(disk), str(inbox))
            await rec.wait_ready("written_meanwhile.csv", timeout=10)
            assert w.inbox_trouble() is None  # the same filesystem again
        assert rec.times("on_disk.csv") == 1
        assert "on_mount_point.csv" not in rec.ready_at
    finally:
        _umount(inbox)
        _umount(disk)
