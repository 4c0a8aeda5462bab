"""Tests for daemon.state.queue against real SQLite files in tmp_path (no mocks)."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import closing
from pathlib import Path
from typing import TypeVar

import aiosqlite
import anyio
import pytest

from daemon.state import (
    MIGRATIONS,
    FileIdentity,
    ImportRecord,
    Job,
    JobState,
    NewJob,
    Queue,
    QueueError,
    Stage,
)
from daemon.state import queue as queue_module

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# helpers


def ident(rel: str, size: int = 10, mtime_ns: int = 1, inode: int = 1) -> FileIdentity:
    return FileIdentity(rel=rel, size=size, mtime_ns=mtime_ns, inode=inode)


def new(rel: str, size: int = 10, mtime_ns: int = 1, inode: int = 1) -> NewJob:
    return NewJob(
        identity=ident(rel, size, mtime_ns, inode),
        stream_id=7,
        remote_name=Path(rel).name,
        metadata={"source": "test", "rel": rel},
    )


def many(n: int, prefix: str = "f") -> list[NewJob]:
    return [new(f"{prefix}/{i:06d}.csv", size=i + 1, mtime_ns=i, inode=i + 1) for i in range(n)]


async def get(q: Queue, job_id: int) -> Job:
    job = await q.get(job_id)
    assert job is not None
    return job


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "sub" / "inboxd.db"


@pytest.fixture
async def q(db_path: Path) -> AsyncIterator[Queue]:
    async with await Queue.open(db_path) as opened:
        yield opened


def raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection for inspecting (or hand-making) database files."""
    return sqlite3.connect(path, isolation_level=None)


# ---------------------------------------------------------------------------------------------
# schema, files, migrations


