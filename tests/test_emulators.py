"""The real upload flow against real storage emulators: moto (S3) and Azurite (Azure Blob).

The sandbox plays the Marple DB API and hands out moto presigned URLs / Azurite SAS URLs; inboxd
uploads to the emulator itself, and the sandbox checks and publishes what landed there (S3
ListParts + CompleteMultipartUpload, Azure Get Blob Properties) at complete time.
"""

from __future__ import annotations

import base64
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import pytest
import structlog
from pydantic import SecretStr

from daemon.delivery.files import FileRef
from daemon.delivery.flow import MemoryJournal, Resume, UploadOptions
from daemon.delivery.marple_db.client import MarpleClient, Stream
from daemon.delivery.marple_db.upload import (
    _AZURE_BLOCK_SIZE,
    _AZURE_PUT_BLOB_MAX,
    UploadRequest,
    upload_file,
)
from daemon.retry import RetryPolicy
from daemon.sandbox import Sandbox, SandboxConfig, StreamDef, running_sandbox
from tests.support.data import TOKEN, content_hash_of, write_file

if TYPE_CHECKING:
    from tests.support.emulators import Azurite, MotoS3, S3Request

pytestmark = pytest.mark.emulator

KiB = 1024
PART = 64 * KiB
FAST = RetryPolicy(attempts=6, base=0.01, cap=0.1)
STREAM = Stream(id=1, name="inbox", datapool="default")
AZURE_STREAM = Stream(id=3, name="azure blobs", datapool="default")


# ------------------------------------------------------------------------------ fixtures


