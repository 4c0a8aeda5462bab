"""``Queue.is_archived_upload``: what retention may treat as uploaded and imported."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.state import FileIdentity, JobState, NewJob, Queue


def new(rel: str, size: int, mtime_ns: int, inode: int) -> NewJob:
    return NewJob(
        identity=FileIdentity(rel=rel, size=size, mtime_ns=mtime_ns, inode=inode),
        stream_id=1,
        # os.fsdecode's surrogate escapes cannot go into a TEXT column; the name is not tested
        remote_name=Path(rel).name.encode(errors="replace").decode(),
        metadata={},
    )


async def to_state(q: Queue, job_id: int, state: JobState) -> None:
    """Drive one freshly enqueued job through the real transitions to ``state``."""
    if state is JobState.QUEUED:
        return
    claimed = await q.claim("w", 60)
    assert claimed is not None and claimed.id == job_id
    if state is JobState.UPLOADING:
        return
    await q.mark_uploaded(job_id)
    if state is JobState.IMPORTING:
        return
    failed = state is JobState.FAILED
    await q.record_import(
        job_id, status="x", progress=None, message="m", terminal=True, failed=failed
    )
    assert (await q.get(job_id)).state is state  # type: ignore[union-attr]


@pytest.fixture
async def q(tmp_path: Path) -> AsyncIterator[Queue]:
    async with await Queue.open(tmp_path / "state.db") as opened:
        yield opened


async def test_done_job_confirms_same_rel_size_mtime_whatever_the_inode(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("a/run.csv", 100, 5_000, inode=7)])
    assert not await q.is_archived_upload("a/run.csv", 100, 5_000)  # queued: not yet
    await to_state(q, job_id, JobState.DONE)

    assert await q.is_archived_upload("a/run.csv", 100, 5_000)
    # Anything else about the identity differs: not confirmed.
    assert not await q.is_archived_upload("a/run.csv", 101, 5_000)
    assert not await q.is_archived_upload("a/run.csv", 100, 5_001)
    assert not await q.is_archived_upload("run.csv", 100, 5_000)
    assert not await q.is_archived_upload("a/other.csv", 100, 5_000)


@pytest.mark.parametrize(
    "state", [JobState.QUEUED, JobState.UPLOADING, JobState.IMPORTING, JobState.FAILED]
)
async def test_jobs_not_done_never_confirm(q: Queue, state: JobState) -> None:
    (job_id,) = await q.enqueue_many([new("b.bin", 10, 1, inode=1)])
    await to_state(q, job_id, state)
    assert not await q.is_archived_upload("b.bin", 10, 1)


async def test_superseded_job_does_not_confirm(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("c.bin", 10, 1, inode=1)])
    await q.mark_superseded(job_id, reason="changed")
    assert not await q.is_archived_upload("c.bin", 10, 1)


async def test_ledger_row_confirms_after_the_done_job_was_pruned(q: Queue) -> None:
    (job_id,) = await q.enqueue_many([new("old/d.mf4", 2048, 99, inode=3)])
    await to_state(q, job_id, JobState.DONE)
    await q.set_after_upload(job_id, "archived")
    assert await q.prune(0, now=time.time() + 1) == 1
    assert await q.get(job_id) is None

    assert await q.is_archived_upload("old/d.mf4", 2048, 99)
    assert not await q.is_archived_upload("old/d.mf4", 2048, 100)


async def test_non_utf8_names_round_trip(q: Queue) -> None:
    rel = os.fsdecode(b"raw/\xff\xfe.csv")
    (job_id,) = await q.enqueue_many([new(rel, 1, 1, inode=2**64 - 1)])
    await to_state(q, job_id, JobState.DONE)
    assert await q.is_archived_upload(rel, 1, 1)


async def test_works_on_a_read_only_queue(q: Queue, tmp_path: Path) -> None:
    (job_id,) = await q.enqueue_many([new("e.csv", 3, 4, inode=5)])
    await to_state(q, job_id, JobState.DONE)
    async with await Queue.open(tmp_path / "state.db", readonly=True) as ro:
        assert await ro.is_archived_upload("e.csv", 3, 4)
