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

Storage requests go through a second httpx client that has no default headers at all: the API
token can never reach a storage URL, and signed URLs never appear in our messages.
"""

from __future__ import annotations

import email.utils
import functools
import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
from pydantic import BaseModel, ConfigDict, SecretStr, TypeAdapter, ValidationError

from daemon import __version__
from daemon.config import ApiSettings
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
)

# 2 MiB: larger chunks cost fewer event-loop turns per byte; memory stays at
# part_concurrency x chunk (8 MiB by default) whatever the file or part size.
CHUNK_SIZE = 2 * 1024 * 1024
_SLOW_READ = 0.02  # seconds; a read slower than this moves to a thread
_MAX_BODY = 16 * 1024 * 1024  # a larger API answer is a server fault, not data to hold in RAM
_USER_AGENT = f"inboxd/{__version__}"
_BEARER = re.compile(r"Bearer\s+[^\s'\"]+")

Progress = Callable[[int], None]
Throttle = Callable[[int], Awaitable[None]]

BUSY_STATUSES = frozenset({"UPLOADING", "WAITING", "IMPORTING", "POSTPROCESSING", "COOLING"})
OK_STATUSES = frozenset({"FINISHED", "LIVE"})
FAILED_STATUSES = frozenset({"FAILED", "COOLING_FAILED", "POSTPROCESSING_FAILED"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Stream(_Model):
    id: int
    name: str
    type: str | None = None
    datapool: str | None = None


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


class DatasetStatus(_Model):
    dataset_id: int
    import_status: str | None = None
    import_progress: float | None = None
    import_message: str | None = None


class Dataset(_Model):
    id: int
    path: str | None = None
    metadata: dict[str, Any] | None = None
    import_status: str | None = None
    import_progress: float | None = None
    import_message: str | None = None


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

    async def chunks(self, progress: Progress | None = None) -> AsyncIterator[bytes]:
        """Yield the slice chunk by chunk; memory use is one chunk whatever the length."""
        chunk_size = self.chunk_size
        fd = await anyio.to_thread.run_sync(_open_for_read, self.path, self.inode, self.min_size)
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
                if self.throttle is not None:
                    await self.throttle(len(data))
                if progress is not None:
                    progress(len(data))
                yield data
        finally:
            os.close(fd)


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


def _open_for_read(path: Path, inode: int | None, min_size: int | None) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
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
    if (inode is not None and st.st_ino != inode) or (
        min_size is not None and st.st_size < min_size
    ):
        os.close(fd)
        raise FileChangedError(f"{path.name}: the file was replaced or truncated during the upload")
    return fd


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def redact_url(url: str) -> str:
    """``scheme://host/path`` of a signed URL: the query holds the signature, so drop it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


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
    ) -> None:
        verify = tls_verify(verify_tls, ca_file)
        # Uploads of big parts may sit in one write for long on a slow link: the write timeout
        # bounds one socket write, not the whole body, so it can stay at the API timeout.
        tmo = httpx.Timeout(timeout, connect=min(timeout, 15.0))
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        self._base = url.rstrip("/")
        self._secret = token.get_secret_value()
        self._api = httpx.AsyncClient(
            base_url=self._base,
            headers={
                "Authorization": f"Bearer {token.get_secret_value()}",
                "X-Request-Source": _USER_AGENT,
                "User-Agent": _USER_AGENT,
            },
            timeout=tmo,
            verify=verify,
            limits=limits,
            transport=transport,
            follow_redirects=False,
        )
        # No default headers beyond httpx's own: nothing of ours may reach a storage URL.
        self._storage = httpx.AsyncClient(
            timeout=tmo, verify=verify, limits=limits, follow_redirects=False
        )

    @classmethod
    def from_settings(cls, api: ApiSettings) -> MarpleClient:
        """The client for an ``[api]`` section (the token is resolved here)."""
        return cls(
            api.url,
            api.resolved_token(),
            timeout=api.timeout,
            verify_tls=api.verify_tls,
            ca_file=api.ca_file,
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

    async def _call(
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
        await self._call("GET", "/health", endpoint="GET /health")

    async def streams(self) -> list[Stream]:
        """``GET /streams``. A 403 here means the token is bad."""
        body = await self._call("GET", "/streams", endpoint="GET /streams")
        return _parse(_STREAMS, _field(body, "streams", "GET /streams"), "GET /streams")

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
        body = await self._call("POST", "/ingestion", endpoint=ep, json_body=payload)
        return _parse(_INGESTION, body, ep)

    async def upload_server(
        self,
        ingestion_id: int,
        source: FileSlice,
        *,
        filename: str,
        progress: Progress | None = None,
    ) -> None:
        """``POST /ingestion/{id}/upload/server`` as streamed multipart/form-data."""
        body, headers = multipart_file_body(source, filename=filename, progress=progress)
        ep = "POST /ingestion/{id}/upload/server"
        await self._call(
            "POST",
            f"/ingestion/{ingestion_id}/upload/server",
            endpoint=ep,
            content=body,
            headers=headers,
        )

    async def part_urls(self, ingestion_id: int, start_part: int, count: int = 32) -> PartUrls:
        """``GET /ingestion/{id}/upload/part-urls``: fresh signed URLs for a range of parts."""
        ep = "GET /ingestion/{id}/upload/part-urls"
        body = await self._call(
            "GET",
            f"/ingestion/{ingestion_id}/upload/part-urls",
            endpoint=ep,
            params={"start_part": start_part, "count": count},
        )
        return _parse(_PART_URLS, body, ep)

    async def complete(self, ingestion_id: int) -> None:
        """``POST /ingestion/{id}/upload/complete``; the server checks the stored size."""
        await self._call(
            "POST",
            f"/ingestion/{ingestion_id}/upload/complete",
            endpoint="POST /ingestion/{id}/upload/complete",
            content=b"",
        )

    async def abort(self, ingestion_id: int, reason: str) -> None:
        """``POST /ingestion/{id}/abort`` with a reason a person can read on the server."""
        await self._call(
            "POST",
            f"/ingestion/{ingestion_id}/abort",
            endpoint="POST /ingestion/{id}/abort",
            json_body={"reason": reason[:1000]},
        )

    async def datasets_status(self, stream_id: int, dataset_ids: list[int]) -> list[DatasetStatus]:
        """``POST /stream/{id}/datasets/status`` for a batch of datasets."""
        ep = "POST /stream/{id}/datasets/status"
        body = await self._call(
            "POST", f"/stream/{stream_id}/datasets/status", endpoint=ep, json_body=dataset_ids
        )
        if isinstance(body, dict) and isinstance(body.get("datasets"), list):
            body = body["datasets"]
        return _parse(_STATUSES, body, ep)

    async def dataset(
        self, datapool: str, *, dataset_id: int | None = None, path: str | None = None
    ) -> Dataset | None:
        """One dataset by id or by path; None when the server has no such dataset."""
        params: dict[str, Any] = {"id": dataset_id} if dataset_id is not None else {"path": path}
        ep = "GET /datapool/{datapool}/dataset"
        try:
            body = await self._call(
                "GET", f"/datapool/{datapool}/dataset", endpoint=ep, params=params
            )
        except NotFoundError:
            return None
        return _parse(_DATASET, body, ep)

    async def datasets(self, stream_id: int) -> list[Dataset]:
        """``GET /stream/{id}/datasets``."""
        ep = "GET /stream/{id}/datasets"
        body = await self._call("GET", f"/stream/{stream_id}/datasets", endpoint=ep)
        if isinstance(body, dict):
            body = body.get("datasets", body.get("items"))
        return _parse(_DATASETS, body, ep)

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
            content = source.chunks(progress=progress)
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
        where = redact_url(url)
        try:
            async with self._storage.stream(method, url, content=content, headers=headers) as resp:
                body = await _read_capped(resp, what, storage=True)
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
    try:
        async with http.stream(method, url, **kwargs) as resp:
            body = await _read_capped(resp, endpoint)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise TransportError(
            f"{endpoint}: cannot connect to {server} ({_scrub(_describe_httpx(exc), secret)})",
            maybe_sent=False,
            advice=advice,
        ) from exc
    except httpx.TransportError as exc:
        raise TransportError(
            f"{endpoint}: no complete answer from the server "
            f"({_scrub(_describe_httpx(exc), secret)})"
        ) from exc
    if secret and secret.encode() in body:
        body = body.replace(secret.encode(), b"<redacted>")
    return _decode(resp, body, endpoint)


def _scrub(text: str, secret: str) -> str:
    """Remove a bearer token (and ``secret`` itself) from text that came from elsewhere."""
    text = _BEARER.sub("Bearer <redacted>", text)
    return text.replace(secret, "<redacted>") if secret else text


async def _read_capped(resp: httpx.Response, what: str, *, storage: bool = False) -> bytes:
    buf = bytearray()
    async for chunk in resp.aiter_raw():
        buf += chunk
        if len(buf) > _MAX_BODY:
            cls = StorageError if storage else ProtocolError
            raise cls(f"{what}: the answer is larger than {_MAX_BODY} bytes; refusing to read it")
    return bytes(buf)


def _describe_httpx(exc: httpx.TransportError) -> str:
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
                return _short(json.dumps(value))
    text = body.decode("utf-8", "replace").strip()
    return _short(text) if text else "(empty answer)"


def _field(body: Any, key: str, endpoint: str) -> Any:
    if not isinstance(body, dict) or key not in body:
        raise ProtocolError(f"answer lacks {key!r}", endpoint=endpoint)
    return body[key]


def _parse(adapter: TypeAdapter[_T], data: Any, endpoint: str) -> _T:
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
    "FAILED_STATUSES",
    "OK_STATUSES",
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
    "redact_url",
    "send_request",
    "tls_verify",
]