def _config(tmp_path: Path, **kw: object) -> SandboxConfig:
    base: dict[str, object] = {
        "data_dir": tmp_path / "sandbox",
        "token": TOKEN,
        "server_max_bytes": 16 * KiB,
        "single_max_bytes": 4 * PART,
        "part_size": PART,
        "import_seconds": 0.05,
    }
    base.update(kw)
    return SandboxConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def s3_sandbox(moto_s3: MotoS3, tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox whose single/multipart uploads go to moto (a fresh bucket per test)."""
    config = _config(
        tmp_path,
        storage="s3",
        s3_endpoint=moto_s3.endpoint,
        s3_bucket=f"inboxd-{uuid.uuid4().hex[:12]}",
    )
    with running_sandbox(config) as sb:
        yield sb


@pytest.fixture
def azure_sandbox(azurite: Azurite, tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox with stream 3 in mode "azure" on Azurite (a fresh container per test)."""
    config = _config(
        tmp_path,
        azure_account_url=azurite.account_url,
        azure_container=f"inboxd-{uuid.uuid4().hex[:12]}",
        streams=[
            StreamDef(id=1, name="inbox"),
            StreamDef(id=AZURE_STREAM.id, name=AZURE_STREAM.name, mode="azure"),
        ],
    )
    try:
        with running_sandbox(config) as sb:
            yield sb
    finally:
        azurite.delete_container(config.azure_container)


@pytest.fixture
async def s3_client(s3_sandbox: Sandbox) -> AsyncIterator[MarpleClient]:
    async with MarpleClient(s3_sandbox.url, SecretStr(TOKEN), timeout=30) as client:
        yield client


@pytest.fixture
async def azure_client(azure_sandbox: Sandbox) -> AsyncIterator[MarpleClient]:
    async with MarpleClient(azure_sandbox.url, SecretStr(TOKEN), timeout=30) as client:
        yield client


def request_for(path: Path, stream: Stream = STREAM) -> UploadRequest:
    return UploadRequest(
        file=FileRef.stat(path),
        dataset_name=path.name,
        stream=stream,
        metadata={"rig": "emulators"},
        upload_key=uuid.uuid4().hex,
    )


def opts(**kw: object) -> UploadOptions:
    base: dict[str, object] = {"policy": FAST, "abort_on_give_up": True}
    base.update(kw)
    return UploadOptions(**base)  # type: ignore[arg-type]


def part_puts(requests: list[S3Request]) -> list[S3Request]:
    """The presigned UploadPart requests (what inboxd sends for multipart)."""
    return [r for r in requests if r.method == "PUT" and r.presigned and r.part_number]


# ------------------------------------------------------------------------------------ S3


async def test_s3_single_presigned_put(
    s3_sandbox: Sandbox, moto_s3: MotoS3, s3_client: MarpleClient, tmp_path: Path
) -> None:
    data = write_file(tmp_path / "one.csv", 3 * PART + 17, seed=1)
    result = await upload_file(s3_client, request_for(tmp_path / "one.csv"), options=opts())
    assert result.mode == "single"
    assert not result.fell_back
    assert result.bytes_sent == len(data)
    assert s3_sandbox.datasets[result.dataset_id].location == (
        "s3",
        s3_sandbox.ingestions[result.ingestion_id].s3_key,
    )
    assert await anyio.to_thread.run_sync(s3_sandbox.dataset_bytes, result.dataset_id) == data
    puts = [r for r in moto_s3.requests if r.method == "PUT" and r.presigned]
    assert [(r.status, r.headers.get("content-length")) for r in puts] == [(200, str(len(data)))]
    assert s3_sandbox.ingestions[result.ingestion_id].state == "COMPLETED"


async def test_s3_multipart_completed_by_sandbox_with_list_parts(
    s3_sandbox: Sandbox, moto_s3: MotoS3, s3_client: MarpleClient, tmp_path: Path
) -> None:
    size = 5 * PART + 123
    data = write_file(tmp_path / "big.mf4", size, seed=2)
    result = await upload_file(
        s3_client, request_for(tmp_path / "big.mf4"), options=opts(part_concurrency=3)
    )
    assert result.mode == "multipart"
    assert result.bytes_sent == size
    log = moto_s3.requests
    puts = part_puts(log)
    assert sorted(r.part_number or 0 for r in puts) == [1, 2, 3, 4, 5, 6]
    assert all(r.status == 200 for r in puts)
    # The sandbox (not inboxd) listed the parts and completed the upload, with its own S3 key.
    list_parts = [r for r in log if r.method == "GET" and "uploadId" in r.query]
    completes = [r for r in log if r.method == "POST" and "uploadId" in r.query]
    assert list_parts and all(not r.presigned for r in list_parts)
    assert [r.status for r in completes] == [200]
    assert log.index(completes[0]) > max(log.index(r) for r in puts)
    assert await anyio.to_thread.run_sync(s3_sandbox.dataset_bytes, result.dataset_id) == data
    s3 = moto_s3.client()
    bucket = s3_sandbox.config.s3_bucket
    uploads = await anyio.to_thread.run_sync(lambda: s3.list_multipart_uploads(Bucket=bucket))
    assert uploads.get("Uploads", []) == []


async def test_s3_multipart_resume_sends_only_missing_parts(
    s3_sandbox: Sandbox, moto_s3: MotoS3, s3_client: MarpleClient, tmp_path: Path
) -> None:
    total = 8
    size = total * PART
    data = write_file(tmp_path / "r.mf4", size, seed=3)
    req = request_for(tmp_path / "r.mf4")
    journal = MemoryJournal()
    with anyio.move_on_after(20) as scope:

        def progress(_: int) -> None:
            # Parts go one at a time: "the process dies" while the 4th part is on the wire.
            if len(journal.resume.parts_done) >= 3:
                scope.cancel()

        await upload_file(
            s3_client,
            req,
            options=opts(part_concurrency=1, abort_on_give_up=False),
            journal=journal,
            progress=progress,
        )
    assert scope.cancel_called
    done_before = set(journal.resume.parts_done)
    assert 3 <= len(done_before) < total
    assert journal.resume.stage == "uploading"
    missing = set(range(1, total + 1)) - done_before
    # The interrupted part's headers were on the wire: wait until moto has answered it, so
    # that request is not mistaken for one of the resumed upload's.
    interrupted = min(missing)
    with anyio.fail_after(10):
        while not any(
            r.part_number == interrupted and r.status is not None for r in moto_s3.requests
        ):
            await anyio.sleep(0.01)
    before = len(moto_s3.requests)

    result = await upload_file(s3_client, req, options=opts(), resume=journal.resume)

    resent = part_puts(moto_s3.requests[before:])
    assert sorted(r.part_number or 0 for r in resent) == sorted(missing)
    assert result.bytes_sent == size - len(done_before) * PART
    assert await anyio.to_thread.run_sync(s3_sandbox.dataset_bytes, result.dataset_id) == data
    assert len(s3_sandbox.datasets) == 1
    assert len(s3_sandbox.ingestions) == 1


async def test_token_never_reaches_s3(
    s3_sandbox: Sandbox, moto_s3: MotoS3, s3_client: MarpleClient, tmp_path: Path
) -> None:
    write_file(tmp_path / "single.bin", 2 * PART, seed=4)
    write_file(tmp_path / "multi.bin", 6 * PART, seed=5)
    for name in ("single.bin", "multi.bin"):
        await upload_file(s3_client, request_for(tmp_path / name), options=opts())

    # The sandbox saw the token on API calls only, and no storage request at all (S3 is moto).
    api = [r for r in s3_sandbox.requests if r.kind == "api" and r.route != "GET /health"]
    assert api and all(r.authorization == f"Bearer {TOKEN}" for r in api)
    assert [r for r in s3_sandbox.requests if r.kind == "storage"] == []

    # moto saw inboxd's presigned PUTs (1 single + 6 parts) with no Marple header at all.
    log = moto_s3.requests
    presigned = [r for r in log if r.presigned]
    assert len(presigned) == 7
    for r in presigned:
        assert "authorization" not in r.headers
        assert "x-request-source" not in r.headers
        assert not r.headers.get("user-agent", "").startswith("inboxd/")
    assert all(TOKEN not in r.text() for r in log)


async def test_s3_single_failure_falls_back_to_server(
    s3_sandbox: Sandbox, moto_s3: MotoS3, s3_client: MarpleClient, tmp_path: Path
) -> None:
    # The bucket disappears: every presigned PUT answers 404 NoSuchBucket.
    s3 = moto_s3.client()
    bucket = s3_sandbox.config.s3_bucket
    await anyio.to_thread.run_sync(lambda: s3.delete_bucket(Bucket=bucket))
    data = write_file(tmp_path / "s.bin", 2 * PART, seed=6)
    result = await upload_file(
        s3_client, request_for(tmp_path / "s.bin"), options=opts(storage_attempts=3)
    )
    assert result.mode == "single"
    assert result.fell_back
    assert result.bytes_sent == len(data)
    assert [r.status for r in moto_s3.requests if r.presigned] == [404, 404, 404]
    ingestion = s3_sandbox.ingestions[result.ingestion_id]
    assert ingestion.state == "COMPLETED"
    assert ingestion.server_upload
    location = s3_sandbox.datasets[result.dataset_id].location
    assert location is not None and location[0] == "local"
    assert s3_sandbox.dataset_bytes(result.dataset_id) == data


# --------------------------------------------------------------------------------- Azure


class _HookJournal(MemoryJournal):
    """A MemoryJournal that runs ``hook`` once, when the ingestion exists (before uploading)."""

    def __init__(self, hook: Callable[[Resume], Awaitable[None]] | None = None) -> None:
        super().__init__()
        self._hook = hook
        self._ran = False
        self.parts: list[int] = []

    async def save(self, resume: Resume) -> None:
        await super().save(resume)
        if self._ran or resume.stage != "uploading" or resume.ingestion_id is None:
            return
        self._ran = True
        if self._hook is not None:
            await self._hook(resume)

    async def part_done(self, part_number: int, digest: bytes | None = None) -> None:
        await super().part_done(part_number, digest)
        self.parts.append(part_number)


def _blob_of(sb: Sandbox, ingestion_id: int) -> str:
    blob = sb.ingestions[ingestion_id].azure_blob
    assert blob is not None
    return blob


async def test_azure_small_file_uses_put_blob(
    azure_sandbox: Sandbox, azurite: Azurite, azure_client: MarpleClient, tmp_path: Path
) -> None:
    data = write_file(tmp_path / "small.csv", 100 * KiB + 1, seed=7)
    result = await upload_file(
        azure_client, request_for(tmp_path / "small.csv", AZURE_STREAM), options=opts()
    )
    assert result.mode == "azure"
    assert not result.fell_back
    assert result.bytes_sent == len(data)
    blob = _blob_of(azure_sandbox, result.ingestion_id)
    assert azure_sandbox.datasets[result.dataset_id].location == ("azure", blob)
    assert await anyio.to_thread.run_sync(azure_sandbox.dataset_bytes, result.dataset_id) == data
    url = azurite.blob_url(azure_sandbox.config.azure_container, blob)
    head = await azurite.blob_properties(url)
    assert head.headers["x-ms-blob-type"] == "BlockBlob"
    # Put Blob: one request, no blocks staged or committed.
    listing = await azurite.block_list(url)
    assert listing.committed == listing.uncommitted == []


async def test_azure_large_file_uses_put_block_list(
    azure_sandbox: Sandbox, azurite: Azurite, azure_client: MarpleClient, tmp_path: Path
) -> None:
    # The smallest kind of file that takes the block path: just over the Put Blob limit.
    size = _AZURE_PUT_BLOB_MAX + 12_345
    data = write_file(tmp_path / "large.mf4", size, seed=8)
    journal = _HookJournal()
    result = await upload_file(
        azure_client,
        request_for(tmp_path / "large.mf4", AZURE_STREAM),
        options=opts(),
        journal=journal,
    )
    assert result.mode == "azure"
    assert not result.fell_back
    assert result.bytes_sent == size
    blocks = math.ceil(size / _AZURE_BLOCK_SIZE)
    assert sorted(journal.parts) == list(range(1, blocks + 1))
    blob = _blob_of(azure_sandbox, result.ingestion_id)
    listing = await azurite.block_list(azurite.blob_url(azure_sandbox.config.azure_container, blob))
    sizes = [b.size for b in listing.committed]
    assert sizes == [_AZURE_BLOCK_SIZE] * (blocks - 1) + [size - (blocks - 1) * _AZURE_BLOCK_SIZE]
    assert listing.uncommitted == []
    assert await anyio.to_thread.run_sync(azure_sandbox.dataset_bytes, result.dataset_id) == data
    # Each block hashed as it was sent; the content hash is made of the blocks' digests.
    assert sorted(journal.resume.part_digests) == list(range(1, blocks + 1))
    assert result.content_hash == content_hash_of(data, _AZURE_BLOCK_SIZE)


async def test_azure_block_ids_are_stable_and_replace_stale_blocks(
    azure_sandbox: Sandbox, azurite: Azurite, azure_client: MarpleClient, tmp_path: Path
) -> None:
    container = azure_sandbox.config.azure_container
    size = _AZURE_PUT_BLOB_MAX + 1
    write_file(tmp_path / "first.bin", size, seed=9)
    first = await upload_file(
        azure_client, request_for(tmp_path / "first.bin", AZURE_STREAM), options=opts()
    )
    first_url = azurite.blob_url(container, _blob_of(azure_sandbox, first.ingestion_id))
    ids = [b.id for b in (await azurite.block_list(first_url)).committed]
    assert len(ids) == len(set(ids)) == math.ceil(size / _AZURE_BLOCK_SIZE)
    assert len({len(i) for i in ids}) == 1  # Azure wants one id length per blob
    # A stray block of the same id length that no block list names.
    stray = base64.b64encode(b"s" * len(base64.b64decode(ids[0]))).decode()
    assert stray not in ids

    async def leave_stale_blocks(resume: Resume) -> None:
        # What an earlier, interrupted attempt would leave: blocks under the same ids with
        # other bytes, and one block the new attempt never sends.
        assert resume.ingestion_id is not None
        url = azurite.blob_url(container, _blob_of(azure_sandbox, resume.ingestion_id), "cw")
        await azurite.put_blocks(url, [(i, b"stale bytes %d" % n) for n, i in enumerate(ids)])
        await azurite.put_blocks(url, [(stray, b"never committed")])

    data = write_file(tmp_path / "second.bin", size, seed=10)
    second = await upload_file(
        azure_client,
        request_for(tmp_path / "second.bin", AZURE_STREAM),
        options=opts(),
        journal=_HookJournal(leave_stale_blocks),
    )
    assert not second.fell_back
    listing = await azurite.block_list(
        azurite.blob_url(container, _blob_of(azure_sandbox, second.ingestion_id))
    )
    # Same ids for another file and another attempt: a retried block replaces its own id.
    assert [b.id for b in listing.committed] == ids
    assert listing.uncommitted == []  # Put Block List dropped the stray block
    assert await anyio.to_thread.run_sync(azure_sandbox.dataset_bytes, second.dataset_id) == data


async def test_azure_expired_sas_falls_back_to_server(
    azure_sandbox: Sandbox, azurite: Azurite, azure_client: MarpleClient, tmp_path: Path
) -> None:
    azure_sandbox.config.url_ttl = 0.2
    data = write_file(tmp_path / "late.csv", 50 * KiB, seed=11)

    async def stall_until_the_sas_expired(resume: Resume) -> None:
        # The SAS expiry ("se") is a whole second no later than ceil(now + ttl): wait past it.
        # (A slow journal disk between creating the ingestion and uploading, say.)
        deadline = math.ceil(time.time() + azure_sandbox.config.url_ttl) + 0.1
        while time.time() < deadline:
            await anyio.sleep(deadline - time.time())

    with structlog.testing.capture_logs() as logs:
        result = await upload_file(
            azure_client,
            request_for(tmp_path / "late.csv", AZURE_STREAM),
            options=opts(),
            journal=_HookJournal(stall_until_the_sas_expired),
        )
    assert result.mode == "azure"
    assert result.fell_back
    assert result.bytes_sent == len(data)
    fallbacks = [e for e in logs if e["event"] == "upload.fallback_to_server"]
    assert len(fallbacks) == 1
    assert "403 AuthorizationFailure" in fallbacks[0]["reason"]
    ingestion = azure_sandbox.ingestions[result.ingestion_id]
    assert ingestion.state == "COMPLETED"
    assert ingestion.server_upload
    assert azure_sandbox.dataset_bytes(result.dataset_id) == data
    assert result.content_hash == content_hash_of(data, len(data))  # one piece: the fallback
    # The expired Put Blob stored nothing in Azure.
    blob = _blob_of(azure_sandbox, result.ingestion_id)
    head = await azurite.blob_properties(
        azurite.blob_url(azure_sandbox.config.azure_container, blob)
    )
    assert head.status_code == 404
