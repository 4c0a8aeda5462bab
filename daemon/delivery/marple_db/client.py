"""Every Marple DB API call and every storage request, over httpx, mapped to our errors.

One attempt per call: retries are decided by the caller (``daemon.retry``) because only the
caller knows what makes a repetition safe. The table below is that knowledge.

=====================================  =========  ============================================
endpoint                               retry      what makes the retry safe
=====================================  =========  ============================================
GET /health, /streams, datasets        yes        reads
POST /stream/{id}/datasets/status      yes        a read, despite the verb
POST /ingestion                        guarded    after an ambiguous failure (no answer, 5xx,
                                                  409) the caller looks the dataset up by name;
                                                  if it carries our ``inboxd_upload_id`` it
                                                  re-creates the ingestion with
                                                  ``overwrite: true`` (same dataset id), so a
                                                  lost answer never makes a second dataset
POST .../upload/server                 yes        replaces what the ingestion holds so far
GET .../upload/part-urls               yes        a read; fresh URLs each time
PUT <part url>, <single url>           yes        a part/object PUT replaces the same key
PUT <azure block>, block list          yes        stable block ids; a block list is absolute
POST .../upload/complete               guarded    on 409 or an ambiguous failure the caller
                                                  reads the dataset: past UPLOADING means the
                                                  first try went through (no wrong abort)
POST .../abort                         yes        aborting an aborted ingestion is a no-op
=====================================  =========  ============================================

Storage requests go through a second httpx client that has no default headers of ours: the
API token can never reach a storage URL, and signed URLs never appear in our messages.

httpx's timeouts (``[api] timeout``) bound each connect, read and write, not a whole answer: a
server trickling a byte per second would hold a call forever. So every call also has an overall
deadline of ``DEADLINE_FACTOR`` (2) x ``[api] timeout`` (60 s by default), a retryable
TransportError (StorageError for storage) when it passes. A streamed request body (a file or a
part, which may take hours on a slow link) is not under it: its clock starts once the last byte
is sent, so only the answer is timed.

Answers are read capped at 16 MiB, gzip/deflate decoded by us in bounded steps (the decoded size
is capped too: a decompression bomb is refused, not inflated).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import ssl
import stat
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
import xxhash
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SecretStr,
    TypeAdapter,
    ValidationError,
)

from daemon import __version__
from daemon.compat import UTC, fromisoformat
from daemon.config import ApiSettings, UploadSettings
from daemon.errors import (
    ApiError,
    AuthError,
    ConflictError,
    FileChangedError,
    FileProblem,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RejectedError,
    ServerError,
    StorageError,
    TransportError,
    UrlExpiredError,
    scrub_secrets,
)
from daemon.net import backend
from daemon.retry import parse_retry_after

# 2 MiB: larger chunks cost fewer event-loop turns per byte; memory stays at
# part_concurrency x chunk (8 MiB by default) whatever the file or part size.
CHUNK_SIZE = 2 * 1024 * 1024
#: bytes read and sent at a time to an ``https://`` URL (at most). asyncio's TLS layer
#: encrypts each chunk into a buffer of its own size and copies it out again: chunks that stay
#: in the CPU's cache cost far less per byte (bench/run.sh --tls, 1 GiB over 4 connections:
#: 2 MiB chunks 2.1-2.8 s of CPU, 512 KiB 2.3, 256 KiB 1.7, 128 KiB 1.8, 64 KiB 2.1; curl 1.7).
#: Plain HTTP keeps CHUNK_SIZE: there larger chunks mean fewer event-loop turns per byte.
TLS_CHUNK_SIZE = 256 * 1024
_SLOW_READ = 0.02  # seconds; a read slower than this moves to a thread
_MAX_BODY = 16 * 1024 * 1024  # a larger API answer is a server fault, not data to hold in RAM
# httpx's timeouts bound each socket operation, so a server trickling a byte now and then
# would hold a call forever. A whole answer gets this many read timeouts ([api] timeout):
# room for the connect plus a server that thinks for almost a full timeout, yet a stuck
# call ends within a minute at the default 30 s. Streamed request bodies (file uploads) are
# not under it: their clock starts once the last byte is sent.
DEADLINE_FACTOR = 2.0
_SLOW_LINK = 64 * 1024  # bytes/s; extra deadline an in-memory request body earns
_INFLATE_STEP = 64 * 1024  # most bytes one inflate step may produce: a bomb never lands at once
# Only what _Inflater decodes: httpx would also offer br/zstd if those packages were installed.
_ACCEPT_ENCODING = "gzip, deflate"
_USER_AGENT = f"inboxd/{__version__}"

Progress = Callable[[int], None]
Throttle = Callable[[int], Awaitable[None]]

BUSY_STATUSES = frozenset({"UPLOADING", "WAITING", "IMPORTING", "POSTPROCESSING", "COOLING"})
OK_STATUSES = frozenset({"FINISHED", "LIVE"})
FAILED_STATUSES = frozenset({"FAILED", "COOLING_FAILED", "POSTPROCESSING_FAILED"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def _epoch_seconds(value: object) -> float | None:
    """A time as unix seconds, or None when it is missing or unreadable.

    The service sends epoch seconds (the official SDKs type them as floats); an ISO 8601 string
    (what older inboxd sandboxes sent) is read too. A time is shown, never acted on, so a
    strange one is dropped rather than failing the whole answer.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            when = fromisoformat(value.strip())
        except ValueError:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    return None


