"""One file's ingestion: create → upload in the server's mode → complete, or abort.

The flow saves where it is through a ``Journal`` *before* each side effect and records what
finished *after* it, so a process that dies at any point can be resumed by passing the saved
``Resume`` back in: the ingestion is reused (never a second dataset), multipart uploads send only
the parts still missing, and a ``complete`` whose answer was lost is recognised, not repeated
into an abort.

Failures end one of three ways:

* retryable trouble that outlasted its retries (network, 5xx, 429) is raised unchanged and the
  ingestion is left open for a later resume — unless ``abort_on_give_up`` is set (one-shot
  ``inboxd push``), which aborts it;
* permanent trouble (a rejected request, a file that changed or vanished, storage that keeps
  refusing even the server fallback) aborts the ingestion with a reason and raises
  ``UploadFailed`` (or ``FileChangedError`` so the caller can start the new version);
* cancellation is re-raised; the ingestion is aborted only when ``abort_on_cancel`` is set.

Why one module: one ingestion (create → upload in the server's mode → complete, or abort) is
one class whose steps share the saved ``Resume`` and the journal; the three upload modes
differ in a few methods each and are read against each other. The client and the models
live in client.py, the file slices in daemon/delivery/files.py.
"""

from __future__ import annotations

import base64
import math
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Literal

import anyio
import structlog

from daemon import retry
from daemon.compat import BaseExceptionGroup
from daemon.delivery import content
from daemon.delivery.files import FileRef, FileSlice, Progress
from daemon.delivery.flow import (
    BytesSent,
    Journal,
    MemoryJournal,
    Resume,
    UploadOptions,
    delivered_hash,
)
from daemon.delivery.marple_db.client import (
    FAILED_STATUSES,
    Dataset,
    Ingestion,
    MarpleClient,
    Stream,
)
from daemon.errors import (
    ApiError,
    AuthError,
    ConflictError,
    EmptyFileError,
    FileChangedError,
    FileProblem,
    InboxdError,
    ProtocolError,
    RejectedError,
    StorageError,
    TransportError,
    UploadFailed,
    UrlExpiredError,
)
from daemon.state import Stage

_log = structlog.get_logger(__name__)

#: Metadata key that ties a dataset to the upload that made it (see
#: ``daemon.delivery.marple_db.client``).
UPLOAD_KEY_FIELD = "inboxd_upload_id"
#: Metadata keys with the file's facts that survive a restore from a backup (new inode and
#: ctime, same bytes and times): its size in bytes and its mtime in ns (a string of digits:
#: a JSON number that large may lose digits in a service that stores numbers as doubles).
#: A dataset of the same name whose metadata has the same two facts is recognised as this
#: file, already delivered (a restore over a fresh state database): not uploaded again.
FILE_SIZE_FIELD = "inboxd_file_size"
FILE_MTIME_FIELD = "inboxd_file_mtime_ns"
_MAX_FILE_SIZE = 256 * 1024**3
#: S3's limit of parts per multipart upload: a part list beyond it cannot be completed
_MAX_PARTS = 10_000
_AZURE_VERSION = "2023-11-03"
_AZURE_PUT_BLOB_MAX = 32 * 1024 * 1024
_AZURE_BLOCK_SIZE = 8 * 1024 * 1024
_AZURE_MAX_BLOCKS = 50_000

NameClash = Literal["rename", "fail", "overwrite"]


@dataclass(frozen=True)
class UploadRequest:
    file: FileRef
    dataset_name: str
    stream: Stream
    metadata: dict[str, Any]
    #: Unique per file identity; written into the dataset's metadata.
    upload_key: str
    on_name_clash: NameClash = "rename"
    plugin_args: str | None = None
    #: upload keys of earlier, unfinished versions of this same file: their dataset (aborted
    #: or still uploading, so holding no imported data) may be taken over instead of renaming
    predecessor_keys: frozenset[str] = frozenset()
    #: the id of the dataset an earlier version of this file was delivered to, when this
    #: version is that one with bytes appended: a dataset of ``dataset_name`` with this id is
    #: overwritten (same id) rather than renamed around (``[upload] on_append``)
    append_to: int | None = None
    #: recognise a dataset of the name that has this file's size and mtime (and is not ours)
    #: as this file, already delivered; off when the caller knows the path's history
    recognise_delivered: bool = True


