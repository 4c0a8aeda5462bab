"""The ingestion flow against the real sandbox over loopback: every mode, every recovery."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import anyio
import pytest

from daemon.delivery.files import FileRef
from daemon.delivery.flow import MemoryJournal, Resume, UploadOptions
from daemon.delivery.marple_db.client import MarpleClient, Stream
from daemon.delivery.marple_db.upload import (
    FILE_MTIME_FIELD,
    FILE_SIZE_FIELD,
    UPLOAD_KEY_FIELD,
    UploadRequest,
    upload_file,
)
from daemon.errors import (
    AuthError,
    EmptyFileError,
    FileChangedError,
    NotFoundError,
    RejectedError,
    UploadFailed,
)
from daemon.retry import RetryPolicy
from daemon.sandbox import Sandbox
from tests.support.data import TOKEN, content_hash_of, write_file

FAST = RetryPolicy(attempts=6, base=0.01, cap=0.1)
STREAM = Stream(id=1, name="inbox", datapool="default")


def request_for(path: Path, name: str | None = None, **kw: object) -> UploadRequest:
    return UploadRequest(
        file=FileRef.stat(path),
        dataset_name=name or path.name,
        stream=STREAM,
        metadata={"rig": "bench-3"},
        upload_key=uuid.uuid4().hex,
        **kw,  # type: ignore[arg-type]
    )


def opts(**kw: object) -> UploadOptions:
    base: dict[str, object] = {"policy": FAST, "abort_on_give_up": True}
    base.update(kw)
    return UploadOptions(**base)  # type: ignore[arg-type]


def storage_requests(sb: Sandbox) -> list:  # type: ignore[type-arg]
    return [r for r in sb.requests if r.kind == "storage"]


def _count_reads(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[int]:
    """Counts the bytes ``os.pread`` returns from ``path`` (one total, updated in place)."""
    total = [0]
    real = os.pread
    target = os.path.realpath(path)

    def counting(fd: int, n: int, offset: int) -> bytes:
        data = real(fd, n, offset)
        if os.path.realpath(f"/proc/self/fd/{fd}") == target:
            total[0] += len(data)
        return data

    monkeypatch.setattr(os, "pread", counting)
    return total


@pytest.mark.parametrize(
    ("size", "mode"),
    [(10_000, "server"), (300 * 1024, "single"), (5 * 256 * 1024 + 123, "multipart")],
)
async def test_every_mode_delivers_identical_bytes(
    sandbox: Sandbox, client_factory, tmp_path: Path, size: int, mode: str, monkeypatch
) -> None:
    data = write_file(tmp_path / "run.csv", size, seed=size)
    read = _count_reads(monkeypatch, tmp_path / "run.csv")
    async with client_factory() as client:
        result = await upload_file(client, request_for(tmp_path / "run.csv"), options=opts())
    assert result.mode == mode
    assert not result.fell_back
    assert result.bytes_sent == size
    assert sandbox.dataset_bytes(result.dataset_id) == data
    ds = sandbox.datasets[result.dataset_id]
    assert ds.metadata["rig"] == "bench-3"
    assert UPLOAD_KEY_FIELD in ds.metadata
    st = os.stat(tmp_path / "run.csv")
    assert ds.metadata[FILE_SIZE_FIELD] == size
    assert ds.metadata[FILE_MTIME_FIELD] == str(st.st_mtime_ns)
    # What was sent is hashed while it streams: every byte read once, no second pass.
    segment = 256 * 1024 if mode == "multipart" else size
    assert result.content_hash == content_hash_of(data, segment)
    assert read == [size]
    # The token never travels to storage URLs.
    assert all(not r.has_authorization for r in storage_requests(sandbox))


async def test_multipart_part_concurrency_and_progress(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    size = 9 * 256 * 1024 + 7
    data = write_file(tmp_path / "big.mf4", size)
    seen: list[int] = []
    async with client_factory() as client:
        result = await upload_file(
            client,
            request_for(tmp_path / "big.mf4"),
            options=opts(part_concurrency=3),
            progress=seen.append,
        )
    assert sum(seen) == size
    assert sandbox.dataset_bytes(result.dataset_id) == data
    puts = [r for r in storage_requests(sandbox) if r.method == "PUT"]
    assert len(puts) == 10


async def test_expired_part_urls_are_refreshed(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    sandbox.config.url_ttl = 0.4
    sandbox.faults.storage_delay_per_mib = 1.0  # 256 KiB part ≈ 0.25 s
    data = write_file(tmp_path / "slow.bin", 6 * 256 * 1024)
    async with client_factory() as client:
        result = await upload_file(
            client,
            request_for(tmp_path / "slow.bin"),
            # Never refresh ahead of time: make the URLs really expire on the storage side.
            options=opts(part_concurrency=1, url_refresh_margin=-100.0),
        )
    assert sandbox.dataset_bytes(result.dataset_id) == data
    expired = [r for r in storage_requests(sandbox) if r.status == 403]
    assert expired, "the test must make at least one URL expire"
    url_calls = [r for r in sandbox.requests if r.path.endswith("/upload/part-urls")]
    assert len(url_calls) >= 2


async def test_single_storage_failure_falls_back_to_server(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    sandbox.faults.storage_fail_always = True
    data = write_file(tmp_path / "s.bin", 200 * 1024)
    async with client_factory() as client:
        result = await upload_file(client, request_for(tmp_path / "s.bin"), options=opts())
    assert result.mode == "single"
    assert result.fell_back
    assert sandbox.dataset_bytes(result.dataset_id) == data
    assert sandbox.ingestions[result.ingestion_id].state == "COMPLETED"


async def test_permanent_storage_failure_aborts_with_reason(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    sandbox.faults.storage_fail_always = True
    write_file(tmp_path / "m.bin", 3 * 256 * 1024)
    async with client_factory() as client:
        with pytest.raises(UploadFailed) as err:
            await upload_file(client, request_for(tmp_path / "m.bin"), options=opts())
    (ing,) = sandbox.ingestions.values()
    assert ing.state == "ABORTED"
    assert "part" in (ing.abort_reason or "")
    assert "HTTP 500" in err.value.reason


async def test_rate_limits_and_503_are_retried_honouring_retry_after(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    sandbox.faults.retry_after = 0.3
    sandbox.faults.fail_next["POST /ingestion"] = [429, 503]
    sandbox.faults.fail_next["GET /ingestion/{id}/upload/part-urls"] = [503]
    data = write_file(tmp_path / "r.bin", 3 * 256 * 1024)
    started = anyio.current_time()
    async with client_factory() as client:
        result = await upload_file(client, request_for(tmp_path / "r.bin"), options=opts())
    elapsed = anyio.current_time() - started
    assert sandbox.dataset_bytes(result.dataset_id) == data
    statuses = [r.status for r in sandbox.requests if r.kind == "api"]
    assert statuses.count(429) == 1
    assert statuses.count(503) == 2
    # Our own backoff is capped at 0.1 s here: only Retry-After explains 3 waits of 0.3 s.
    assert elapsed >= 0.9
    assert len(sandbox.datasets) == 1


async def test_random_api_faults_still_deliver_once(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    sandbox.faults.seed = 7
    sandbox.faults.api_503_rate = 0.3
    sandbox.faults.api_429_rate = 0.2
    data = write_file(tmp_path / "r.bin", 3 * 256 * 1024)
    async with client_factory() as client:
        result = await upload_file(
            client,
            request_for(tmp_path / "r.bin"),
            options=opts(policy=RetryPolicy(12, 0.01, 0.05)),
        )
    assert sandbox.dataset_bytes(result.dataset_id) == data
    assert len(sandbox.datasets) == 1


async def test_lost_create_response_never_makes_a_second_dataset(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    sandbox.faults.fail_next["POST /ingestion"] = [0, 0]
    data = write_file(tmp_path / "lost.csv", 5_000)
    async with client_factory() as client:
        result = await upload_file(client, request_for(tmp_path / "lost.csv"), options=opts())
    assert len(sandbox.datasets) == 1
    assert sandbox.dataset_bytes(result.dataset_id) == data
    # The ingestions whose answers were lost were replaced, not left dangling as open uploads.
    open_ = [i for i in sandbox.ingestions.values() if i.state == "UPLOADING"]
    assert open_ == []


async def test_lost_complete_response_is_not_turned_into_an_abort(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    sandbox.faults.fail_next["POST /ingestion/{id}/upload/complete"] = [0]
    write_file(tmp_path / "c.csv", 5_000)
    async with client_factory() as client:
        result = await upload_file(client, request_for(tmp_path / "c.csv"), options=opts())
    assert result.recovered
    assert sandbox.ingestions[result.ingestion_id].state == "COMPLETED"
    assert sandbox.ingestions[result.ingestion_id].abort_reason is None


async def test_resume_after_crash_in_creating_reuses_the_dataset(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    """A process died after sending POST /ingestion, before saving the answer."""
    data = write_file(tmp_path / "k.csv", 5_000)
    req = request_for(tmp_path / "k.csv")
    async with client_factory() as client:
        first = await client.create_ingestion(
            stream_id=1,
            dataset_name=req.dataset_name,
            file_size=req.file.size,
            metadata={UPLOAD_KEY_FIELD: req.upload_key},
        )
        result = await upload_file(client, req, options=opts(), resume=Resume(stage="creating"))
    assert result.dataset_id == first.dataset_id
    assert len(sandbox.datasets) == 1
    assert sandbox.dataset_bytes(result.dataset_id) == data


async def test_multipart_resume_sends_only_missing_parts(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    size = 8 * 256 * 1024
    data = write_file(tmp_path / "r.mf4", size)
    req = request_for(tmp_path / "r.mf4")
    journal = MemoryJournal()
    sandbox.faults.storage_delay_per_mib = 0.4
    async with client_factory() as client:
        with anyio.move_on_after(5) as scope:
            sent = 0

            def progress(n: int) -> None:
                nonlocal sent
                sent += n
                if len(journal.resume.parts_done) >= 3:
                    scope.cancel()

            await upload_file(
                client,
                req,
                options=opts(part_concurrency=1, abort_on_give_up=False),
                journal=journal,
                progress=progress,
            )
        assert scope.cancel_called
        done_before = set(journal.resume.parts_done)
        assert 3 <= len(done_before) < 8
        sandbox.faults.storage_delay_per_mib = 0.0
        before = len([r for r in storage_requests(sandbox) if r.method == "PUT"])
        result = await upload_file(client, req, options=opts(), resume=journal.resume)
    puts = [r for r in storage_requests(sandbox) if r.method == "PUT"][before:]
    numbers = [int(r.path.rsplit("/", 1)[1]) for r in puts]
    missing = sorted(set(range(1, 9)) - done_before)
    # Only the missing parts, each once; the cancelled first pass may still have one PUT of
    # its own in flight that the sandbox logs only now (part_concurrency=1: at most one).
    assert not set(numbers) & done_before
    assert sorted(set(numbers)) == missing
    assert len(missing) <= len(numbers) <= len(missing) + 1
    assert result.bytes_sent == size - len(done_before) * 256 * 1024
    assert sandbox.dataset_bytes(result.dataset_id) == data
    assert len(sandbox.datasets) == 1
    # The parts sent before the restart kept their digests; the others were hashed now.
    assert set(journal.resume.part_digests) == done_before
    assert result.content_hash == content_hash_of(data, 256 * 1024)


async def test_file_changed_during_upload_aborts(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    path = tmp_path / "grow.bin"
    write_file(path, 4 * 256 * 1024)
    req = request_for(path)
    appended = False

    def progress(n: int) -> None:
        nonlocal appended
        if not appended:
            appended = True
            with path.open("ab") as fh:
                fh.write(b"more data")

    async with client_factory() as client:
        with pytest.raises(FileChangedError):
            await upload_file(client, req, options=opts(), progress=progress)
    (ing,) = sandbox.ingestions.values()
    assert ing.state == "ABORTED"
    assert "changed" in (ing.abort_reason or "")


async def test_empty_file_is_refused_before_any_request(
    sandbox: Sandbox, client_factory, tmp_path: Path
) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    async with client_factory() as client:
        with pytest.raises(EmptyFileError) as err:
            await upload_file(client, request_for(tmp_path / "empty.csv"), options=opts())
    assert "empty" in str(err.value)
    assert "file_size" in str(err.value)
    assert sandbox.ingestions == {}


async def test_bad_token_says_so_and_never_shows_it(client_factory) -> None:
    async with client_factory(token="wrong-token-value") as client:
        with pytest.raises(AuthError) as err:
            await client.streams()
    assert "token" in str(err.value)
    assert "wrong-token-value" not in str(err.value)
    assert TOKEN not in str(err.value)


async def test_unknown_stream_lists_the_known_ones(client_factory) -> None:
    async with client_factory() as client:
        with pytest.raises(NotFoundError) as err:
            await client.resolve_stream("no such stream")
        by_name = await client.resolve_stream("VEHICLE logs")
    assert "inbox" in str(err.value)
    assert by_name.id == 2


async def test_client_reads_times_as_epoch_seconds_or_iso_text(
    client_factory, tmp_path: Path
) -> None:
    """The service sends epoch seconds (what the sandbox sends now); ISO 8601 text is read too."""
    from datetime import datetime

    from daemon.compat import UTC
    from daemon.delivery.marple_db.client import Dataset

    write_file(tmp_path / "t.bin", 100)
    async with client_factory() as client:
        (first, _) = await client.streams()
        result = await upload_file(client, request_for(tmp_path / "t.bin"), options=opts())
        found = await client.dataset("default", dataset_id=result.dataset_id)
    now = datetime.now(UTC).timestamp()
    assert first.created_at is not None and now - 600 < first.created_at <= now
    assert found is not None and found.created_at is not None
    assert first.created_at <= found.created_at <= now
    iso = Stream.model_validate({"id": 1, "name": "s", "created_at": "2026-01-02T03:04:05.5Z"})
    assert iso.created_at == datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC).timestamp()
    naive = Dataset.model_validate({"id": 1, "created_at": "2026-01-02T03:04:05"})
    assert naive.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
    # A time is only shown: a strange one is dropped, the answer still parses.
    for odd in ("yesterday", True, float("inf"), {"t": 1}, None):
        assert Dataset.model_validate({"id": 1, "created_at": odd}).created_at is None


async def test_size_mismatch_at_complete_is_reported(client_factory, tmp_path: Path) -> None:
    from daemon.delivery.files import FileSlice

    path = tmp_path / "short.csv"
    write_file(path, 1000)
    async with client_factory() as client:
        ing = await client.create_ingestion(stream_id=1, dataset_name="short.csv", file_size=2000)
        await client.upload_server(ing.ingestion_id, FileSlice(path, 0, 1000), filename="short.csv")
        with pytest.raises(RejectedError) as err:
            await client.complete(ing.ingestion_id)
    assert "size" in str(err.value)


async def test_fifo_swapped_in_for_the_file_fails_at_once(tmp_path: Path) -> None:
    # Opened in the event loop: a blocking open of a FIFO (no writer ever comes) would stall
    # the whole daemon, not just this upload.
    from daemon.delivery.files import FileSlice
    from daemon.errors import FileChangedError

    path = tmp_path / "run.csv"
    os.mkfifo(path)
    with anyio.fail_after(5), pytest.raises(FileChangedError, match="no longer a regular file"):
        async for _chunk in FileSlice(path, 0, 1000).chunks():
            pass


@pytest.mark.parametrize("policy", ["rename", "fail"])
async def test_name_clash_policies(
    sandbox: Sandbox, client_factory, tmp_path: Path, policy: str
) -> None:
    write_file(tmp_path / "a" / "run.csv", 3000, seed=1)
    write_file(tmp_path / "b" / "run.csv", 3000, seed=2)
    async with client_factory() as client:
        first = await upload_file(
            client, request_for(tmp_path / "a" / "run.csv", "x/run.csv"), options=opts()
        )
        second_req = request_for(tmp_path / "b" / "run.csv", "x/run.csv", on_name_clash=policy)
        if policy == "fail":
            with pytest.raises(UploadFailed, match="already exists"):
                await upload_file(client, second_req, options=opts())
            assert len(sandbox.datasets) == 1
            return
        second = await upload_file(client, second_req, options=opts())
    assert second.dataset_name == "x/run (2).csv"
    assert second.dataset_id != first.dataset_id
    assert sandbox.dataset_bytes(first.dataset_id) == (tmp_path / "a" / "run.csv").read_bytes()


async def test_connection_refused_is_a_transport_error(tmp_path: Path) -> None:
    from pydantic import SecretStr

    from daemon.errors import TransportError

    async with MarpleClient("http://127.0.0.1:9/api/v1", SecretStr("t"), timeout=2) as client:
        with pytest.raises(TransportError) as err:
            await client.health()
    assert not err.value.maybe_sent
    assert "cannot connect" in str(err.value)