_Timestamp = Annotated[float | None, BeforeValidator(_epoch_seconds)]


class Stream(_Model):
    id: int
    name: str
    type: str | None = None
    datapool: str | None = None
    created_at: _Timestamp = None


class Ingestion(_Model):
    dataset_id: int
    ingestion_id: int
    mode: str
    presigned_url: str | None = None
    part_size: int | None = None
    expires_in: float | None = None


class PartUrl(_Model):
    part_number: int
    url: str


class PartUrls(_Model):
    parts: list[PartUrl]
    expires_in: float | None = None
    next_part: int | None = None


def _finite_or_none(value: float | None) -> float | None:
    """``value``, or None when it is NaN or infinite (JSON has no such numbers to show)."""
    return value if value is None or math.isfinite(value) else None


# JSON answers may say 1e999 or NaN (Python's json reads both): a progress we cannot show.
_Progress = Annotated[float | None, AfterValidator(_finite_or_none)]


class DatasetStatus(_Model):
    dataset_id: int
    import_status: str | None = None
    import_progress: _Progress = None
    import_message: str | None = None


class Dataset(_Model):
    id: int
    path: str | None = None
    metadata: dict[str, Any] | None = None
    import_status: str | None = None
    import_progress: _Progress = None
    import_message: str | None = None
    created_at: _Timestamp = None


_T = TypeVar("_T")
_STREAMS = TypeAdapter(list[Stream])
_INGESTION = TypeAdapter(Ingestion)
_PART_URLS = TypeAdapter(PartUrls)
_STATUSES = TypeAdapter(list[DatasetStatus])
_DATASET = TypeAdapter(Dataset)
_DATASETS = TypeAdapter(list[Dataset])


@dataclass(frozen=True)
class FileSlice:
    """Bytes ``[offset, offset + length)`` of a file, read lazily in bounded chunks.

    ``inode``/``min_size`` pin the file we mean: if the path now names another file, or the
    file got shorter, reading raises FileChangedError instead of sending other bytes.
    """

    path: Path
    offset: int
    length: int
    inode: int | None = None
    min_size: int | None = None
    #: awaited with each chunk's size before it is sent (the shared bandwidth limit)
    throttle: Throttle | None = None
    chunk_size: int = CHUNK_SIZE
    #: the version read must still be this one once its last byte is read (mtime and ctime,
    #: in ns): a rewrite during the read raises FileChangedError instead of mixing versions
    pinned: tuple[int, int] | None = None
    #: called with the xxh3_128 digest of the slice once a pass has read its last byte (and
    #: passed the ``pinned`` check): what was sent is hashed while it streams, no second read
    #: (``daemon.delivery.content``). Each pass (a retry reads the slice again) hashes afresh.
    on_digest: Callable[[bytes], None] | None = None

    async def chunks(self, progress: Progress | None = None) -> AsyncIterator[bytes]:
        """Yield the slice chunk by chunk; memory use is one chunk whatever the length."""
        chunk_size = self.chunk_size
        hasher = xxhash.xxh3_128() if self.on_digest is not None else None
        fd = await _open_slice(self.path, self.inode, self.min_size)
        try:
            pos, end = self.offset, self.offset + self.length
            # Reading in the event loop saves a thread round trip per chunk (a third of the
            # CPU per byte): right for page-cached and local files. A read that is slow (a
            # cold disk, a network filesystem) switches this slice to a worker thread so the
            # loop never stalls on it again.
            in_loop = True
            while pos < end:
                want = min(chunk_size, end - pos)
                if in_loop:
                    started = time.perf_counter()
                    data = os.pread(fd, want, pos)
                    in_loop = time.perf_counter() - started < _SLOW_READ
                else:
                    data = await anyio.to_thread.run_sync(os.pread, fd, want, pos)
                if not data:
                    raise FileChangedError(
                        f"{self.path.name}: file ended at byte {pos}, expected {end} bytes — "
                        "it was truncated while being uploaded"
                    )
                pos += len(data)
                if hasher is not None:
                    hasher.update(data)
                if pos >= end:
                    if self.pinned is not None:
                        _check_pinned(fd, self.path, self.pinned)
                    if hasher is not None and self.on_digest is not None:
                        self.on_digest(hasher.digest())
                if self.throttle is not None:
                    await self.throttle(len(data))
                if progress is not None:
                    progress(len(data))
                yield data
        finally:
            os.close(fd)