@dataclass(frozen=True)
class UploadResult:
    dataset_id: int
    ingestion_id: int
    dataset_name: str
    mode: str
    fell_back: bool
    bytes_sent: int
    #: True when a lost answer was recovered by finding the work already done on the server.
    recovered: bool = False
    #: the hash of the bytes delivered (``daemon.delivery.content``); None if it could not be had
    content_hash: str | None = None
    #: "appended" (delivered into ``UploadRequest.append_to``), "on_server" (a dataset of the
    #: name already held this very file: nothing uploaded), else None
    change: str | None = None


async def upload_file(
    client: MarpleClient,
    request: UploadRequest,
    *,
    options: UploadOptions | None = None,
    resume: Resume | None = None,
    journal: Journal | None = None,
    progress: Progress | None = None,
) -> UploadResult:
    """Run (or resume) the whole ingestion flow for one file. See the module docstring."""
    flow = _Flow(client, request, options or UploadOptions(), resume, journal, progress)
    return await flow.run()


class _Flow:
    def __init__(
        self,
        client: MarpleClient,
        req: UploadRequest,
        opts: UploadOptions,
        resume: Resume | None,
        journal: Journal | None,
        progress: Progress | None,
    ) -> None:
        self.client = client
        self.req = req
        self.opts = opts
        self.state = replace(resume) if resume is not None else Resume()
        self.state.parts_done = set(self.state.parts_done)
        self.state.part_digests = dict(self.state.part_digests)
        #: the digest of the whole file as last sent in one piece (server, single, Put Blob)
        self.whole_digest: bytes | None = None
        self.journal: Journal = journal if journal is not None else MemoryJournal()
        self.sent = BytesSent(progress)
        self.ingestion: Ingestion | None = None
        self.log = _log.bind(dataset=req.dataset_name)

    @property
    def name(self) -> str:
        return self.state.dataset_name or self.req.dataset_name

    async def _save(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        await self.journal.save(self.state)

    async def run(self) -> UploadResult:
        f = self.req.file
        if f.size == 0:
            raise EmptyFileError(f"{f.path.name}: the file is empty (0 bytes)")
        if f.size > _MAX_FILE_SIZE:
            raise FileProblem(
                f"{f.path.name}: {f.size} bytes is above the 256 GiB limit of Marple DB",
                advice="split the file",
            )
        self.req.file.check_unchanged()
        # Resumed (not created in this run) on an ingestion that was uploading: the server
        # may be further along than the journal says.
        resumed_upload = (
            self.state.stage == Stage.UPLOADING
            and self.state.ingestion_id is not None
            and self.state.dataset_id is not None
        )
        if self.state.ingestion_id is None or self.state.stage in (Stage.NEW, Stage.CREATING):
            done = await self._create()
            if done is not None:
                return await self._with_hash(done)
        try:
            if resumed_upload and await self._server_has_it():
                # Resumed on an ingestion the server already completed: the journal lost
                # that (a power cut may drop the last commits). Never upload or abort it again.
                self.log.info("ingestion.found_completed", ingestion_id=self.state.ingestion_id)
                recovered = True
            elif self.state.stage == Stage.UPLOADING:
                await self._upload()
                # After the last byte was read and before complete: the bytes sent are one
                # whole version only if the file is still exactly the one pinned.
                self.req.file.check_unchanged()
                recovered = await self._complete()
            elif self.state.stage == Stage.COMPLETING:
                recovered = await self._complete()
            else:
                recovered = True
        except anyio.get_cancelled_exc_class():
            if self.opts.abort_on_cancel:
                await self._abort("upload cancelled (inboxd was stopped)")
            raise
        except FileChangedError as exc:
            await self._abort(f"file changed during upload: {exc.message}")
            raise
        except UploadFailed:
            raise
        except InboxdError as exc:
            # An answer we cannot understand that outlasted the step's tries is not an
            # outage: retrying the job would only repeat it (issue: nonsense in a loop).
            resumable = exc.retryable and not isinstance(exc, ProtocolError)
            if resumable and not self.opts.abort_on_give_up and not isinstance(exc, AuthError):
                raise  # left open: the caller resumes it later
            if isinstance(exc, AuthError) and not self.opts.abort_on_give_up:
                raise  # a token problem pauses uploads; the ingestion stays resumable
            reason = f"upload failed: {exc.message}"
            await self._abort(reason)
            # The recorded reason keeps the advice (what to do next); the server's abort
            # reason need not.
            raise UploadFailed(f"upload failed: {exc}", cause_kind=exc.kind) from exc
        # No journal entry for "completed": the caller records the outcome next, and a crash
        # before that resumes at "completing", which finds the upload done on the server.
        self.state.stage = Stage.COMPLETED
        assert self.state.ingestion_id is not None and self.state.dataset_id is not None
        appended = self.req.append_to is not None and self.state.dataset_id == self.req.append_to
        return await self._with_hash(
            UploadResult(
                dataset_id=self.state.dataset_id,
                ingestion_id=self.state.ingestion_id,
                dataset_name=self.name,
                mode=self.state.mode or "?",
                fell_back=self.state.fell_back,
                bytes_sent=self.sent.total,
                recovered=recovered,
                change="appended" if appended else None,
            )
        )

    # ---- content hash -------------------------------------------------------------------

    def _segmentation(self) -> tuple[int, dict[int, bytes]]:
        """The segment size of the bytes sent and the segment digests known (see
        ``daemon.delivery.content``): the parts or Azure blocks, else the whole file as one."""
        size = self.req.file.size
        part_size = self.state.part_size
        in_parts = self.state.mode == "multipart" or (
            self.state.mode == "azure" and size > _AZURE_PUT_BLOB_MAX
        )
        if in_parts and not self.state.fell_back and part_size and part_size > 0:
            return part_size, self.state.part_digests
        return size, ({1: self.whole_digest} if self.whole_digest is not None else {})

    async def _with_hash(self, result: UploadResult) -> UploadResult:
        """``result`` with the content hash of what the dataset holds.

        Combined from the digests taken while the segments streamed; a segment not hashed in
        this run (recorded before a restart by an older inboxd, or a recovery that found the
        upload already done) is read once now. The file is still the version pinned (checked
        before ``complete``), so its bytes are the ones delivered; if it changed since, the
        hash is left unknown (the next version then counts as a new one) rather than wrong.
        """
        segment, known = self._segmentation()
        return replace(result, content_hash=await delivered_hash(self.req.file, segment, known))

    # ---- create -------------------------------------------------------------------------

    def _is_ours(self, ds: Dataset | None) -> bool:
        return ds is not None and (ds.metadata or {}).get(UPLOAD_KEY_FIELD) == self.req.upload_key

    def _is_predecessor(self, ds: Dataset | None) -> bool:
        if ds is None or (ds.metadata or {}).get(UPLOAD_KEY_FIELD) not in self.req.predecessor_keys:
            return False
        return ds.import_status in FAILED_STATUSES or ds.import_status in (None, "UPLOADING")

    async def _lookup(self, name: str) -> Dataset | None:
        datapool = self.req.stream.datapool or "default"
        return await retry.call(
            lambda: self.client.dataset(datapool, path=name),
            self.opts.policy,
            what="find dataset",
            on_retry=self.opts.on_retry,
        )

    async def _create(self) -> UploadResult | None:
        """Create the ingestion; returns a result when the work turns out to be done already."""
        policy = self.opts.policy
        overwrite = self.req.on_name_clash == "overwrite"
        # A crash after the POST was sent leaves "creating": we cannot know whether it landed.
        ambiguous = self.state.stage == Stage.CREATING
        attempt = 0
        suffix = 1
        while True:
            attempt += 1
            if ambiguous:
                ds = await self._lookup(self.name)
                if ds is not None and self._is_ours(ds):
                    status = ds.import_status
                    if (
                        status is not None
                        and status != "UPLOADING"
                        and status not in FAILED_STATUSES
                    ):
                        # Completed earlier and the journal lost that (a power cut in WAL
                        # mode can drop the last commits): nothing to upload again.
                        return self._already_done(ds)
                    overwrite = True  # re-open our own dataset: same id, fresh ingestion
                ambiguous = False
            await self._save(stage=Stage.CREATING, dataset_name=self.name)
            try:
                ing = await self.client.create_ingestion(
                    stream_id=self.req.stream.id,
                    dataset_name=self.name,
                    file_size=self.req.file.size,
                    metadata={
                        **self.req.metadata,
                        UPLOAD_KEY_FIELD: self.req.upload_key,
                        FILE_SIZE_FIELD: self.req.file.size,
                        FILE_MTIME_FIELD: str(self.req.file.mtime_ns),
                    },
                    overwrite=overwrite,
                    plugin_args=self.req.plugin_args,
                )
            except ConflictError as exc:
                ds = await self._lookup(self.name)
                if self._is_ours(ds):
                    ambiguous = True
                    continue
                if self._is_predecessor(ds) or self._is_appended_to(ds):
                    overwrite = True
                    continue
                if ds is not None and self._is_this_file(ds):
                    return self._already_on_server(ds)
                if self.req.on_name_clash == "fail":
                    raise UploadFailed(
                        f"a dataset named {self.name!r} already exists in stream "
                        f"{self.req.stream.id} and was not made from this file "
                        '(upload.on_name_clash = "fail")',
                        cause_kind="name_clash",
                    ) from exc
                if self.req.on_name_clash == "overwrite":
                    overwrite = True
                    continue
                suffix += 1
                self.state.dataset_name = _numbered(self.req.dataset_name, suffix)
                attempt -= 1  # a rename is not a failed try
                continue
            except ProtocolError as exc:
                # A 2xx we cannot use (no dataset_id, say): whatever it created is no use to
                # us, so abort it now rather than leave it open, and give up after the
                # step's tries instead of creating ingestions in a loop.
                if exc.ingestion_id is not None:
                    await self._abort_other(exc.ingestion_id, f"unusable answer: {exc.detail}")
                if attempt >= policy.attempts:
                    raise UploadFailed(
                        f"the server's answer to POST /ingestion was unusable {attempt} times "
                        f"in a row: {exc.message}",
                        cause_kind="protocol",
                    ) from exc
                ambiguous = True
                await self._backoff(policy, attempt, exc, "create ingestion")
                continue
            except InboxdError as exc:
                if not exc.retryable or attempt >= policy.attempts:
                    raise
                # 5xx, a lost answer or garbage: the dataset may exist now. Look before retrying.
                ambiguous = not (isinstance(exc, TransportError) and not exc.maybe_sent)
                await self._backoff(policy, attempt, exc, "create ingestion")
                continue
            self.ingestion = ing
            await self._save(
                stage=Stage.UPLOADING,
                ingestion_id=ing.ingestion_id,
                dataset_id=ing.dataset_id,
                mode=ing.mode,
                part_size=ing.part_size,
                parts_done=set(),
                part_digests={},
                fell_back=False,
            )
            self.log.debug("ingestion.created", ingestion_id=ing.ingestion_id, mode=ing.mode)
            return None

    def _is_appended_to(self, ds: Dataset | None) -> bool:
        """Is ``ds`` the dataset an earlier version of this file went to (``append_to``)?"""
        return ds is not None and self.req.append_to is not None and ds.id == self.req.append_to

    def _is_this_file(self, ds: Dataset) -> bool:
        """Does ``ds`` (of our name, not made by this upload) already hold this very file?

        Its metadata has this file's size and mtime (``FILE_SIZE_FIELD``,
        ``FILE_MTIME_FIELD``; datasets of an inboxd before them have neither: never) and its
        upload did not fail. That is how a restore from a backup (the same bytes and times,
        new inodes and ctimes) over a fresh state database is told from another file of the
        same name; the content itself is not compared (the service keeps no hash of it).
        """
        if not (self.opts.recognise_delivered and self.req.recognise_delivered):
            return False
        meta = ds.metadata or {}
        recorded_size = _whole_number(meta.get(FILE_SIZE_FIELD))
        recorded_mtime = _whole_number(meta.get(FILE_MTIME_FIELD))
        if recorded_size is None or recorded_mtime is None:
            return False
        status = ds.import_status
        delivered = status not in (None, "UPLOADING") and status not in FAILED_STATUSES
        return (
            delivered
            and recorded_size == self.req.file.size
            and content.same_mtime(recorded_mtime, self.req.file.mtime_ns)
        )

    def _already_on_server(self, ds: Dataset) -> UploadResult:
        self.log.warning(
            "upload.already_on_server",
            dataset_id=ds.id,
            note=f"already on the server as dataset {ds.id} (same name, size and modification"
            " time): not uploaded again",
        )
        return UploadResult(
            dataset_id=ds.id,
            ingestion_id=0,
            dataset_name=self.name,
            mode="none",
            fell_back=False,
            bytes_sent=0,
            recovered=True,
            change="on_server",
        )

    def _already_done(self, ds: Dataset) -> UploadResult:
        self.log.info("ingestion.recovered", dataset_id=ds.id, import_status=ds.import_status)
        return UploadResult(
            dataset_id=ds.id,
            ingestion_id=self.state.ingestion_id or 0,
            dataset_name=self.name,
            mode=self.state.mode or "?",
            fell_back=self.state.fell_back,
            bytes_sent=0,
            recovered=True,
        )

    # ---- upload -------------------------------------------------------------------------

    async def _upload(self) -> None:
        mode = self.state.mode
        fresh_url = self.ingestion.presigned_url if self.ingestion is not None else None
        if self.state.fell_back or mode == "server":
            await self._server_upload()
        elif mode == "multipart":
            await self._multipart()
        elif mode in ("single", "azure"):
            if fresh_url is None:
                # Resumed after a restart: the signed URL was not kept (it is a credential and
                # has likely expired), so the same ingestion continues through the API server.
                await self._fallback("resumed after a restart without a storage URL")
                return
            try:
                if mode == "single":
                    await self._put_slice(
                        fresh_url, 0, self.req.file.size, "single upload", on_digest=self._whole
                    )
                else:
                    await self._azure(fresh_url)
            except StorageError as exc:
                await self._fallback(exc.message)
        else:
            raise RejectedError(
                f"the server chose upload mode {mode!r}, which this inboxd does not know",
                endpoint="POST /ingestion",
                advice="upgrade inboxd",
            )

    async def _fallback(self, why: str) -> None:
        if not self.opts.server_fallback:
            raise StorageError(f"direct storage upload failed: {why}")
        self.log.warning("upload.fallback_to_server", reason=why)
        await self._save(fell_back=True)
        await self._server_upload()

    def _slice(
        self, offset: int, length: int, on_digest: Callable[[bytes], None] | None = None
    ) -> FileSlice:
        f = self.req.file
        return FileSlice(
            f.path,
            offset,
            length,
            inode=f.inode,
            min_size=f.size,
            throttle=self.opts.throttle,
            chunk_size=self.opts.chunk_size,
            pinned=(f.mtime_ns, f.ctime_ns),
            on_digest=on_digest,
        )

    def _whole(self, digest: bytes) -> None:
        """``on_digest`` of a slice that is the whole file (one segment)."""
        self.whole_digest = digest

    async def _server_upload(self) -> None:
        assert self.state.ingestion_id is not None
        ingestion_id = self.state.ingestion_id

        async def once() -> None:
            add, undo = self.sent.tracker()
            try:
                await self.client.upload_server(
                    ingestion_id,
                    self._slice(0, self.req.file.size, self._whole),
                    filename=os.fsdecode(self.req.file.path.name),
                    progress=add,
                )
            except BaseException:
                undo()
                raise

        await retry.call(once, self.opts.policy, what="server upload", on_retry=self.opts.on_retry)

    async def _backoff(
        self, policy: retry.RetryPolicy, attempt: int, exc: InboxdError, what: str
    ) -> None:
        await retry.backoff(policy, attempt, exc, what=what, on_retry=self.opts.on_retry)

    async def _put_slice(
        self,
        url: str,
        offset: int,
        length: int,
        what: str,
        headers: dict[str, str] | None = None,
        on_digest: Callable[[bytes], None] | None = None,
    ) -> None:
        """PUT part of the file to a signed URL, with storage retries; ``on_digest`` gets
        the digest of the bytes of each try that read them all."""
        await self._storage_retry(
            lambda add: self.client.storage_put(
                url,
                self._slice(offset, length, on_digest),
                headers=headers,
                progress=add,
                what=what,
            ),
            what,
        )

    async def _storage_retry(
        self, put: Callable[[Progress], Any], what: str, *, expired_ok: bool = False
    ) -> None:
        """Retry one storage request; an expired URL is raised at once for the caller."""
        attempt = 0
        while True:
            attempt += 1
            add, undo = self.sent.tracker()
            try:
                await put(add)
                return
            except UrlExpiredError:
                undo()
                raise
            except (StorageError, TransportError) as exc:
                undo()
                if attempt >= self.opts.storage_attempts:
                    raise StorageError(
                        f"{what}: gave up after {attempt} tries: {exc.message}"
                    ) from exc
                await self._backoff(self.opts.policy, attempt, exc, what)
            except BaseException:
                undo()
                raise

    async def _multipart(self) -> None:
        assert self.state.ingestion_id is not None
        part_size = self.state.part_size
        if not part_size or part_size <= 0:
            raise RejectedError(
                "multipart ingestion without a part_size", endpoint="POST /ingestion"
            )
        size = self.req.file.size
        total = math.ceil(size / part_size)
        if total > _MAX_PARTS:
            raise RejectedError(
                f"the server's part_size {part_size} would split {size} bytes into {total} "
                f"parts (storage takes at most {_MAX_PARTS})",
                endpoint="POST /ingestion",
            )
        todo = [n for n in range(1, total + 1) if n not in self.state.parts_done]
        if len(todo) < total:
            self.log.info("multipart.resume", parts_done=total - len(todo), parts_total=total)
        urls = _PartUrlCache(
            self.client,
            self.state.ingestion_id,
            total,
            self.opts.policy,
            self.opts.url_refresh_margin,
        )
        pending = iter(todo)

        async def worker() -> None:
            for n in pending:
                start = (n - 1) * part_size
                length = min(part_size, size - start)
                await self._put_part(urls, n, start, length)

        await _run_workers(min(self.opts.part_concurrency, len(todo)), worker)

    async def _put_part(self, urls: _PartUrlCache, n: int, start: int, length: int) -> None:
        refreshes = 0
        digests: list[bytes] = []
        while True:
            url = await urls.get(n)
            try:
                await self._put_slice(url, start, length, f"part {n}", on_digest=digests.append)
            except UrlExpiredError:
                refreshes += 1
                if refreshes > self.opts.storage_attempts:
                    raise
                self.log.info("multipart.url_expired", part=n)
                urls.invalidate(n)
                continue
            break
        await self._part_stored(n, digests[-1] if digests else None)

    async def _part_stored(self, n: int, digest: bytes | None) -> None:
        """Record a stored part (or Azure block) with the digest of the bytes it holds."""
        self.state.parts_done.add(n)
        if digest is not None:
            self.state.part_digests[n] = digest
        await self.journal.part_done(n, digest)

    async def _azure(self, sas_url: str) -> None:
        size = self.req.file.size
        base_headers = {"x-ms-version": _AZURE_VERSION}
        if size <= _AZURE_PUT_BLOB_MAX:
            headers = {**base_headers, "x-ms-blob-type": "BlockBlob"}
            await self._put_slice(sas_url, 0, size, "azure put blob", headers, self._whole)
            return
        block = max(_AZURE_BLOCK_SIZE, math.ceil(size / _AZURE_MAX_BLOCKS))
        if self.state.part_size != block:
            await self._save(part_size=block, parts_done=set(), part_digests={})
        total = math.ceil(size / block)
        ids = [_block_id(n) for n in range(1, total + 1)]
        pending = iter([n for n in range(1, total + 1) if n not in self.state.parts_done])

        async def worker() -> None:
            for n in pending:
                start = (n - 1) * block
                length = min(block, size - start)
                url = f"{sas_url}&comp=block&blockid={_quote(ids[n - 1])}"
                digests: list[bytes] = []
                await self._put_slice(
                    url, start, length, f"azure block {n}", base_headers, digests.append
                )
                await self._part_stored(n, digests[-1] if digests else None)

        await _run_workers(min(self.opts.part_concurrency, total), worker)
        xml = "".join(f"<Latest>{i}</Latest>" for i in ids)
        body = f'<?xml version="1.0" encoding="utf-8"?><BlockList>{xml}</BlockList>'.encode()
        await self._storage_retry(
            lambda add: self.client.storage_put(
                f"{sas_url}&comp=blocklist",
                body,
                headers={**base_headers, "Content-Type": "application/xml"},
                what="azure put block list",
            ),
            "azure put block list",
        )

    # ---- complete / abort ---------------------------------------------------------------

    async def _complete(self) -> bool:
        """Complete the upload; True when a lost earlier answer turned out to have succeeded."""
        assert self.state.ingestion_id is not None and self.state.dataset_id is not None
        ingestion_id = self.state.ingestion_id
        resumed = self.state.stage == Stage.COMPLETING
        await self._save(stage=Stage.COMPLETING)
        if resumed and await self._server_has_it():
            return True
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.client.complete(ingestion_id)
                return False
            except ConflictError:
                # "not in UPLOADING": an earlier complete went through, or the server failed it.
                if await self._server_has_it():
                    return True
                raise
            except RejectedError as exc:
                # A 4xx: the contract does not say the server failed the ingestion (a size
                # mismatch does; other refusals need not). Ask: completed after all, failed
                # by the server (terminal: nothing to abort), or still open — then abort it,
                # so no ingestion is left UPLOADING.
                await self._refused_complete(exc)
                return True
            except InboxdError as exc:
                if not exc.retryable or attempt >= self.opts.policy.attempts:
                    raise
                await self._backoff(self.opts.policy, attempt, exc, "complete")
                if await self._server_has_it():
                    return True

    async def _refused_complete(self, exc: RejectedError) -> None:
        """``complete`` got a 4xx: returns if the upload completed after all, else raises
        UploadFailed, having aborted the ingestion unless the server already ended it."""
        if exc.status is not None and exc.status < 400:
            # A 2xx whose body says it failed: the server itself reports the outcome.
            raise UploadFailed(
                f"the server refused to complete the upload: {exc.detail}",
                cause_kind="size_mismatch",
            ) from exc
        try:
            if await self._server_has_it():
                return
        except UploadFailed as failed:
            kind = "size_mismatch" if "size" in failed.reason.lower() else failed.cause_kind
            raise UploadFailed(
                f"the server refused to complete the upload: {exc.detail}", cause_kind=kind
            ) from exc
        reason = f"the server refused to complete the upload: {exc.detail}"
        await self._abort(reason)
        raise UploadFailed(
            f"{reason} (HTTP {exc.status}); the ingestion was aborted",
            cause_kind="complete_refused",
        ) from exc

    async def _server_has_it(self) -> bool:
        """Has the dataset moved past UPLOADING? Then a complete already succeeded."""
        assert self.state.dataset_id is not None
        dataset_id = self.state.dataset_id
        statuses = await retry.call(
            lambda: self.client.datasets_status(self.req.stream.id, [dataset_id]),
            self.opts.policy,
            what="dataset status",
            on_retry=self.opts.on_retry,
        )
        for st in statuses:
            if st.dataset_id == dataset_id and st.import_status not in (None, "UPLOADING"):
                if st.import_status in FAILED_STATUSES:
                    why = st.import_message or st.import_status
                    raise UploadFailed(
                        f"the server marked the upload failed: {why}",
                        cause_kind="server_failed",
                    )
                return True
        return False

    async def _abort(self, reason: str) -> None:
        """Abort the open ingestion, shielded from cancellation; never raises."""
        ingestion_id = self.state.ingestion_id
        if ingestion_id is None:
            return
        await self._abort_other(ingestion_id, reason)

    async def _abort_other(self, ingestion_id: int, reason: str) -> None:
        """Abort ``ingestion_id`` with ``reason``, shielded from cancellation; never raises."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            try:
                await retry.call(
                    lambda: self.client.abort(ingestion_id, reason),
                    retry.RetryPolicy(attempts=3, base=0.2, cap=2.0),
                    what="abort",
                )
                self.log.warning("ingestion.aborted", ingestion_id=ingestion_id, reason=reason)
            except (ApiError, InboxdError) as exc:
                self.log.error("ingestion.abort_failed", ingestion_id=ingestion_id, error=str(exc))


class _PartUrlCache:
    """Signed part URLs fetched in batches, refreshed when near expiry or reported expired."""

    def __init__(
        self,
        client: MarpleClient,
        ingestion_id: int,
        total: int,
        policy: retry.RetryPolicy,
        margin: float,
        on_retry: retry.OnRetry | None = None,
    ) -> None:
        self._margin = margin
        self._on_retry = on_retry
        self._client = client
        self._ingestion_id = ingestion_id
        self._total = total
        self._policy = policy
        self._urls: dict[int, tuple[str, float]] = {}  # part → (url, good until)
        self._lock = anyio.Lock()

    async def get(self, n: int) -> str:
        async with self._lock:
            hit = self._urls.get(n)
            if hit is not None and time.monotonic() < hit[1]:
                return hit[0]
            batch = await retry.call(
                lambda: self._client.part_urls(self._ingestion_id, n, min(32, self._total - n + 1)),
                self._policy,
                what="part urls",
                on_retry=self._on_retry,
            )
            ttl = batch.expires_in if batch.expires_in is not None else 3600.0
            until = time.monotonic() + ttl * (1 - self._margin)
            for p in batch.parts:
                self._urls[p.part_number] = (p.url, until)
            # Forget parts already sent so the cache stays small on huge files.
            for k in [k for k in self._urls if k < n - 64]:
                del self._urls[k]
            if n not in self._urls:
                raise RejectedError(
                    f"the server sent no URL for part {n}",
                    endpoint="GET /ingestion/{id}/upload/part-urls",
                )
            return self._urls[n][0]

    def invalidate(self, n: int) -> None:
        self._urls.pop(n, None)


async def _run_workers(count: int, worker: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``count`` copies of ``worker``; the first failure cancels the rest and is raised
    as itself (not as an ExceptionGroup) so callers can tell what to do next."""
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(worker)
    except BaseExceptionGroup as group:
        raise _most_telling(group) from None


def _most_telling(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []

    def walk(eg: BaseExceptionGroup[BaseException]) -> None:
        for exc in eg.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                walk(exc)
            else:
                leaves.append(exc)

    walk(group)
    cancelled = anyio.get_cancelled_exc_class()
    for exc in leaves:
        if not isinstance(exc, cancelled):
            return exc
    return leaves[0]


def _whole_number(value: Any) -> int | None:
    """A metadata value as a whole number (sent as an int or a string of digits; a service
    may hand it back as either, or as a float), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _block_id(n: int) -> str:
    # Azure wants ids of one length per blob; a fixed-width counter is stable across restarts.
    return base64.b64encode(f"inboxd-{n:08d}".encode()).decode()


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _numbered(name: str, n: int) -> str:
    """``run.csv`` → ``run (2).csv``: the rename policy for a name taken by another file."""
    head, sep, last = name.rpartition("/")
    stem, dot, ext = last.rpartition(".")
    if not dot or not stem:
        stem, ext, dot = last, "", ""
    return f"{head}{sep}{stem} ({n}){dot}{ext}"
