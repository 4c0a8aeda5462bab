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
is capped too: a decompression bomb is refused, not inflated). The deadline, the capped reads
and the status → error mapping are ``daemon/net/answers.py``; both clients are built by
``daemon/net/clients.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SecretStr,
    TypeAdapter,
)

from daemon.compat import UTC, fromisoformat
from daemon.config import ApiSettings, UploadSettings
from daemon.delivery.files import (
    FileSlice,
    Progress,
    multipart_file_body,
    sized_for,
)
from daemon.errors import (
    NotFoundError,
    ProtocolError,
    StorageError,
    UrlExpiredError,
)
from daemon.net.answers import (
    answer_field,
    deadline_scope,
    describe_httpx,
    parse_answer,
    read_capped,
    redact_url,
    refuse_redirect,
    retry_after_header,
    send_request,
    shorten,
    storage_error_code,
)
from daemon.net.clients import (
    ACCEPT_ENCODING,
    USER_AGENT,
    build_client,
    pool_size,
    tls_verify,
)

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


_STREAMS = TypeAdapter(list[Stream])
_INGESTION = TypeAdapter(Ingestion)
_PART_URLS = TypeAdapter(PartUrls)
_STATUSES = TypeAdapter(list[DatasetStatus])
_DATASET = TypeAdapter(Dataset)
_DATASETS = TypeAdapter(list[Dataset])


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
        # Each pool keeps as many connections alive as requests can be in flight
        # (``pool_size``): one closed after each request would cost a new handshake (a round
        # trip, two with TLS) on the next.
        self._base = url.rstrip("/")
        self._secret = token.get_secret_value()
        hooks = {"response": [refuse_redirect]}
        self._api = build_client(
            base_url=self._base,
            headers={
                "Authorization": f"Bearer {token.get_secret_value()}",
                "X-Request-Source": USER_AGENT,
                "User-Agent": USER_AGENT,
                "Accept-Encoding": ACCEPT_ENCODING,
            },
            timeout=timeout,
            verify=verify,
            connections=connections,
            transport=transport,
            event_hooks=hooks,
        )
        # Nothing of ours may reach a storage URL: Accept-Encoding only narrows httpx's own.
        self._storage = build_client(
            headers={"Accept-Encoding": ACCEPT_ENCODING},
            timeout=timeout,
            verify=verify,
            connections=connections,
            event_hooks=hooks,
        )

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
        return parse_answer(_STREAMS, answer_field(body, "streams", "GET /streams"), "GET /streams")

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
        source = sized_for(source, self._base)
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
            content = sized_for(source, url).chunks(progress=progress)
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
        scope, limit, content = deadline_scope(self._storage, content)
        try:
            with scope:
                async with self._storage.stream(
                    method, url, content=content, headers=headers
                ) as resp:
                    body = await read_capped(resp, what, storage=True)
            if scope.cancelled_caught:
                raise StorageError(f"{what} to {where}: no complete answer within {limit:g} s")
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise StorageError(
                f"{what} to {where}: the server gave an unusable upload URL ({describe_httpx(exc)})"
            ) from None
        except httpx.TransportError as exc:
            raise StorageError(
                f"{what} to {where}: connection failed ({describe_httpx(exc)})"
            ) from exc
        if resp.is_success:
            return resp.headers
        code, message = storage_error_code(body)
        text = f"{what} to {where}: HTTP {resp.status_code}"
        if code:
            text += f" {code}"
        if message:
            text += f": {shorten(message, 200)}"
        expired = resp.status_code == 403 and (
            "expired" in (message or "").lower()
            or code in {"AuthenticationFailed", "AuthorizationFailure"}
        )
        if expired:
            raise UrlExpiredError(text, status=resp.status_code, code=code)
        err = StorageError(text, status=resp.status_code, code=code)
        err.retry_after = retry_after_header(resp.headers)
        raise err


__all__ = [
    "BUSY_STATUSES",
    "FAILED_STATUSES",
    "OK_STATUSES",
    "Dataset",
    "DatasetStatus",
    "Ingestion",
    "MarpleClient",
    "PartUrl",
    "PartUrls",
    "Stream",
]
