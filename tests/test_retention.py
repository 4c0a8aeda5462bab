"""Archive retention against real files, a real queue and a simulated (or real tmpfs) disk."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from daemon.engine.retention import EMPTY_DIR_GRACE_SECONDS, Retention, disk_free
from daemon.state import FileIdentity, JobState, NewJob, Queue

KiB = 1024
MiB = 1024 * KiB
DAY = 86_400.0


# ---------------------------------------------------------------------------------------------
# helpers


@dataclass
class FakeDisk:
    """A filesystem reading that follows real deletions: free = base + sizes of gone files."""

    total: int
    base_free: int
    files: dict[Path, int] = field(default_factory=dict)
    reads: int = 0

    def __call__(self, path: Path) -> tuple[int, int]:
        self.reads += 1
        gone = sum(size for p, size in self.files.items() if not p.exists())
        return self.base_free + gone, self.total


@dataclass
class Env:
    tmp: Path
    queue: Queue
    inbox: Path
    archive: Path

    async def archived(
        self,
        rel: str,
        size: int = 4 * KiB,
        *,
        state: JobState = JobState.DONE,
        suffix: bool = False,
        ledger: bool = False,
        job_rel: str | None = None,
        job_size: int | None = None,
        job_mtime_delta: int = 0,
    ) -> Path:
        """A file in the archive and the job the daemon would have left for it.

        ``suffix`` names it ``<rel>.<job_id>`` as the disposal does on a clash; ``ledger`` prunes
        the DONE job into the ledger; ``job_*`` make the job's identity differ from the file.
        """
        staging = self.tmp / "staging" / rel
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.write_bytes(os.urandom(size))
        st = staging.stat()
        identity = FileIdentity(
            rel=job_rel if job_rel is not None else rel,
            size=job_size if job_size is not None else size,
            mtime_ns=st.st_mtime_ns + job_mtime_delta,
            inode=st.st_ino,
        )
        (job_id,) = await self.queue.enqueue_many(
            [NewJob(identity=identity, stream_id=1, remote_name="x", metadata={})]
        )
        await drive(self.queue, job_id, state)
        if state is JobState.DONE:
            await self.queue.set_after_upload(job_id, "archived")
        if ledger:
            assert await self.queue.prune(0, now=time.time() + 1) >= 1
            assert await self.queue.get(job_id) is None
        dst = self.archive / (f"{rel}.{job_id}" if suffix else rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, dst)  # as the disposal does: keeps mtime, sets ctime
        return dst

    def retention(self, **kw: object) -> Retention:
        args: dict[str, object] = {
            "queue": self.queue,
            "inbox": self.inbox,
            "max_age_days": None,
            "min_free_bytes": None,
            "min_free_percent": None,
            "warn_free_percent": None,
        }
        args.update(kw)
        return Retention(self.archive, **args)  # type: ignore[arg-type]


async def drive(q: Queue, job_id: int, state: JobState) -> None:
    if state is JobState.QUEUED:
        return
    claimed = await q.claim("w", 60)
    assert claimed is not None and claimed.id == job_id
    await q.mark_uploaded(job_id)
    if state is JobState.IMPORTING:
        return
    await q.record_import(
        job_id,
        status="x",
        progress=None,
        message="m",
        terminal=True,
        failed=state is JobState.FAILED,
    )


def later(days: float) -> float:
    """A clock reading ``days`` from now (ctime cannot be set, so time is moved instead)."""
    return time.time() + days * DAY


def files_in(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()
    )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    inbox.mkdir()
    archive.mkdir()
    async with await Queue.open(tmp_path / "state" / "state.db") as q:
        yield Env(tmp_path, q, inbox, archive)


# ---------------------------------------------------------------------------------------------
# age


async def test_age_prunes_only_old_confirmed_files(env: Env) -> None:
    old = [await env.archived("a/old1.csv"), await env.archived("old2.csv", ledger=True)]
    await anyio.sleep(0.05)  # ctime has a coarse clock; keep old and new apart
    middle = time.time()
    await anyio.sleep(0.05)
    new = [await env.archived("a/new.csv")]
    retention = env.retention(max_age_days=7, clock=lambda: middle + 7 * DAY)

    report = await retention.once()

    assert sorted(report.removed) == ["a/old1.csv", "old2.csv"]
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in new)
    assert report.freed_bytes == 8 * KiB
    assert report.scanned == 3
    assert not report.disk_low and not report.still_low
    # A second pass has nothing more to do.
    assert (await retention.once()).removed == []


async def test_job_id_suffix_added_by_the_disposal_is_understood(env: Env) -> None:
    plain = await env.archived("run.csv")
    clashed = await env.archived("run.csv", size=8 * KiB, suffix=True)
    ledgered = await env.archived("deep/x/run.csv", suffix=True, ledger=True)
    # A name that merely ends in digits and was uploaded under that very name.
    numbered = await env.archived("data.2024")
    assert clashed.name.startswith("run.csv.") and clashed.name != "run.csv"

    report = await env.retention(max_age_days=1, clock=lambda: later(2)).once()

    assert sorted(report.removed) == sorted(
        str(p.relative_to(env.archive)) for p in (plain, clashed, ledgered, numbered)
    )
    assert files_in(env.archive) == []


# ---------------------------------------------------------------------------------------------
# free space


async def test_free_space_prunes_oldest_first_until_the_threshold(env: Env) -> None:
    paths = []
    for i in range(5):
        paths.append(await env.archived(f"d{i % 2}/f{i}.bin", size=100 * KiB))
        await anyio.sleep(0.03)  # distinct ctimes: "oldest" is well defined
    disk = FakeDisk(total=10 * MiB, base_free=500 * KiB, files={p: 100 * KiB for p in paths})
    retention = env.retention(min_free_bytes=700 * KiB, free_space=disk)

    report = await retention.once()

    assert report.removed == ["d0/f0.bin", "d1/f1.bin"]
    assert [p.exists() for p in paths] == [False, False, True, True, True]
    assert report.free_bytes == 700 * KiB
    assert report.total_bytes == 10 * MiB
    assert report.freed_bytes == 200 * KiB
    assert not report.still_low
    # Enough free now: the next pass removes nothing (and need not even walk the archive).
    again = await retention.once()
    assert again.removed == [] and again.scanned == 0


async def test_free_space_percent_threshold(env: Env) -> None:
    paths = []
    for i in range(4):
        paths.append(await env.archived(f"p{i}.bin", size=256 * KiB))
        await anyio.sleep(0.03)
    disk = FakeDisk(total=10 * MiB, base_free=1 * MiB, files={p: 256 * KiB for p in paths})
    # 15 % of 10 MiB = 1.5 MiB: two files of 256 KiB bring 1 MiB to 1.5 MiB.
    report = await env.retention(min_free_percent=15, free_space=disk).once()
    assert report.removed == ["p0.bin", "p1.bin"]
    assert report.free_percent == pytest.approx(15.0)


async def test_age_and_free_space_together(env: Env) -> None:
    old = await env.archived("old.bin", size=64 * KiB)
    await anyio.sleep(0.05)
    middle = time.time()
    await anyio.sleep(0.05)
    young = [await env.archived(f"young{i}.bin", size=64 * KiB) for i in range(3)]
    disk = FakeDisk(total=10 * MiB, base_free=1 * MiB, files={p: 64 * KiB for p in [old, *young]})
    retention = env.retention(
        max_age_days=30,
        min_free_bytes=1 * MiB + 128 * KiB,
        free_space=disk,
        clock=lambda: middle + 30 * DAY,
    )
    report = await retention.once()
    # Age takes the old one first; space then needs one more, the oldest young one.
    assert report.removed == ["old.bin", "young0.bin"]


async def test_a_disk_that_reports_freed_space_late_is_not_emptied(env: Env) -> None:
    # btrfs/ZFS may show freed blocks only seconds later: a reading that never moves must
    # not make one pass remove everything; retention counts what it removed itself.
    paths = []
    for i in range(6):
        paths.append(await env.archived(f"z{i}.bin", size=64 * KiB))
        await anyio.sleep(0.03)
    disk = FakeDisk(total=10 * MiB, base_free=1 * MiB)  # files={}: never sees a deletion
    report = await env.retention(min_free_bytes=1 * MiB + 128 * KiB, free_space=disk).once()
    assert report.removed == ["z0.bin", "z1.bin"]
    assert not report.still_low


async def test_unconfirmed_files_are_never_removed_even_on_a_full_disk(env: Env) -> None:
    kept = [
        env.archive / "by-hand.csv",  # never uploaded at all
        await env.archived("bigger.csv", job_size=1),  # the upload had another size
        await env.archived("touched.csv", job_mtime_delta=-1),  # changed after upload
        await env.archived("failed.csv", state=JobState.FAILED),  # import failed
        await env.archived("importing.csv", state=JobState.IMPORTING),  # not imported yet
        await env.archived("moved.csv", job_rel="elsewhere/moved.csv"),  # another path
        await env.archived("partial.csv.inboxd-partial", job_rel="partial.csv"),
        # Last: a queued job would be the next one claimed by the helper.
        await env.archived("queued.csv", state=JobState.QUEUED),
    ]
    kept[0].write_bytes(b"mine")
    disk = FakeDisk(total=10 * MiB, base_free=0)
    retention = env.retention(
        max_age_days=0,
        min_free_bytes=5 * MiB,
        min_free_percent=50,
        warn_free_percent=10,
        free_space=disk,
        clock=lambda: later(365),
    )

    with capture_logs() as logs:
        report = await retention.once()
        await retention.once()

    assert report.removed == []
    assert all(p.exists() for p in kept)
    assert report.still_low and report.disk_low
    assert report.unconfirmed == len(kept)  # due by age and for space: counted once
    events = [e["event"] for e in logs]
    assert events.count("retention.still_low") == 1  # once per episode, not every pass
    assert events.count("disk.low") == 1
    # Each unconfirmed file is told once (at debug), not on every pass.
    told = [e["path"] for e in logs if e["event"] == "retention.unconfirmed"]
    assert sorted(told) == sorted(str(p.relative_to(env.archive)) for p in kept)
    assert all(e["log_level"] == "debug" for e in logs if e["event"] == "retention.unconfirmed")


async def test_a_file_replaced_after_the_walk_is_not_removed(env: Env) -> None:
    path = await env.archived("swap.csv")
    retention = env.retention(max_age_days=0, clock=lambda: later(1))
    original_confirm = retention._is_confirmed

    async def confirm_then_swap(f):  # type: ignore[no-untyped-def]
        ok = await original_confirm(f)
        path.unlink()
        path.write_bytes(b"new content")  # new inode and size under the same name
        return ok

    retention._is_confirmed = confirm_then_swap  # type: ignore[method-assign]
    report = await retention.once()
    assert report.removed == []
    assert path.read_bytes() == b"new content"


# ---------------------------------------------------------------------------------------------
# disk-low warning


async def test_disk_low_flag_and_log_once_per_crossing(env: Env) -> None:
    disk = FakeDisk(total=100 * MiB, base_free=5 * MiB)
    retention = env.retention(warn_free_percent=10, free_space=disk)

    with capture_logs() as logs:
        first = await retention.once()
        second = await retention.once()
        disk.base_free = 50 * MiB
        recovered = await retention.once()
        disk.base_free = 1 * MiB
        again = await retention.once()

    assert (first.disk_low, second.disk_low, recovered.disk_low, again.disk_low) == (
        True,
        True,
        False,
        True,
    )
    assert first.free_bytes == 5 * MiB and first.total_bytes == 100 * MiB
    assert first.free_percent == pytest.approx(5.0)
    assert first.as_dict()["disk_low"] is True
    assert retention.last_report == again
    low = [e for e in logs if e["event"] == "disk.low"]
    assert len(low) == 2
    assert low[0]["log_level"] == "warning"
    assert low[0]["free_bytes"] == 5 * MiB
    assert low[0]["free_percent"] == pytest.approx(5.0)
    assert [e["event"] for e in logs if e["event"].startswith("disk.")] == [
        "disk.low",
        "disk.ok",
        "disk.low",
    ]


async def test_no_warning_threshold_means_never_low(env: Env) -> None:
    disk = FakeDisk(total=100, base_free=0)
    report = await env.retention(free_space=disk).once()
    assert not report.disk_low and report.free_bytes == 0


# ---------------------------------------------------------------------------------------------
# symlinks and the archive's edges


async def test_symlinks_are_neither_followed_nor_removed(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious.csv"
    target.write_bytes(b"x" * 100)
    st = target.stat()
    # Jobs that would confirm the link targets, were they followed.
    for rel in ("link.csv", "linked-dir/precious.csv"):
        (job_id,) = await env.queue.enqueue_many(
            [
                NewJob(
                    identity=FileIdentity(rel, st.st_size, st.st_mtime_ns, st.st_ino),
                    stream_id=1,
                    remote_name="x",
                    metadata={},
                )
            ]
        )
        await drive(env.queue, job_id, JobState.DONE)
    (env.archive / "link.csv").symlink_to(target)
    (env.archive / "linked-dir").symlink_to(outside, target_is_directory=True)
    (env.archive / "dangling").symlink_to(tmp_path / "nowhere")
    real = await env.archived("real.csv")

    disk = FakeDisk(total=10 * MiB, base_free=0)
    report = await env.retention(
        max_age_days=0, min_free_bytes=1 * MiB, free_space=disk, clock=lambda: later(10)
    ).once()

    assert report.removed == ["real.csv"]
    assert not real.exists()
    assert target.read_bytes() == b"x" * 100
    assert (env.archive / "link.csv").is_symlink()
    assert (env.archive / "linked-dir").is_symlink()
    assert (env.archive / "dangling").is_symlink()
    assert report.scanned == 1  # only the real file was a regular file


async def test_a_directory_swapped_for_a_symlink_is_not_followed(env: Env, tmp_path: Path) -> None:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    path = await env.archived("sub/file.csv")
    retention = env.retention(max_age_days=0, clock=lambda: later(1))
    original_confirm = retention._is_confirmed

    async def confirm_then_swap_dir(f):  # type: ignore[no-untyped-def]
        ok = await original_confirm(f)
        # After the walk: the folder becomes a symlink to a look-alike outside the archive.
        os.replace(path, victim_dir / "file.csv")
        (env.archive / "sub").rmdir()
        (env.archive / "sub").symlink_to(victim_dir, target_is_directory=True)
        return ok

    retention._is_confirmed = confirm_then_swap_dir  # type: ignore[method-assign]
    report = await retention.once()
    assert report.removed == []
    assert (victim_dir / "file.csv").exists()


async def test_empty_dirs_left_behind_are_removed_but_never_the_root(env: Env) -> None:
    await env.archived("a/b/c/deep.csv")
    await env.archived("a/side.csv")
    keep = env.archive / "k" / "mine.txt"
    keep.parent.mkdir()
    keep.write_text("not uploaded")
    await env.archived("k/gone.csv")
    fresh = env.archive / "fresh"
    fresh.mkdir()  # just made: the disposal may be about to move a file in
    stale = env.archive / "stale" / "deeper"
    stale.mkdir(parents=True)
    long_ago = time.time() - 2 * EMPTY_DIR_GRACE_SECONDS
    os.utime(stale, (long_ago, long_ago))
    os.utime(stale.parent, (long_ago, long_ago))

    report = await env.retention(max_age_days=0).once()

    assert sorted(report.removed) == ["a/b/c/deep.csv", "a/side.csv", "k/gone.csv"]
    assert sorted(p.name for p in env.archive.iterdir()) == ["fresh", "k"]
    assert keep.exists()
    # Everything removed: the root stays.
    keep.unlink()
    await env.retention(max_age_days=0).once()
    assert env.archive.is_dir()


async def test_missing_archive_is_not_an_error(env: Env) -> None:
    env.archive.rmdir()
    disk = FakeDisk(total=100, base_free=1)
    report = await env.retention(max_age_days=1, min_free_bytes=50, free_space=disk).once()
    assert report.removed == [] and report.scanned == 0 and report.still_low


async def test_non_utf8_names(env: Env) -> None:
    rel = os.fsdecode(b"raw/\xff\xfe.bin")
    path = await env.archived(rel)
    report = await env.retention(max_age_days=0, clock=lambda: later(1)).once()
    assert report.removed == [rel]
    assert not path.exists()


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    common: dict[str, object] = {
        "queue": None,
        "inbox": tmp_path,
        "max_age_days": None,
        "min_free_bytes": None,
        "min_free_percent": None,
        "warn_free_percent": None,
    }
    for bad in (
        {"max_age_days": -1},
        {"min_free_bytes": -5},
        {"min_free_percent": 120},
        {"warn_free_percent": -1},
        {"max_age_days": float("nan")},
    ):
        with pytest.raises(ValueError, match="retention"):
            Retention(tmp_path, **{**common, **bad})  # type: ignore[arg-type]


async def test_run_passes_periodically_and_survives_errors(env: Env) -> None:
    calls = 0

    def flaky(path: Path) -> tuple[int, int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(5, "Input/output error")
        return 100, 100

    retention = env.retention(free_space=flaky)
    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            await tg.start(retention.run, 0.01)
            with anyio.fail_after(5):
                while retention.last_report is None:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert any(e["event"] == "retention.error" for e in logs)
    assert retention.last_report is not None
    assert retention.last_report.free_bytes == 100


def test_disk_free_reads_the_real_filesystem(tmp_path: Path) -> None:
    free, total = disk_free(tmp_path)
    assert 0 <= free <= total and total > 0


# ---------------------------------------------------------------------------------------------
# a real small tmpfs


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted in tmp_path (skipped where mounting is not permitted)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "inboxd-test", str(mnt)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


async def test_on_a_real_small_tmpfs(small_tmpfs: Path, tmp_path: Path) -> None:
    inbox, archive = small_tmpfs / "inbox", small_tmpfs / "archive"
    inbox.mkdir()
    archive.mkdir()
    async with await Queue.open(tmp_path / "state.db") as q:  # state on another filesystem
        env = Env(small_tmpfs, q, inbox, archive)
        paths = []
        for i in range(5):
            paths.append(await env.archived(f"day{i}/f.bin", size=512 * KiB))
            await anyio.sleep(0.03)
        mine = archive / "mine.bin"
        mine.write_bytes(os.urandom(512 * KiB))
        free_before, total = disk_free(inbox)
        assert total == 4 * MiB
        assert free_before <= 1 * MiB + 64 * KiB  # 3 MiB of files on a 4 MiB disk

        retention = env.retention(min_free_percent=45, warn_free_percent=60)
        report = await retention.once()

    # 45 % of 4 MiB = 1.8 MiB: two 512 KiB files give it back, the oldest two.
    assert report.removed == ["day0/f.bin", "day1/f.bin"]
    assert report.free_bytes >= 0.45 * total
    assert report.free_bytes - free_before == 1 * MiB
    assert report.disk_low  # 50 % < 60 %
    assert not report.still_low
    assert mine.exists() and all(p.exists() for p in paths[2:])
    assert not (archive / "day0").exists()


async def test_archive_on_another_filesystem_is_not_pruned_for_the_inbox(
    small_tmpfs: Path, tmp_path: Path
) -> None:
    inbox = small_tmpfs / "inbox"  # the inbox's disk is the small one...
    inbox.mkdir()
    archive = tmp_path / "archive"  # ...the archive is elsewhere: deleting there frees nothing
    archive.mkdir()
    async with await Queue.open(tmp_path / "state.db") as q:
        env = Env(tmp_path, q, inbox, archive)
        old = await env.archived("old.bin")
        await anyio.sleep(0.05)
        middle = time.time()
        await anyio.sleep(0.05)
        young = await env.archived("young.bin")
        (inbox / "filler").write_bytes(b"\0" * (3 * MiB + 512 * KiB))
        retention = env.retention(
            max_age_days=1, min_free_percent=50, clock=lambda: middle + 1 * DAY
        )
        report = await retention.once()
    assert report.removed == ["old.bin"]  # by age only
    assert young.exists() and not old.exists()
    assert report.still_low