async def test_open_creates_private_dirs_file_and_schema(db_path: Path) -> None:
    async with await Queue.open(db_path) as q:
        await q.enqueue_many([new("a.csv")])
        assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
        # SQLite gives the WAL the main file's mode: no world-readable copy of the state.
        wal = db_path.with_name(db_path.name + "-wal")
        assert stat.S_IMODE(os.stat(wal).st_mode) == 0o600
        for directory in (db_path.parent, db_path.parent.parent):
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700

    con = raw(db_path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master")}
        assert {"jobs", "parts", "ledger", "daemon", "settling"} <= tables
    finally:
        con.close()


async def test_reopen_keeps_data(db_path: Path) -> None:
    async with await Queue.open(db_path) as q:
        (job_id,) = await q.enqueue_many([new("a.csv")])
    async with await Queue.open(db_path) as q:
        job = await get(q, job_id)
        assert job.identity == ident("a.csv")
        assert job.metadata == {"source": "test", "rel": "a.csv"}


async def test_newer_schema_is_refused(db_path: Path) -> None:
    async with await Queue.open(db_path):
        pass
    con = raw(db_path)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    con.close()
    for readonly in (False, True):
        with pytest.raises(QueueError, match=r"newer inboxd .*upgrade inboxd or move"):
            await Queue.open(db_path, readonly=readonly)


async def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database, just some text\n" * 200)
    for readonly in (False, True):
        with pytest.raises(QueueError, match=r"state\.db is not a valid SQLite database"):
            await Queue.open(path, readonly=readonly)
    assert path.read_bytes().startswith(b"this is not")  # never touched


async def test_migrates_hand_made_v0_database(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    con = raw(db_path)
    con.execute("CREATE TABLE unrelated (x)")  # a v0 file: exists, user_version 0
    con.close()
    async with await Queue.open(db_path) as q:
        assert await q.enqueue_many([new("a.csv")]) == [1]
    con = raw(db_path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    con.close()


async def test_adding_a_migration_upgrades_v1_database(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await Queue.open(db_path) as q:
        (job_id,) = await q.enqueue_many([new("a.csv")])

    async def v2(db: aiosqlite.Connection) -> None:
        await db.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")

    monkeypatch.setattr(queue_module, "MIGRATIONS", [*MIGRATIONS, v2])
    async with await Queue.open(db_path) as q:
        assert (await get(q, job_id)).identity.rel == "a.csv"
    con = raw(db_path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
    assert con.execute("SELECT priority FROM jobs").fetchall() == [(0,)]
    con.close()


async def test_v1_database_gains_target_columns(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue written by the first release keeps its jobs and learns their target."""
    with monkeypatch.context() as m:
        m.setattr(queue_module, "MIGRATIONS", MIGRATIONS[:1])
        async with await Queue.open(db_path):
            pass
    con = raw(db_path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    con.execute(  # a job as the first release wrote it
        "INSERT INTO jobs (rel, size, mtime_ns, inode, state, stage, stream_id, dataset_name,"
        " metadata, upload_key, next_attempt_at, created_at, updated_at)"
        " VALUES (?, 1, 2, 3, 'queued', 'new', 1, 'a.csv', '{}', 'k', 0, 0, 0)",
        (b"a.csv",),
    )
    con.commit()
    job_id = con.execute("SELECT id FROM jobs").fetchone()[0]
    con.close()
    async with await Queue.open(db_path) as q:
        job = await get(q, job_id)
        assert (job.target, job.target_refs) == ("marple-db", {})
        await q.save_progress(job_id, target_refs={"source_id": 7})
        assert (await get(q, job_id)).target_refs == {"source_id": 7}


async def test_failed_migration_leaves_database_untouched(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await Queue.open(db_path):
        pass

    async def broken_v2(db: aiosqlite.Connection) -> None:
        await db.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER")
        await db.execute("THIS IS NOT SQL")

    monkeypatch.setattr(queue_module, "MIGRATIONS", [*MIGRATIONS, broken_v2])
    with pytest.raises(QueueError):
        await Queue.open(db_path)
    con = raw(db_path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    columns = {row[1] for row in con.execute("PRAGMA table_info(jobs)")}
    assert "priority" not in columns
    con.close()


async def test_readonly_needs_an_existing_current_database(tmp_path: Path) -> None:
    with pytest.raises(QueueError, match="no state database"):
        await Queue.open(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    empty = tmp_path / "empty.db"
    raw(empty).close()
    with pytest.raises(QueueError, match="start the daemon once"):
        await Queue.open(empty, readonly=True)


async def test_readonly_reads_while_writer_writes_and_refuses_writes(db_path: Path) -> None:
    async with await Queue.open(db_path) as writer:
        await writer.enqueue_many(many(10))
        async with await Queue.open(db_path, readonly=True) as reader:
            assert reader.readonly
            assert (await reader.counts())["queued"] == 10
            job = await writer.claim("w", 60)
            assert job is not None
            await writer.enqueue_many(many(5, prefix="g"))
            counts = await reader.counts()
            assert (counts["queued"], counts["uploading"]) == (14, 1)
            assert [j.id for j in await reader.list_jobs([JobState.UPLOADING])] == [job.id]
            with pytest.raises(QueueError, match="read-only"):
                await reader.enqueue_many(many(1, prefix="h"))
            with pytest.raises(QueueError, match="read-only"):
                await reader.claim("r", 60)
            with pytest.raises(QueueError, match="read-only"):
                await reader.vacuum_if_worthwhile()
            # The writer is unaffected by the reader.
            await writer.save_progress(job.id, stage=Stage.CREATING)
        assert (await writer.counts())["queued"] == 14


async def test_closed_queue_raises(db_path: Path) -> None:
    q = await Queue.open(db_path)
    await q.close()
    await q.close()  # idempotent
    with pytest.raises(QueueError, match="closed"):
        await q.counts()


# ---------------------------------------------------------------------------------------------
# enqueue


async def test_enqueue_is_idempotent_per_identity(q: Queue) -> None:
    first = await q.enqueue_many([new("a.csv"), new("b.csv"), new("a.csv")])
    assert len(first) == 2
    again = await q.enqueue_many([new("a.csv"), new("b.csv"), new("c.csv")])
    assert len(again) == 1
    assert (await get(q, again[0])).identity.rel == "c.csv"
    assert await q.enqueue_many([]) == []
    # Every job got its own upload key.
    keys = {(await get(q, i)).upload_key for i in first + again}
    assert len(keys) == 3
    assert all(len(k) == 32 for k in keys)


async def test_enqueue_finished_identity_does_nothing(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("a.csv")])
    await q.mark_failed(job_id, error="boom", kind="file")
    assert await q.enqueue_many([new("a.csv")]) == []


async def test_enqueue_50k_in_one_call_is_fast(q: Queue) -> None:
    items = many(50_000)
    started = time.perf_counter()
    ids = await q.enqueue_many(items)
    elapsed = time.perf_counter() - started
    assert len(ids) == 50_000
    assert ids == sorted(ids)
    # A guard against pathological scaling (a statement per row, a scan per row: minutes), not
    # a speed target: ~1 s on an idle machine, and the figures live in bench/daemon_bench.py.
    assert elapsed < 30.0, f"enqueue of 50,000 took {elapsed:.2f} s"
    started = time.perf_counter()
    assert await q.enqueue_many(items) == []
    assert time.perf_counter() - started < 30.0
    assert (await q.counts())["queued"] == 50_000


async def test_new_identity_supersedes_queued_job(q: Queue) -> None:
    (old,) = await q.enqueue_many([new("a.csv", size=1)])
    (other,) = await q.enqueue_many([new("b.csv")])
    (newer,) = await q.enqueue_many([new("a.csv", size=2)])
    old_job = await get(q, old)
    assert old_job.state is JobState.SUPERSEDED
    assert old_job.finished_at is not None
    assert old_job.error_kind == "superseded"
    assert f"job {newer}" in (old_job.last_error or "")
    assert (await get(q, newer)).state is JobState.QUEUED
    assert (await get(q, other)).state is JobState.QUEUED
    assert [j.id for j in await q.find_by_rel("a.csv")] == [old, newer]


async def test_supersede_within_one_batch(q: Queue) -> None:
    ids = await q.enqueue_many([new("a.csv", size=1), new("a.csv", size=2), new("a.csv", size=3)])
    states = [(await get(q, i)).state for i in ids]
    assert states == [JobState.SUPERSEDED, JobState.SUPERSEDED, JobState.QUEUED]


async def test_new_identity_leaves_started_jobs_alone(q: Queue) -> None:
    uploading_id, resumable_id = await q.enqueue_many([new("a.csv"), new("b.csv")])
    claimed = await q.claim("w", 60)
    assert claimed is not None
    assert claimed.id == uploading_id
    # b.csv got as far as creating an ingestion, then went back to wait for a retry: it is
    # QUEUED but something happened on the server, so only the worker may retire it.
    claimed_b = await q.claim("w", 60)
    assert claimed_b is not None
    await q.save_progress(resumable_id, stage=Stage.UPLOADING, ingestion_id=5)
    await q.retry_later(resumable_id, error="timeout", kind="network", delay=0)

    await q.enqueue_many([new("a.csv", size=99), new("b.csv", size=99)])
    assert (await get(q, uploading_id)).state is JobState.UPLOADING
    assert (await get(q, resumable_id)).state is JobState.QUEUED


async def test_non_utf8_and_big_inode_identity_round_trip(q: Queue) -> None:
    rel = os.fsdecode(b"caf\xe9/na\xefve.csv")
    identity = FileIdentity(rel=rel, size=3, mtime_ns=-5, inode=2**64 - 3)
    (job_id,) = await q.enqueue_many([NewJob(identity, 1, "x", {})])
    job = await get(q, job_id)
    assert job.identity == identity
    assert os.fsencode(job.identity.rel) == b"caf\xe9/na\xefve.csv"
    assert [j.id for j in await q.find_by_rel(rel)] == [job_id]
    assert await q.enqueue_many([NewJob(identity, 1, "x", {})]) == []
    await q.apply_settling({rel: (3, 1.0)})
    assert [s.rel for s in await q.list_settling()] == [rel]
    await q.apply_settling({rel: None})
    assert await q.list_settling() == []


# ---------------------------------------------------------------------------------------------
# claim and leases


async def test_claim_order_and_next_attempt_at(q: Queue) -> None:
    a, b, c = await q.enqueue_many([new("a"), new("b"), new("c")])
    job = await q.claim("w", 30, now=time.time())
    assert job is not None
    assert job.id == a
    assert job.state is JobState.UPLOADING
    assert job.lease_owner == "w"
    assert job.started_at is not None
    assert job.lease_expires_at == pytest.approx(job.started_at + 30)
    assert job.attempts == 0

    await q.retry_later(a, error="503", kind="server", delay=1000)
    now = time.time()
    assert [(await q.claim("w", 30, now=now)).id for _ in range(2)] == [b, c]  # type: ignore[union-attr]
    assert await q.claim("w", 30, now=now) is None
    due = await q.next_due_at()
    assert due is not None
    assert due == pytest.approx(now + 1000, abs=5)
    again = await q.claim("w", 30, now=due)
    assert again is not None
    assert again.id == a
    assert again.attempts == 1
    assert again.started_at == job.started_at  # set once, on the first claim
    assert await q.next_due_at() is None


async def test_claim_with_max_size_takes_only_small_files_in_order(q: Queue) -> None:
    big, small1, huge, small2 = await q.enqueue_many(
        [new("big", size=5000), new("s1", size=100), new("huge", size=10**9), new("s2", size=1000)]
    )
    now = time.time()
    # The small-file lane passes over the large files ahead of it, in queue order.
    first = await q.claim("lane", 30, now=now, max_size=1000)
    second = await q.claim("lane", 30, now=now, max_size=1000)
    assert (first and first.id, second and second.id) == (small1, small2)
    assert await q.claim("lane", 30, now=now, max_size=1000) is None
    # The large files wait for a loop without a size limit.
    assert [(await q.claim("any", 30, now=now)).id for _ in range(2)] == [big, huge]  # type: ignore[union-attr]


async def test_concurrent_claims_from_two_connections(db_path: Path) -> None:
    total = 300
    async with await Queue.open(db_path) as one, await Queue.open(db_path) as two:
        await one.enqueue_many(many(total))
        claimed: list[tuple[str, int]] = []

        async def worker(q: Queue, name: str) -> None:
            while (job := await q.claim(name, 60)) is not None:
                claimed.append((name, job.id))
                await anyio.sleep(0.001)  # "work": leaves the write lock free for the others

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(worker, one, f"one-{n}")
                tg.start_soon(worker, two, f"two-{n}")

        ids = [job_id for _, job_id in claimed]
        assert len(ids) == total
        assert len(set(ids)) == total
        assert {name[:3] for name, _ in claimed} == {"one", "two"}  # both really competed
        assert (await one.counts())["uploading"] == total


async def test_lease_renew_and_expiry(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("a")])
    job = await q.claim("w1", 0.01)
    assert job is not None
    assert await q.renew_lease(job_id, "w1", 60)
    assert (await get(q, job_id)).lease_expires_at == pytest.approx(time.time() + 60, abs=5)
    assert not await q.renew_lease(job_id, "someone-else", 60)
    # Our own live lease survives recover; once expired, it does not.
    assert await q.recover("w1") == []
    assert [j.id for j in await q.recover("w1", now=time.time() + 120)] == [job_id]
    assert not await q.renew_lease(job_id, "w1", 60)


# ---------------------------------------------------------------------------------------------
# progress, parts, transitions


async def test_save_progress_updates_only_given_fields(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("a")])
    await q.save_progress(job_id, stage=Stage.CREATING, ingestion_id=11, mode="multipart")
    await q.save_progress(job_id, remote_id=22, part_size=1024, bytes_sent=2048, fell_back=True)
    job = await get(q, job_id)
    assert (job.stage, job.ingestion_id, job.remote_id, job.mode) == (
        Stage.CREATING,
        11,
        22,
        "multipart",
    )
    assert (job.part_size, job.bytes_sent, job.fell_back) == (1024, 2048, True)
    await q.save_progress(job_id, mode=None, remote_name="renamed.csv", upload_key="k" * 32)
    job = await get(q, job_id)
    assert job.mode is None
    assert job.ingestion_id == 11
    assert (job.remote_name, job.upload_key) == ("renamed.csv", "k" * 32)
    with pytest.raises(QueueError, match="no job 999"):
        await q.save_progress(999, stage=Stage.UPLOADING)


async def test_parts(q: Queue) -> None:
    a, b = await q.enqueue_many([new("a"), new("b")])
    for part in (1, 2, 3, 2):
        await q.mark_part_done(a, part)
    await q.mark_part_done(b, 1)
    assert await q.parts_done(a) == {1, 2, 3}
    await q.clear_parts(a)
    assert await q.parts_done(a) == set()
    assert await q.parts_done(b) == {1}
    with pytest.raises(QueueError):
        await q.mark_part_done(12345, 1)  # no such job
    await q.mark_part_done(b, 2)  # the failed statement left nothing behind
    assert await q.parts_done(b) == {1, 2}


async def test_retry_later_keeps_ingestion_fields(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("a")])
    await q.claim("w", 60)
    await q.save_progress(job_id, stage=Stage.UPLOADING, ingestion_id=1, remote_id=2, mode="s3")
    await q.mark_part_done(job_id, 1)
    before = time.time()
    await q.retry_later(job_id, error="connection reset", kind="network", delay=30)
    job = await get(q, job_id)
    assert job.state is JobState.QUEUED
    assert (job.stage, job.ingestion_id, job.remote_id, job.mode) == (
        Stage.UPLOADING,
        1,
        2,
        "s3",
    )
    assert (job.attempts, job.last_error, job.error_kind) == (1, "connection reset", "network")
    assert job.next_attempt_at >= before + 30
    assert (job.lease_owner, job.lease_expires_at) == (None, None)
    assert await q.parts_done(job_id) == {1}


async def test_reset_ingestion(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("a")])
    key = (await get(q, job_id)).upload_key
    await q.save_progress(
        job_id, stage=Stage.UPLOADING, ingestion_id=1, remote_id=2, mode="s3", part_size=5
    )
    await q.mark_part_done(job_id, 1)
    job = await q.reset_ingestion(job_id)
    assert job == await get(q, job_id)
    assert job.stage is Stage.NEW
    assert (job.ingestion_id, job.remote_id, job.mode, job.part_size) == (None,) * 4
    assert job.upload_key == key  # it still names the dataset this job made
    assert await q.parts_done(job_id) == set()


async def test_recover_after_crash_keeps_progress(db_path: Path) -> None:
    q = await Queue.open(db_path)
    crashed, waiting = await q.enqueue_many([new("a"), new("b")])
    job = await q.claim("old-process", lease_seconds=3600)
    assert job is not None
    assert job.id == crashed
    await q.save_progress(crashed, stage=Stage.UPLOADING, ingestion_id=9, mode="multipart")
    for part in (1, 2):
        await q.mark_part_done(crashed, part)
    await q.close()  # the process dies: nothing releases the lease

    async with await Queue.open(db_path) as q2:
        recovered = await q2.recover("new-process")
        assert [j.id for j in recovered] == [crashed]
        job = await get(q2, crashed)
        assert job.state is JobState.QUEUED
        assert (job.stage, job.ingestion_id, job.mode) == (Stage.UPLOADING, 9, "multipart")
        assert job.lease_owner is None
        assert job.attempts == 1
        assert job.error_kind == "interrupted"
        assert await q2.parts_done(crashed) == {1, 2}
        assert (await get(q2, waiting)).state is JobState.QUEUED
        again = await q2.claim("new-process", 60)
        assert again is not None
        assert again.id == crashed  # kept its place in line, ahead of the newer job
        assert await q2.recover("new-process") == []


async def test_upload_and_import_transitions(q: Queue) -> None:
    ok, bad, pending = await q.enqueue_many([new("ok"), new("bad"), new("pending")])
    for job_id in (ok, bad, pending):
        await q.claim("w", 60)
        await q.mark_part_done(job_id, 1)
        await q.mark_uploaded(job_id)
        job = await get(q, job_id)
        assert (job.state, job.stage) == (JobState.IMPORTING, Stage.COMPLETED)
        assert job.uploaded_at is not None
        assert job.lease_owner is None
        assert await q.parts_done(job_id) == set()

    assert [j.id for j in await q.jobs_to_poll()] == [ok, bad, pending]
    applied = await q.record_import(
        ok, status="importing", progress=0.5, message=None, terminal=False, failed=False
    )
    assert applied
    assert [j.id for j in await q.jobs_to_poll()] == [bad, pending, ok]  # polled → to the back
    job = await get(q, ok)
    assert (job.state, job.import_status, job.import_progress) == (
        JobState.IMPORTING,
        "importing",
        0.5,
    )

    await q.record_import(
        ok, status="done", progress=1.0, message=None, terminal=True, failed=False
    )
    await q.record_import(
        bad, status="error", progress=None, message="bad header", terminal=True, failed=True
    )
    done, failed = await get(q, ok), await get(q, bad)
    assert done.state is JobState.DONE
    assert done.finished_at is not None
    assert failed.state is JobState.FAILED
    assert (failed.last_error, failed.error_kind) == ("import failed: bad header", "import")
    # A late duplicate poll cannot move a finished job.
    late = await q.record_import(
        ok, status="importing", progress=0.1, message=None, terminal=False, failed=False
    )
    assert not late
    assert (await get(q, ok)).state is JobState.DONE
    assert [j.id for j in await q.jobs_to_poll()] == [pending]

    assert [j.id for j in await q.jobs_for_after_upload(10)] == [ok]
    await q.set_after_upload(ok, "archived")
    assert await q.jobs_for_after_upload(10) == []
    assert (await get(q, ok)).after_upload == "archived"


async def test_mark_uploaded_stores_the_outcome_in_one_statement(q: Queue) -> None:
    small, parted = await q.enqueue_many([new("small"), new("parted")])
    await q.claim("w", 60)
    await q.mark_uploaded(
        small,
        bytes_sent=10,
        remote_id=41,
        remote_name="small (2)",
        target_refs={"source_id": 9},
        parts_recorded=False,
    )
    job = await get(q, small)
    assert (job.state, job.stage, job.lease_owner) == (JobState.IMPORTING, Stage.COMPLETED, None)
    assert (job.bytes_sent, job.remote_id, job.remote_name) == (10, 41, "small (2)")
    assert job.target_refs == {"source_id": 9}
    # Fields not given stay as they were; parts recorded are dropped.
    await q.claim("w", 60)
    await q.save_progress(parted, remote_id=5, bytes_sent=3)
    await q.mark_part_done(parted, 1)
    await q.mark_uploaded(parted)
    job = await get(q, parted)
    assert (job.state, job.remote_id, job.bytes_sent) == (JobState.IMPORTING, 5, 3)
    assert await q.parts_done(parted) == set()


async def test_record_imports_applies_a_batch_and_skips_finished_jobs(q: Queue) -> None:
    ids = await q.enqueue_many([new(f"j{i}") for i in range(4)])
    for job_id in ids:
        await q.claim("w", 60)
        await q.mark_uploaded(job_id, parts_recorded=False)
    going, done, bad, late = ids
    await q.record_import(
        late, status="done", progress=1, message=None, terminal=True, failed=False
    )
    await q.record_imports(
        [
            ImportRecord(going, "importing", 0.25, "rows", terminal=False, failed=False),
            ImportRecord(done, "finished", 1.0, None, terminal=True, failed=False),
            ImportRecord(bad, "failed", None, "bad header", terminal=True, failed=True),
            # A late answer for a job already finished changes nothing.
            ImportRecord(late, "importing", 0.1, None, terminal=False, failed=False),
        ]
    )
    g, d, b, lt = [await get(q, i) for i in ids]
    assert (g.state, g.import_status, g.import_progress, g.import_message) == (
        JobState.IMPORTING,
        "importing",
        0.25,
        "rows",
    )
    assert (d.state, d.import_status) == (JobState.DONE, "finished")
    assert (b.state, b.error_kind, b.last_error) == (
        JobState.FAILED,
        "import",
        "import failed: bad header",
    )
    assert (lt.state, lt.import_status) == (JobState.DONE, "done")
    await q.record_imports([])  # nothing to do is not an error

    await q.set_after_upload_many({d.id: "kept", lt.id: "deleted", 999_999: "kept"})
    assert await q.jobs_for_after_upload(10) == []
    assert [(await get(q, i)).after_upload for i in (done, late)] == ["kept", "deleted"]


async def test_mark_failed_and_superseded(q: Queue) -> None:
    a, b = await q.enqueue_many([new("a"), new("b")])
    await q.claim("w", 60)
    await q.mark_part_done(a, 1)
    await q.mark_failed(a, error="permission denied", kind="file")
    job = await get(q, a)
    assert (job.state, job.last_error, job.error_kind) == (
        JobState.FAILED,
        "permission denied",
        "file",
    )
    assert job.finished_at is not None
    assert job.lease_owner is None
    assert await q.parts_done(a) == set()
    await q.mark_superseded(b, reason="file vanished")
    job = await get(q, b)
    assert (job.state, job.last_error) == (JobState.SUPERSEDED, "file vanished")
    assert [j.id for j in await q.recent_failures(5)] == [a]
    with pytest.raises(QueueError):
        await q.mark_failed(999, error="x", kind="y")
    # That transaction was rolled back; the connection takes the next one.
    assert await q.requeue() == 1


async def test_requeue(q: Queue) -> None:
    a, b, c = await q.enqueue_many([new("a"), new("b"), new("c")])
    for job_id in (a, b):
        await q.claim("w", 60)
        await q.save_progress(job_id, stage=Stage.UPLOADING, ingestion_id=3, remote_id=4)
        await q.retry_later(job_id, error="x", kind="network", delay=0)
        await q.claim("w", 60)
        await q.mark_failed(job_id, error="gave up", kind="network")
    old_key = (await get(q, a)).upload_key

    assert await q.requeue(c) == 0  # not failed
    assert await q.requeue(a) == 1
    job = await get(q, a)
    assert job.state is JobState.QUEUED
    assert (job.attempts, job.last_error, job.error_kind, job.finished_at) == (0,) + (None,) * 3
    assert (job.stage, job.ingestion_id, job.remote_id) == (Stage.NEW, None, None)
    assert job.upload_key == old_key
    assert job.next_attempt_at <= time.time()
    assert (await get(q, b)).state is JobState.FAILED
    assert await q.requeue() == 1
    assert (await q.counts())["failed"] == 0


# ---------------------------------------------------------------------------------------------
# ledger, pruning, housekeeping


async def finish(q: Queue, job_id: int, after: str | None = "kept") -> None:
    await q.claim("w", 60)
    await q.save_progress(job_id, remote_id=100 + job_id)
    await q.mark_uploaded(job_id)
    await q.record_import(
        job_id, status="done", progress=1.0, message=None, terminal=True, failed=False
    )
    if after is not None:
        await q.set_after_upload(job_id, after)


async def test_ledger_prevents_reupload_after_prune(q: Queue) -> None:
    kept, pending_after, failed, _queued = await q.enqueue_many(
        [new("kept.csv"), new("pending.csv"), new("failed.csv"), new("queued.csv")]
    )
    await finish(q, kept)
    await finish(q, pending_after, after=None)  # archive not done yet: must not be pruned
    await q.claim("w", 60)
    await q.mark_failed(failed, error="x", kind="file")

    assert await q.prune(3600) == 0  # nothing is old enough
    assert await q.prune(3600, now=time.time() + 7200) == 2
    assert await q.get(kept) is None
    assert await q.get(failed) is None
    assert (await get(q, pending_after)).state is JobState.DONE

    # The same file, still in the inbox, is not uploaded again; a changed one is.
    assert await q.enqueue_many([new("kept.csv")]) == []
    assert len(await q.enqueue_many([new("kept.csv", size=11)])) == 1
    # A failed job leaves no ledger entry: the file is retried when it is seen again.
    assert len(await q.enqueue_many([new("failed.csv")])) == 1
    assert (await q.counts())["queued"] == 3


async def test_vacuum_if_worthwhile(q: Queue) -> None:
    await q.enqueue_many(many(3000))
    await q.enqueue_many([new(f"f/{i:06d}.csv", size=0) for i in range(3000)])  # supersede all
    assert await q.vacuum_if_worthwhile() is False
    assert await q.prune(0, now=time.time() + 1) == 3000
    assert await q.vacuum_if_worthwhile() is True
    assert await q.vacuum_if_worthwhile() is False
    assert (await q.counts())["queued"] == 3000


async def test_heartbeat_and_daemon_info(q: Queue) -> None:
    assert await q.daemon_info() is None
    await q.heartbeat(123, 1000.0, {"version": "0.1.0", "workers": 4})
    await q.heartbeat(456, 2000.0, {"version": "0.1.0", "workers": 2})
    info = await q.daemon_info()
    assert info is not None
    assert (info.pid, info.started_at, info.info) == (
        456,
        2000.0,
        {"version": "0.1.0", "workers": 2},
    )
    assert info.heartbeat_at == pytest.approx(time.time(), abs=5)


async def test_settling(q: Queue) -> None:
    await q.apply_settling({"a.csv": (1, 10.0), "b.csv": (2, 5.0)})
    await q.apply_settling({"a.csv": (3, 12.0)})
    assert [(s.rel, s.size, s.since) for s in await q.list_settling()] == [
        ("b.csv", 2, 5.0),
        ("a.csv", 3, 12.0),
    ]
    assert (await q.counts())["settling"] == 2
    await q.apply_settling({"b.csv": None})
    assert (await q.counts())["settling"] == 1
    await q.clear_all_settling()
    assert (await q.counts())["settling"] == 0


async def test_cancelled_write_completes_and_connection_stays_usable(
    q: Queue, db_path: Path
) -> None:
    a, b = await q.enqueue_many([new("a"), new("b")])
    # Another connection holds the write lock, so our write waits inside its transaction.
    blocker = raw(db_path)
    blocker.execute("BEGIN IMMEDIATE")
    scope = anyio.CancelScope()

    async def write() -> None:
        with scope:
            await q.mark_failed(a, error="x", kind="y")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            await anyio.sleep(0.2)
            scope.cancel()  # arrives mid-transaction
            await anyio.sleep(0.05)
            blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    assert scope.cancel_called
    # The shielded write ran to completion, and the connection is not left inside a
    # transaction: the next writes work.
    assert (await get(q, a)).state is JobState.FAILED
    await q.save_progress(b, stage=Stage.CREATING)
    assert (await get(q, b)).stage is Stage.CREATING


# ---------------------------------------------------------------------------------------------
# read side at scale


async def test_status_reads_fast_on_100k_jobs(db_path: Path) -> None:
    async with await Queue.open(db_path) as q:
        await q.enqueue_many(many(100_000))
        # Spread the states with one statement (far faster than 100,000 API calls); the
        # fixture only shapes data, every read below goes through the API.
        con = raw(db_path)
        con.execute(
            "UPDATE jobs SET state = CASE id % 10"
            " WHEN 0 THEN 'failed' WHEN 1 THEN 'importing' WHEN 2 THEN 'uploading'"
            " WHEN 3 THEN 'superseded' WHEN 4 THEN 'queued' WHEN 5 THEN 'queued'"
            " ELSE 'done' END, finished_at = updated_at, updated_at = updated_at + id"
        )
        con.close()

        timings: dict[str, float] = {}

        async def timed(name: str, call: Awaitable[T]) -> T:
            started = time.perf_counter()
            result = await call
            timings[name] = time.perf_counter() - started
            return result

        counts = await timed("counts", q.counts())
        assert counts == {
            "queued": 20_000,
            "uploading": 10_000,
            "importing": 10_000,
            "done": 40_000,
            "failed": 10_000,
            "superseded": 10_000,
            "settling": 0,
        }
        recent = await timed("list_jobs recent", q.list_jobs())
        assert len(recent) == 200
        assert recent[0].id == 100_000
        oldest = await timed("list_jobs oldest", q.list_jobs([JobState.QUEUED], order="oldest"))
        assert [j.id for j in oldest[:2]] == [4, 5]
        await timed("recent_failures", q.recent_failures(20))
        await timed("oldest_queued_at", q.oldest_queued_at())
        await timed("jobs_to_poll", q.jobs_to_poll())
        await timed("jobs_for_after_upload", q.jobs_for_after_upload(100))
        await timed("next_due_at", q.next_due_at())
        await timed("claim", q.claim("w", 60))
        print({name: round(t * 1000, 1) for name, t in timings.items()})  # ms, shown with -s
        # A guard against a full scan per row (seconds each), not a speed target: each read
        # takes milliseconds on an idle machine; `inboxd status`'s own figures are benchmarks.
        slow = {name: round(t, 3) for name, t in timings.items() if t > 3.0}
        assert not slow, f"slow status reads: {slow}"


# ---------------------------------------------------------------------------------------------
# unusable files and a full filesystem: what the error says, and the exit status it maps to


def _corrupt_the_middle(path: Path) -> bytes:
    """Random bytes over the middle 40 % of the file (the header stays valid); returns them."""
    import random

    data = bytearray(path.read_bytes())
    start, end = int(len(data) * 0.3), int(len(data) * 0.7)
    data[start:end] = random.Random(5).randbytes(end - start)
    path.write_bytes(bytes(data))
    return bytes(data)


async def test_corrupt_pages_are_refused_when_the_writer_opens(db_path: Path) -> None:
    async with await Queue.open(db_path) as q:
        await q.enqueue_many(many(3000))
    broken = _corrupt_the_middle(db_path)
    with pytest.raises(QueueError, match=r"inboxd\.db is corrupt .*quick_check") as caught:
        await Queue.open(db_path)
    assert "\n" not in str(caught.value)  # quick_check reports over several lines
    assert caught.value.reason == "data"
    assert caught.value.as_state_error().exit_status == 65
    # not switched to WAL, not migrated: untouched
    assert await anyio.Path(db_path).read_bytes() == broken
    # A reader skips the check; the damaged pages fail its first read the same way.
    async with await Queue.open(db_path, readonly=True) as reader:
        with pytest.raises(QueueError, match=r"inboxd\.db is corrupt") as read:
            await reader.counts()
    assert read.value.reason == "data"


async def test_a_directory_in_place_of_the_database_is_named(db_path: Path) -> None:
    (db_path / "something").mkdir(parents=True)
    for readonly in (False, True):
        with pytest.raises(QueueError, match=r"inboxd\.db is a directory") as caught:
            await Queue.open(db_path, readonly=readonly)
        assert caught.value.as_state_error().exit_status == 65
    assert [p.name async for p in anyio.Path(db_path).iterdir()] == ["something"]


async def test_newer_schema_and_failed_upgrade_do_not_fix_themselves(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await Queue.open(db_path):
        pass

    async def broken(db: aiosqlite.Connection) -> None:
        await db.execute("THIS IS NOT SQL")

    monkeypatch.setattr(queue_module, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(QueueError, match="cannot upgrade") as failed:
        await Queue.open(db_path)
    monkeypatch.setattr(queue_module, "MIGRATIONS", MIGRATIONS[:1])
    with pytest.raises(QueueError, match="newer inboxd") as newer:
        await Queue.open(db_path)
    assert failed.value.reason == newer.value.reason == "data"


def _tiny_tmpfs(where: Path) -> None:
    """Mount a 512 KiB tmpfs at ``where`` (unmounted by the caller); skips when we may not."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("a full filesystem needs a small tmpfs, and mounting one needs root")
    where.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")


def _fill_up(directory: Path) -> None:
    """Write into ``directory`` until its filesystem says ENOSPC, down to the last byte."""
    import errno

    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (64 * 1024, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


async def test_upgrade_on_a_full_filesystem_asks_for_space_not_a_bug_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upgrade is fine, it only needs room: "free space", exit 74 — not "report this"."""
    state = tmp_path / "state"
    _tiny_tmpfs(state)
    try:
        db = state / "state.db"
        async with await Queue.open(db):
            pass
        # A second connection keeps -shm (and an empty -wal) in place, as a running status
        # would: the open gets past WAL set-up and the first thing to need room is the upgrade.
        holder = raw(db)
        holder.execute("SELECT count(*) FROM jobs").fetchall()
        _fill_up(state)

        async def grow(conn: aiosqlite.Connection) -> None:
            # A small page cache spills to the WAL within the step (as a big table rebuild
            # does), so the step fails, not the COMMIT after it.
            await conn.execute("PRAGMA cache_size = 4")
            await conn.execute("CREATE TABLE ballast (x BLOB)")
            await conn.execute("INSERT INTO ballast VALUES (zeroblob(256 * 1024))")

        monkeypatch.setattr(queue_module, "MIGRATIONS", [*MIGRATIONS, grow])
        with pytest.raises(QueueError, match=r"state\.db: no space left") as caught:
            await Queue.open(db)
        assert "report this" not in str(caught.value)
        assert caught.value.as_state_error().exit_status == 74
        holder.close()
        with closing(raw(db)) as con:  # closed: Python 3.13 warns of an unclosed connection
            assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        await anyio.run_process(["umount", "-l", str(state)], check=False)


async def test_claim_counts_other_jobs_of_the_same_path(q: Queue) -> None:
    first, other = await q.enqueue_many([new("a.csv"), new("b.csv")])
    claimed = await q.claim("w", 60)
    assert claimed is not None and claimed.id == first
    assert claimed.same_path_jobs == 0  # the worker skips the history lookup
    await q.mark_uploaded(first, parts_recorded=False)
    (changed,) = await q.enqueue_many([new("a.csv", size=20, mtime_ns=2)])  # a new version
    seen = [await q.claim("w", 60), await q.claim("w", 60)]
    counts = {job.id: job.same_path_jobs for job in seen if job is not None}
    assert counts == {other: 0, changed: 1}
    assert (await get(q, changed)).same_path_jobs is None  # only claim counts


async def test_status_shows_no_stream_id_before_a_stream_name_is_looked_up(q: Queue) -> None:
    from daemon.commands import status

    named = NewJob(identity=ident("named.csv"), stream_id=0, remote_name="named.csv", metadata={})
    await q.enqueue_many([named, new("plain.csv")])
    rows = {job.identity.rel: status.job_json(job, time.time()) for job in await q.list_jobs()}
    assert rows["named.csv"]["stream_id"] is None
    assert rows["plain.csv"]["stream_id"] == 7


# ---------------------------------------------------------------------------------------------
# what was delivered: part digests, content hash, the path's last delivery (schema v4)


async def test_part_digests_are_kept_and_replaced_when_a_part_is_sent_again(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("a.bin")])
    await q.mark_part_done(job_id, 1, b"\x01" * 16)
    await q.mark_part_done(job_id, 2)  # recorded by an inboxd that kept no digest
    await q.mark_part_done(job_id, 1, b"\x02" * 16)  # re-sent after a restart: re-hashed
    await q.mark_part_done(job_id, 1)  # a digest is never erased by a record without one
    assert await q.part_digests(job_id) == {1: b"\x02" * 16, 2: None}
    assert await q.parts_done(job_id) == {1, 2}


async def test_content_hash_and_change_reach_the_ledger(q: Queue) -> None:
    first, other = await q.enqueue_many([new("a.csv"), new("b.csv", size=3)])
    await q.claim("w", 60)
    await q.mark_uploaded(first, remote_id=41, content_hash="xxh3-128:10:" + "ab" * 16)
    prior = await q.prior_delivery("a.csv", before=first + 100)
    assert prior is not None
    assert (prior.size, prior.remote_id, prior.remote_name) == (10, 41, "a.csv")
    assert prior.content_hash == "xxh3-128:10:" + "ab" * 16
    assert await q.prior_delivery("a.csv", before=first) is None  # only older jobs count
    assert await q.prior_delivery("a.csv", before=first + 100, target="marple") is None
    assert await q.prior_delivery("b.csv", before=other + 100) is None  # queued, not delivered

    await q.record_import(
        first, status="FINISHED", progress=1, message=None, terminal=True, failed=False
    )
    await q.set_after_upload(first, "kept")
    assert await q.prune(0, now=time.time() + 10) == 1
    from_ledger = await q.prior_delivery("a.csv", before=first + 100)
    assert from_ledger is not None
    assert (from_ledger.size, from_ledger.remote_id, from_ledger.remote_name) == (10, 41, None)
    assert from_ledger.content_hash == prior.content_hash
    # A new version of the path is claimed with its ledger row counted as history.
    (changed,) = await q.enqueue_many([new("a.csv", size=20, mtime_ns=2)])
    claimed = [await q.claim("w", 60) for _ in range(2)]
    counts = {job.id: job.same_path_jobs for job in claimed if job is not None}
    assert counts[changed] == 1


async def test_mark_unchanged_is_delivered_without_an_upload(q: Queue) -> None:
    (first,) = await q.enqueue_many([new("a.csv")])
    await q.claim("w", 60)
    await q.mark_uploaded(
        first, remote_id=5, target_refs={"stream_id": 1}, content_hash="xxh3-128:10:" + "cd" * 16
    )
    (second,) = await q.enqueue_many([new("a.csv", inode=2)])  # chmod'ed: a new identity
    claimed = await q.claim("w", 60)
    assert claimed is not None and claimed.id == second
    await q.mark_part_done(second, 1, b"x" * 16)
    prior = await q.prior_delivery("a.csv", before=second)
    assert prior is not None and not prior.imported
    # The prior's import still runs: this version waits for the same import.
    await q.mark_unchanged(second, prior)
    job = await get(q, second)
    assert (job.state, job.stage, job.change) == (JobState.IMPORTING, Stage.COMPLETED, "unchanged")
    assert (job.remote_id, job.content_hash) == (5, prior.content_hash)
    assert job.target_refs == {"stream_id": 1} and job.finished_at is None
    assert await q.parts_done(second) == set()
    assert {j.id for j in await q.jobs_to_poll()} == {first, second}

    await q.record_imports(
        [
            ImportRecord(j, "FINISHED", 1.0, None, terminal=True, failed=False)
            for j in (first, second)
        ]
    )
    (third,) = await q.enqueue_many([new("a.csv", inode=3)])
    await q.claim("w", 60)
    prior = await q.prior_delivery("a.csv", before=third)
    assert prior is not None and prior.imported and prior.remote_id == 5
    await q.mark_unchanged(third, prior)
    job = await get(q, third)
    assert (job.state, job.change, job.remote_id) == (JobState.DONE, "unchanged", 5)
    assert job.finished_at is not None and job.lease_owner is None
    assert third in [j.id for j in await q.jobs_for_after_upload()]  # kept/archived as usual


async def test_set_change_is_stored_for_a_resumed_job(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("a.csv")])
    await q.set_change(job_id, "appended")
    assert (await get(q, job_id)).change == "appended"
    await q.set_change(job_id, None)
    assert (await get(q, job_id)).change is None
    with pytest.raises(QueueError, match="no job 999"):
        await q.set_change(999, "appended")


async def test_v3_database_gains_the_change_column(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue of schema v3 keeps its jobs, hashes and parts; ``created`` is False."""
    with monkeypatch.context() as m:
        m.setattr(queue_module, "MIGRATIONS", MIGRATIONS[:3])
        async with await Queue.open(db_path) as q:
            assert q.created
    # Rows as a v3 inboxd wrote them: today's Queue names the v5 columns, so by hand.
    job_id = _insert_old_job(db_path, "a.csv", dataset_id=None, dataset_name="a.csv")
    con = raw(db_path)
    con.execute("UPDATE jobs SET content_hash = 'xxh3-128:10:' || hex(zeroblob(16))")
    con.execute("INSERT INTO parts (job_id, part_number) VALUES (?, 1)", (job_id,))
    con.close()
    async with await Queue.open(db_path) as q:
        assert not q.created
        job = await get(q, job_id)
        assert job.change is None and job.content_hash == "xxh3-128:10:" + "00" * 16
        assert await q.part_digests(job_id) == {1: None}
    con = raw(db_path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        con.close()


def _insert_old_job(
    db_path: Path,
    rel: str,
    *,
    dataset_id: int | None,
    dataset_name: str,
    state: str = "queued",
    target: str = "marple-db",
) -> int:
    """A job row under the column names of schema v1-v4 (``dataset_id``, ``dataset_name``)."""
    con = raw(db_path)
    try:
        cur = con.execute(
            "INSERT INTO jobs (rel, size, mtime_ns, inode, state, stage, stream_id,"
            " dataset_name, dataset_id, metadata, upload_key, target, next_attempt_at,"
            " created_at, updated_at, uploaded_at)"
            " VALUES (?, 10, 1, 1, ?, ?, 7, ?, ?, '{}', ?, ?, 0, 0, 0, ?)",
            (
                os.fsencode(rel),
                state,
                "completed" if state == "importing" else "new",
                dataset_name,
                dataset_id,
                ident(rel).upload_key(),
                target,
                0 if state == "importing" else None,
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid
    finally:
        con.close()


async def test_v4_database_gets_target_neutral_column_names(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema v5 renames the Marple-DB-named columns in place: a v4 queue keeps every row
    and value (jobs of each target, the ledger), its indexes still serve, and an inboxd that
    knows only v4 refuses the migrated file instead of misreading it."""
    with monkeypatch.context() as m:
        m.setattr(queue_module, "MIGRATIONS", MIGRATIONS[:4])
        async with await Queue.open(db_path):
            pass
    importing = _insert_old_job(
        db_path, "db/run.csv", dataset_id=41, dataset_name="run (2).csv", state="importing"
    )
    legacy = _insert_old_job(
        db_path,
        "legacy/a.csv",
        dataset_id=7,
        dataset_name="/inbox/a.csv",
        state="importing",
        target="marple-legacy",
    )
    queued = _insert_old_job(db_path, "new.csv", dataset_id=None, dataset_name="new.csv")
    con = raw(db_path)
    con.execute(  # a delivered file whose job was pruned: only the ledger remembers it
        "INSERT INTO ledger (rel, size, mtime_ns, inode, ctime_ns, dataset_id, finished_at,"
        " content_hash) VALUES (?, 10, 1, 99, 0, 42, 0, NULL)",
        (b"old/gone.csv",),
    )
    assert con.execute("PRAGMA user_version").fetchone()[0] == 4
    con.close()

    async with await Queue.open(db_path) as q:
        db_job, legacy_job, queued_job = [await get(q, i) for i in (importing, legacy, queued)]
        assert (db_job.remote_id, db_job.remote_name) == (41, "run (2).csv")
        assert (legacy_job.target, legacy_job.remote_id) == ("marple-legacy", 7)
        assert (legacy_job.remote_name, queued_job.remote_id) == ("/inbox/a.csv", None)
        # The ledger's column too: a new version of the pruned file finds its delivery.
        (later,) = await q.enqueue_many([new("old/gone.csv", size=11, inode=99)])
        prior = await q.prior_delivery("old/gone.csv", before=later)
        assert prior is not None and (prior.remote_id, prior.remote_name) == (42, None)
        # The renamed columns are written, not only read.
        await q.save_progress(queued, remote_id=5, remote_name="new (3).csv")
        assert ((await get(q, queued)).remote_id, (await get(q, queued)).remote_name) == (
            5,
            "new (3).csv",
        )
        # The partial indexes that claim names with INDEXED BY survived the rename.
        claimed = await q.claim("w1", 60)
        assert claimed is not None and claimed.id in (queued, later)

    con = raw(db_path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 5 == len(MIGRATIONS)
        for table in ("jobs", "ledger"):
            columns = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
            assert "remote_id" in columns and "dataset_id" not in columns, table
        jobs_columns = {row[1] for row in con.execute("PRAGMA table_info(jobs)")}
        assert "remote_name" in jobs_columns and "dataset_name" not in jobs_columns
        indexes = {
            row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"jobs_identity", "jobs_due", "jobs_inode", "ledger_inode"} <= indexes
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()

    # An inboxd that knows only v4 refuses the v5 file (it would name columns that are gone).
    with monkeypatch.context() as m:
        m.setattr(queue_module, "MIGRATIONS", MIGRATIONS[:4])
        for readonly in (False, True):
            with pytest.raises(QueueError, match=r"newer inboxd \(schema v5, .* up to v4\)"):
                await Queue.open(db_path, readonly=readonly)


async def test_concurrent_writes_share_commits_and_fail_alone(q: Queue, db_path: Path) -> None:
    """Many tasks writing at once: their statements go to the database thread in shared
    transactions (fewer trips than writes), each caller returns once its own write is
    committed, and a statement that fails (a part of a job that does not exist violates a
    foreign key) fails only its caller."""
    ids = await q.enqueue_many(many(40))
    trips = 0
    db = q._conn()
    real = db._execute

    async def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal trips
        trips += 1
        return await real(fn, *args, **kwargs)

    db._execute = counting  # type: ignore[method-assign]
    failed: list[BaseException] = []

    async def write(job_id: int) -> None:
        await q.save_progress(job_id, bytes_sent=job_id * 10, stage=Stage.CREATING)
        # Committed when it returns: another connection sees it at once.
        other = raw(db_path)
        try:
            row = other.execute("SELECT bytes_sent FROM jobs WHERE id = ?", (job_id,)).fetchone()
        finally:
            other.close()
        assert row[0] == job_id * 10

    async def bad() -> None:
        try:
            await q.mark_part_done(10**9, 1)
        except QueueError as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        for job_id in ids:
            tg.start_soon(write, job_id)
        tg.start_soon(bad)
    del db._execute
    assert len(failed) == 1 and "FOREIGN KEY" in str(failed[0]), failed
    assert trips < len(ids) / 2, trips  # 41 statements
    for job_id in ids:
        job = await get(q, job_id)
        assert (job.bytes_sent, job.stage) == (job_id * 10, Stage.CREATING)