def _sized_for(source: FileSlice, url: str) -> FileSlice:
    """``source`` with chunks of at most ``TLS_CHUNK_SIZE`` when ``url`` is ``https://``."""
    if source.chunk_size > TLS_CHUNK_SIZE and url[:6].lower() == "https:":
        return dataclasses.replace(source, chunk_size=TLS_CHUNK_SIZE)
    return source


def _check_pinned(fd: int, path: Path, pinned: tuple[int, int]) -> None:
    """Raise FileChangedError unless the open file still has the pinned mtime and ctime.

    Checked after the last byte of a slice is read and before it is sent: every byte read
    came from one version only if nothing wrote to the file before this moment (a write
    moves the ctime even when a tool restores the mtime afterwards).
    """
    st = os.fstat(fd)
    mtime_ns, ctime_ns = pinned
    if st.st_mtime_ns != mtime_ns or (ctime_ns and st.st_ctime_ns != ctime_ns):
        raise FileChangedError(f"{path.name}: the file was written to while it was being read")


def multipart_file_body(
    source: FileSlice, *, filename: str, progress: Progress | None = None
) -> tuple[AsyncIterator[bytes], dict[str, str]]:
    """A streamed ``multipart/form-data`` body whose one field ``file`` holds ``source``.

    Returns the body and its headers. The length is computed up front, so the request carries a
    ``Content-Length`` (servers that refuse chunked uploads accept it) while memory stays at one
    chunk whatever the file size. Shared by every API that takes a file as a form field.
    """
    boundary = os.urandom(16).hex()
    safe = filename.encode("utf-8", "replace").decode("utf-8")
    safe = safe.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{safe}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        async for chunk in source.chunks(progress=progress):
            yield chunk
        yield tail

    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + source.length + len(tail)),
    }
    return body(), headers


#: False once an open in the event loop was slow: from then on files are opened in a thread
_open_in_loop = True


async def _open_slice(path: Path, inode: int | None, min_size: int | None) -> int:
    """``_open_for_read`` in the event loop while opens are fast, else in a worker thread.

    A thread round trip costs more than the open of a local, cached file (most uploads are
    small files just written); the first open that stalls the loop (a network filesystem,
    a cold disk) sends every later one to a thread, as reads do per slice.
    """
    global _open_in_loop
    if not _open_in_loop:
        return await anyio.to_thread.run_sync(_open_for_read, path, inode, min_size)
    started = time.perf_counter()
    try:
        return _open_for_read(path, inode, min_size)
    finally:
        if time.perf_counter() - started >= _SLOW_READ:
            _open_in_loop = False


def _open_for_read(path: Path, inode: int | None, min_size: int | None) -> int:
    try:
        # O_NONBLOCK: a FIFO or device swapped in for the file must not block the open (in
        # the event loop, that would stall the daemon); it changes nothing for regular files.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileChangedError(f"{path.name}: the file vanished before it was uploaded") from None
    except PermissionError:
        raise FileProblem(
            f"{path.name}: permission denied",
            advice="make the file readable by the inboxd user (e.g. chmod g+r, or a group ACL)",
        ) from None
    except OSError as exc:
        raise FileProblem(f"{path.name}: cannot open it ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileChangedError(f"{path.name}: is no longer a regular file")
    if (inode is not None and st.st_ino != inode) or (
        min_size is not None and st.st_size < min_size
    ):
        os.close(fd)
        raise FileChangedError(f"{path.name}: the file was replaced or truncated during the upload")
    return fd


def _retry_after(headers: httpx.Headers) -> float | None:
    """The answer's ``Retry-After``, parsed once (see ``daemon.retry.parse_retry_after``)."""
    return parse_retry_after(headers.get("retry-after"))


def redact_url(url: str) -> str:
    """``scheme://host/path`` of a signed URL: the query holds the signature, so drop it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing and sends nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass


def forget_cookies(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """Make ``client`` ignore cookies: none of our APIs uses them, and a storage server's
    cookie has no business in our next request. It also saves httpx's urllib-based cookie
    handling, ~40 us of CPU per request (a tenth of a small request's cost). httpx has no
    switch for it and copies any jar it is given into a plain one, hence the attribute.
    """
    client._cookies = _NoCookies()
    return client


def pool_size(upload: UploadSettings) -> int:
    """Connections a pool may keep for ``[upload]``: a part of every large file, every small
    file, and a few for the poller, the probe and part-URL requests."""
    return upload.workers * upload.part_concurrency + upload.small_files + 8


def tls_verify(verify: bool, ca_file: Path | None) -> ssl.SSLContext | bool:
    """httpx's ``verify`` for ``[api] verify_tls`` and ``ca_file``."""
    if not verify:
        return False
    if ca_file is None:
        return _default_ssl(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    # The usual trust store plus the private CA: storage URLs of a public cloud must still
    # verify when the API itself uses a private CA.
    ctx = httpx.create_ssl_context()
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


@functools.cache
def _default_ssl(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """httpx's default trust (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), loaded once per process
    rather than once per client (~20 ms of CPU each); keyed by those variables."""
    return httpx.create_ssl_context()


class MarpleClient:
    """An async client for one Marple DB server. Use as ``async with MarpleClient(...) as c:``."""

    def __init__(
        self,
        url: str,
        token: SecretStr,
        *,
        timeout: float = 30.0,
        verify_tls: bool = True,
        ca_file: Path | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        connections: int = 64,
    ) -> None:
        verify = tls_verify(verify_tls, ca_file)
        # Uploads of big parts may sit in one write for long on a slow link: the write timeout
        # bounds one socket write, not the whole body, so it can stay at the API timeout.
        tmo = httpx.Timeout(timeout, connect=min(timeout, 15.0))
        # Each pool keeps as many connections alive as requests can be in flight
        # (``pool_size``): one closed after each request would cost a new handshake (a round
        # trip, two with TLS) on the next.
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._base = url.rstrip("/")
        self._secret = token.get_secret_value()
        hooks = {"response": [_unfollowed_redirect]}
        self._api = httpx.AsyncClient(
            base_url=self._base,
            headers={
                "Authorization": f"Bearer {token.get_secret_value()}",
                "X-Request-Source": _USER_AGENT,
                "User-Agent": _USER_AGENT,
                "Accept-Encoding": _ACCEPT_ENCODING,
            },
            timeout=tmo,
            verify=verify,
            limits=limits,
            transport=transport,
            follow_redirects=False,
            event_hooks=hooks,
        )
        # Nothing of ours may reach a storage URL: Accept-Encoding only narrows httpx's own.
        self._storage = httpx.AsyncClient(
            headers={"Accept-Encoding": _ACCEPT_ENCODING},
            timeout=tmo,
            verify=verify,
            limits=limits,
            follow_redirects=False,
            event_hooks=hooks,
        )
        if transport is None:
            # A fifth less CPU per small request than httpcore's anyio streams (see netio).
            backend.adopt(self._api)
        backend.adopt(self._storage)
        forget_cookies(self._api)
        forget_cookies(self._storage)

    @classmethod
    def from_settings(cls, api: ApiSettings, upload: UploadSettings | None = None) -> MarpleClient:
        """The client for an ``[api]`` section (the token is resolved here), its connection
        pools sized for the requests ``upload`` can have in flight."""
        return cls(
            api.url,
            api.resolved_token(),
            timeout=api.timeout,
            verify_tls=api.verify_tls,
            ca_file=api.ca_file,
            connections=64 if upload is None else pool_size(upload),
        )

    @property
    def base_url(self) -> str:
        return self._base

    async def __aenter__(self) -> MarpleClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close both connection pools."""
        with anyio.CancelScope(shield=True):
            await self._api.aclose()
            await self._storage.aclose()

    # ---- API plumbing -------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        content: AsyncIterator[bytes] | bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One API request with the token, timeouts and capped reads; the decoded JSON answer.

        An error status becomes our error (``daemon.errors``); a retry is the caller's choice.
        """
        kwargs: dict[str, Any] = {"params": params, "headers": headers}
        if json_body is not None:
            kwargs["content"] = json.dumps(json_body).encode()
            kwargs["headers"] = {**(headers or {}), "Content-Type": "application/json"}
        elif content is not None:
            kwargs["content"] = content
        return await send_request(
            self._api,
            method,
            path,
            endpoint=endpoint,
            server=self._base,
            secret=self._secret,
            **kwargs,
        )

    # ---- endpoints ----------------------------------------------------------------------

    async def health(self) -> None:
        """``GET /health``; raises unless the server says it is healthy."""
        await self.request("GET", "/health", endpoint="GET /health")

    async def streams(self) -> list[Stream]:
        """``GET /streams``. A 403 here means the token is bad."""
        body = await self.request("GET", "/streams", endpoint="GET /streams")
        return parse_answer(_STREAMS, _field(body, "streams", "GET /streams"), "GET /streams")

    async def resolve_stream(self, ref: int | str) -> Stream:
        """Find a stream by id, or by name (case-insensitive)."""
        streams = await self.streams()
        if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().isdigit()):
            wanted = int(ref)
            for s in streams:
                if s.id == wanted:
                    return s
        else:
            for s in streams:
                if s.name.casefold() == ref.strip().casefold():
                    return s
        known = ", ".join(f"{s.id} ({s.name!r})" for s in streams) or "none"
        raise NotFoundError(
            f"no stream {ref!r} on the server; streams this token can see: {known}",
            endpoint="GET /streams",
            advice="set [upload] stream to one of those ids or names",
        )

    async def create_ingestion(
        self,
        *,
        stream_id: int,
        dataset_name: str,
        file_size: int,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        plugin_args: str | None = None,
    ) -> Ingestion:
        """``POST /ingestion``: creates the dataset (UPLOADING) and the ingestion."""
        payload: dict[str, Any] = {
            "stream_id": stream_id,
            "dataset_name": dataset_name,
            "file_size": file_size,
            "metadata": dict(metadata or {}),
            "overwrite": overwrite,
        }
        if plugin_args is not None:
            payload["plugin_args"] = plugin_args
        ep = "POST /ingestion"
        body = await self.request("POST", "/ingestion", endpoint=ep, json_body=payload)
        try:
            return parse_answer(_INGESTION, body, ep)
        except ProtocolError as exc:
            # The server may have created an ingestion all the same: name it, so the caller
            # can abort it instead of leaving it open.
            named = body.get("ingestion_id") if isinstance(body, dict) else None
            if isinstance(named, int) and not isinstance(named, bool):
                exc.ingestion_id = named
            raise

    async def upload_server(
        self,
        ingestion_id: int,
        source: FileSlice,
        *,
        filename: str,
        progress: Progress | None = None,
    ) -> None:
        """``POST /ingestion/{id}/upload/server`` as streamed multipart/form-data."""
        source = _sized_for(source, self._base)
        body, headers = multipart_file_body(source, filename=filename, progress=progress)
        ep = "POST /ingestion/{id}/upload/server"
        await self.request(
            "POST",
            f"/ingestion/{ingestion_id}/upload/server",
            endpoint=ep,
            content=body,
            headers=headers,
        )

    async def part_urls(self, ingestion_id: int, start_part: int, count: int = 32) -> PartUrls:
        """``GET /ingestion/{id}/upload/part-urls``: fresh signed URLs for a range of parts."""
        ep = "GET /ingestion/{id}/upload/part-urls"
        body = await self.request(
            "GET",
            f"/ingestion/{ingestion_id}/upload/part-urls",
            endpoint=ep,
            params={"start_part": start_part, "count": count},
        )
        return parse_answer(_PART_URLS, body, ep)

    async def complete(self, ingestion_id: int) -> None:
        """``POST /ingestion/{id}/upload/complete``; the server checks the stored size."""
        await self.request(
            "POST",
            f"/ingestion/{ingestion_id}/upload/complete",
            endpoint="POST /ingestion/{id}/upload/complete",
            content=b"",
        )

    async def abort(self, ingestion_id: int, reason: str) -> None:
        """``POST /ingestion/{id}/abort`` with a reason a person can read on the server."""
        await self.request(
            "POST",
            f"/ingestion/{ingestion_id}/abort",
            endpoint="POST /ingestion/{id}/abort",
            json_body={"reason": reason[:1000]},
        )

    async def datasets_status(self, stream_id: int, dataset_ids: list[int]) -> list[DatasetStatus]:
        """``POST /stream/{id}/datasets/status`` for a batch of datasets."""
        ep = "POST /stream/{id}/datasets/status"
        body = await self.request(
            "POST", f"/stream/{stream_id}/datasets/status", endpoint=ep, json_body=dataset_ids
        )
        if isinstance(body, dict) and isinstance(body.get("datasets"), list):
            body = body["datasets"]
        return parse_answer(_STATUSES, body, ep)

    async def dataset(
        self, datapool: str, *, dataset_id: int | None = None, path: str | None = None
    ) -> Dataset | None:
        """One dataset by id or by path; None when the server has no such dataset."""
        params: dict[str, Any] = {"id": dataset_id} if dataset_id is not None else {"path": path}
        ep = "GET /datapool/{datapool}/dataset"
        try:
            body = await self.request(
                "GET", f"/datapool/{datapool}/dataset", endpoint=ep, params=params
            )
        except NotFoundError:
            return None
        return parse_answer(_DATASET, body, ep)

    async def datasets(self, stream_id: int) -> list[Dataset]:
        """``GET /stream/{id}/datasets``."""
        ep = "GET /stream/{id}/datasets"
        body = await self.request("GET", f"/stream/{stream_id}/datasets", endpoint=ep)
        if isinstance(body, dict):
            body = body.get("datasets", body.get("items"))
        return parse_answer(_DATASETS, body, ep)

    # ---- storage ------------------------------------------------------------------------

    async def storage_put(
        self,
        url: str,
        source: FileSlice | bytes,
        *,
        headers: Mapping[str, str] | None = None,
        progress: Progress | None = None,
        what: str = "storage upload",
    ) -> httpx.Headers:
        """PUT raw bytes to a signed storage URL with ``Content-Length`` set; returns headers."""
        hdrs = dict(headers or {})
        content: bytes | AsyncIterator[bytes]
        if isinstance(source, bytes):
            content = source
        else:
            hdrs["Content-Length"] = str(source.length)
            content = _sized_for(source, url).chunks(progress=progress)
        return await self.storage_request("PUT", url, content=content, headers=hdrs, what=what)

    async def storage_request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | AsyncIterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        what: str = "storage request",
    ) -> httpx.Headers:
        """One request to a signed storage URL (S3 presigned or Azure SAS)."""
        try:
            where = redact_url(url)
            # httpx accepts port 99999 and the socket layer then raises a raw OverflowError.
            _ = urlsplit(url).port
        except ValueError:
            # The URL is not shown: its query holds the signature.
            raise StorageError(
                f"{what}: the server gave an unusable upload URL (it cannot be parsed)"
            ) from None
        scope, limit, content = _deadline_scope(self._storage, content)
        try:
            with scope:
                async with self._storage.stream(
                    method, url, content=content, headers=headers
                ) as resp:
                    body = await _read_capped(resp, what, storage=True)
            if scope.cancelled_caught:
                raise StorageError(f"{what} to {where}: no complete answer within {limit:g} s")
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise StorageError(
                f"{what} to {where}: the server gave an unusable upload URL "
                f"({_describe_httpx(exc)})"
            ) from None
        except httpx.TransportError as exc:
            raise StorageError(
                f"{what} to {where}: connection failed ({_describe_httpx(exc)})"
            ) from exc
        if resp.is_success:
            return resp.headers
        code, message = _storage_error_code(body)
        text = f"{what} to {where}: HTTP {resp.status_code}"
        if code:
            text += f" {code}"
        if message:
            text += f": {_short(message, 200)}"
        expired = resp.status_code == 403 and (
            "expired" in (message or "").lower()
            or code in {"AuthenticationFailed", "AuthorizationFailure"}
        )
        if expired:
            raise UrlExpiredError(text, status=resp.status_code, code=code)
        err = StorageError(text, status=resp.status_code, code=code)
        err.retry_after = _retry_after(resp.headers)
        raise err


async def send_request(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    endpoint: str,
    server: str,
    advice: str = "check [api] url (and [api] ca_file for a private CA), the network and "
    "that the server is up",
    secret: str = "",
    **kwargs: Any,
) -> Any:
    """One API request over ``http``: the decoded JSON answer, or our error for what went wrong.

    The one place that turns httpx outcomes into ``daemon.errors`` (connect failure → not sent,
    a lost answer → maybe sent, statuses → ``ApiError`` subclasses, capped bodies), shared by
    every API client. ``server`` and ``advice`` only word the connect-failure message; text
    that comes from elsewhere (httpx, the server's error body) is scrubbed of ``secret``.
    """
    scope, limit, kwargs["content"] = _deadline_scope(http, kwargs.get("content"))
    try:
        with scope:
            async with http.stream(method, url, **kwargs) as resp:
                body = await _read_capped(resp, endpoint)
        if scope.cancelled_caught:
            raise TransportError(
                f"{endpoint}: no complete answer within {limit:g} s "
                f"({DEADLINE_FACTOR:g} x [api] timeout): the server or a proxy is stuck "
                "or trickling its answer"
            )
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise TransportError(
            f"{endpoint}: cannot connect to {server} "
            f"({scrub_secrets(_describe_httpx(exc), secret)})",
            maybe_sent=False,
            advice=advice,
        ) from exc
    except httpx.TransportError as exc:
        raise TransportError(
            f"{endpoint}: no complete answer from the server "
            f"({scrub_secrets(_describe_httpx(exc), secret)})"
        ) from exc
    except httpx.InvalidURL as exc:
        # Not a TransportError in httpx: a malformed redirect Location (clients without the
        # _unfollowed_redirect hook) or a URL built from what the server sent.
        raise ProtocolError(
            f"the request or the server's redirect has an unusable URL "
            f"({scrub_secrets(_describe_httpx(exc), secret)})",
            endpoint=endpoint,
        ) from None
    if secret and secret.encode() in body:
        body = body.replace(secret.encode(), b"<redacted>")
    return _decode(resp, body, endpoint)


def _deadline_scope(http: httpx.AsyncClient, content: Any) -> tuple[anyio.CancelScope, float, Any]:
    """The cancel scope that bounds one whole call, its limit, and the content to send.

    An in-memory body starts the clock at once, with extra time for its size. A streamed
    body (a file part of any size, on a link of any speed) is not bounded here: the clock
    starts when its last chunk has been handed to httpx, so only the answer is timed.
    """
    limit = DEADLINE_FACTOR * (http.timeout.read or 30.0)
    scope = anyio.CancelScope()
    if content is None or isinstance(content, bytes | bytearray | str):
        scope.deadline = anyio.current_time() + limit + len(content or b"") / _SLOW_LINK
        return scope, limit, content
    return scope, limit, _clock_after(content, scope, limit)


async def _clock_after(
    body: AsyncIterator[bytes], scope: anyio.CancelScope, limit: float
) -> AsyncIterator[bytes]:
    async for chunk in body:
        yield chunk
    scope.deadline = anyio.current_time() + limit


async def _unfollowed_redirect(resp: httpx.Response) -> None:
    """Drop a redirect's ``Location``: we never follow one, yet httpx builds the next request
    from it anyway, and a malformed one (``A:0``) raises InvalidURL there, losing the answer."""
    if resp.has_redirect_location:
        del resp.headers["Location"]


class _Inflater:
    """One ``Content-Encoding`` step (gzip or deflate), undone in bounded pieces."""

    def __init__(self, coding: str) -> None:
        self._zlib: Any = None
        self._head = b""
        if coding in ("gzip", "x-gzip"):
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 16)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._zlib is None:
            # "deflate" should be zlib-wrapped (RFC 9110) but some servers send it raw:
            # the two header bytes tell which, as httpx's own decoder also allows both.
            self._head += data
            if len(self._head) < 2:
                return
            data, cmf, flg = self._head, self._head[0], self._head[1]
            wrapped = cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        while True:
            out = self._zlib.decompress(data, _INFLATE_STEP)
            if out:
                yield out
            data = self._zlib.unconsumed_tail
            if not data and len(out) < _INFLATE_STEP:
                return


def _decoded(stages: list[_Inflater], data: bytes) -> Iterator[bytes]:
    if not stages:
        yield data
        return
    for piece in stages[0].feed(data):
        yield from _decoded(stages[1:], piece)


async def _read_capped(resp: httpx.Response, what: str, *, storage: bool = False) -> bytes:
    """The answer's body, Content-Encoding undone, at most ``_MAX_BODY`` bytes read or made.

    Decoding here (not httpx's ``aiter_bytes``) because httpx inflates each network chunk
    whole: 64 KiB of a gzip bomb would become 64 MiB before any cap could look at it.
    """
    cls = StorageError if storage else ProtocolError
    too_large = f"{what}: the answer is larger than {_MAX_BODY} bytes; refusing to read it"
    codings = [c.strip().lower() for c in resp.headers.get("content-encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    unknown = [c for c in codings if c not in ("gzip", "x-gzip", "deflate")]
    # Only a successful API answer needs its body; elsewhere it merely words the error, and
    # one we cannot decode must not hide the status.
    strict = not storage and resp.is_success
    if unknown and strict:
        raise cls(f"{what}: the answer is {unknown[0]!r}-encoded, which inboxd cannot read")
    stages = [] if unknown else [_Inflater(c) for c in reversed(codings)]
    buf = bytearray()
    raw = 0
    async for chunk in resp.aiter_raw():
        raw += len(chunk)
        if raw > _MAX_BODY:
            raise cls(too_large)
        try:
            for piece in _decoded(stages, chunk):
                buf += piece
                if len(buf) > _MAX_BODY:
                    raise cls(too_large)
        except zlib.error as exc:
            if not strict:
                return bytes(buf)
            raise cls(f"{what}: the answer's {codings[0]} encoding is corrupt ({exc})") from None
    return bytes(buf)


def _describe_httpx(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return _short(f"{type(exc).__name__}: {text}", 200)


def _storage_error_code(body: bytes) -> tuple[str | None, str | None]:
    text = body.decode("utf-8", "replace")
    code = _xml_tag(text, "Code")
    message = _xml_tag(text, "Message")
    return code, message


def _xml_tag(text: str, tag: str) -> str | None:
    start = text.find(f"<{tag}>")
    if start < 0:
        return None
    end = text.find(f"</{tag}>", start)
    return text[start + len(tag) + 2 : end] if end > 0 else None


def _decode(resp: httpx.Response, body: bytes, endpoint: str) -> Any:
    status = resp.status_code
    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        except RecursionError:
            if 200 <= status < 300:
                raise ProtocolError(
                    "answer is JSON nested too deeply to read (a broken or hostile server)",
                    status=status,
                    endpoint=endpoint,
                ) from None
            data = None
    if 200 <= status < 300:
        if data is None and body:
            raise ProtocolError(
                f"answer is not JSON: {_short(body.decode('utf-8', 'replace'), 120)!r}",
                status=status,
                endpoint=endpoint,
            )
        reported = data.get("status") if isinstance(data, dict) else None
        if isinstance(reported, str) and reported.lower() not in {"success", "healthy", "ok"}:
            raise RejectedError(
                f"server reported status {reported!r}: {_error_text(data, body)}",
                status=status,
                endpoint=endpoint,
            )
        return data
    message = _error_text(data, body)
    if status in (401, 403):
        raise AuthError(message, status=status, endpoint=endpoint)
    if status == 404:
        raise NotFoundError(message, status=status, endpoint=endpoint)
    if status == 409:
        raise ConflictError(message, status=status, endpoint=endpoint)
    if status == 429:
        raise RateLimitedError(
            message, status=status, endpoint=endpoint, retry_after=_retry_after(resp.headers)
        )
    if status >= 500:
        raise ServerError(
            message, status=status, endpoint=endpoint, retry_after=_retry_after(resp.headers)
        )
    raise RejectedError(message, status=status, endpoint=endpoint)


def _error_text(data: Any, body: bytes) -> str:
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return _short(value)
            if value is not None and key == "detail":
                try:
                    return _short(json.dumps(value))
                except (RecursionError, ValueError):
                    break
    text = body.decode("utf-8", "replace").strip()
    return _short(text) if text else "(empty answer)"


def _field(body: Any, key: str, endpoint: str) -> Any:
    if not isinstance(body, dict) or key not in body:
        raise ProtocolError(f"answer lacks {key!r}", endpoint=endpoint)
    return body[key]


def parse_answer(adapter: TypeAdapter[_T], data: Any, endpoint: str) -> _T:
    """``data`` (a decoded answer of ``endpoint``) as ``adapter``'s type, or ProtocolError."""
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ProtocolError(
            f"unexpected answer ({where}: {first['msg']})", endpoint=endpoint
        ) from None


__all__ = [
    "BUSY_STATUSES",
    "CHUNK_SIZE",
    "DEADLINE_FACTOR",
    "FAILED_STATUSES",
    "OK_STATUSES",
    "TLS_CHUNK_SIZE",
    "ApiError",
    "Dataset",
    "DatasetStatus",
    "FileSlice",
    "Ingestion",
    "MarpleClient",
    "PartUrl",
    "PartUrls",
    "Progress",
    "Stream",
    "multipart_file_body",
    "parse_answer",
    "pool_size",
    "redact_url",
    "send_request",
    "tls_verify",
]
