"""Answers become our errors: one request sent under a deadline, its body read with a cap
(and decompressed with one), JSON decoded and checked against a model, an HTTP status mapped to
the error tree of daemon/errors.py with the server's own words, the bearer token scrubbed from
every message, signed URLs redacted, Retry-After read."""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar, overload
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from daemon.errors import (
    AuthError,
    ConflictError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RejectedError,
    ServerError,
    StorageError,
    TransportError,
    scrub_secrets,
)
from daemon.retry import parse_retry_after

_MAX_BODY = 16 * 1024 * 1024  # a larger API answer is a server fault, not data to hold in RAM


# httpx's timeouts bound each socket operation, so a server trickling a byte now and then
# would hold a call forever. A whole answer gets this many read timeouts ([api] timeout):
# room for the connect plus a server that thinks for almost a full timeout, yet a stuck
# call ends within a minute at the default 30 s. Streamed request bodies (file uploads) are
# not under it: their clock starts once the last byte is sent.
DEADLINE_FACTOR = 2.0


_SLOW_LINK = 64 * 1024  # bytes/s; extra deadline an in-memory request body earns


_INFLATE_STEP = 64 * 1024  # most bytes one inflate step may produce: a bomb never lands at once


_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)


def retry_after_header(headers: httpx.Headers) -> float | None:
    """The answer's ``Retry-After``, parsed once (see ``daemon.retry.parse_retry_after``)."""
    return parse_retry_after(headers.get("retry-after"))


def redact_url(url: str) -> str:
    """``scheme://host/path`` of a signed URL: the query holds the signature, so drop it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def shorten(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


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
    scope, limit, kwargs["content"] = deadline_scope(http, kwargs.get("content"))
    try:
        with scope:
            async with http.stream(method, url, **kwargs) as resp:
                body = await read_capped(resp, endpoint)
        if scope.cancelled_caught:
            raise TransportError(
                f"{endpoint}: no complete answer within {limit:g} s "
                f"({DEADLINE_FACTOR:g} x [api] timeout): the server or a proxy is stuck "
                "or trickling its answer"
            )
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise TransportError(
            f"{endpoint}: cannot connect to {server} "
            f"({scrub_secrets(describe_httpx(exc), secret)})",
            maybe_sent=False,
            advice=advice,
        ) from exc
    except httpx.TransportError as exc:
        raise TransportError(
            f"{endpoint}: no complete answer from the server "
            f"({scrub_secrets(describe_httpx(exc), secret)})"
        ) from exc
    except httpx.InvalidURL as exc:
        # Not a TransportError in httpx: a malformed redirect Location (clients without the
        # refuse_redirect hook) or a URL built from what the server sent.
        raise ProtocolError(
            f"the request or the server's redirect has an unusable URL "
            f"({scrub_secrets(describe_httpx(exc), secret)})",
            endpoint=endpoint,
        ) from None
    if secret and secret.encode() in body:
        body = body.replace(secret.encode(), b"<redacted>")
    return _decode(resp, body, endpoint)


def deadline_scope(http: httpx.AsyncClient, content: Any) -> tuple[anyio.CancelScope, float, Any]:
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


async def refuse_redirect(resp: httpx.Response) -> None:
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


async def read_capped(resp: httpx.Response, what: str, *, storage: bool = False) -> bytes:
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


def describe_httpx(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return shorten(f"{type(exc).__name__}: {text}", 200)


def storage_error_code(body: bytes) -> tuple[str | None, str | None]:
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
                f"answer is not JSON: {shorten(body.decode('utf-8', 'replace'), 120)!r}",
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
            message, status=status, endpoint=endpoint, retry_after=retry_after_header(resp.headers)
        )
    if status >= 500:
        raise ServerError(
            message, status=status, endpoint=endpoint, retry_after=retry_after_header(resp.headers)
        )
    raise RejectedError(message, status=status, endpoint=endpoint)


def _error_text(data: Any, body: bytes) -> str:
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return shorten(value)
            if value is not None and key == "detail":
                try:
                    return shorten(json.dumps(value))
                except (RecursionError, ValueError):
                    break
    text = body.decode("utf-8", "replace").strip()
    return shorten(text) if text else "(empty answer)"


def answer_field(body: Any, key: str, endpoint: str) -> Any:
    if not isinstance(body, dict) or key not in body:
        raise ProtocolError(f"answer lacks {key!r}", endpoint=endpoint)
    return body[key]


@overload
def parse_answer(shape: TypeAdapter[_T], data: Any, endpoint: str) -> _T: ...


@overload
def parse_answer(shape: type[_M], data: Any, endpoint: str) -> _M: ...


def parse_answer(shape: TypeAdapter[Any] | type[BaseModel], data: Any, endpoint: str) -> Any:
    """``data`` (a decoded answer of ``endpoint``) as ``shape`` (a TypeAdapter or a pydantic
    model), or ProtocolError naming the first field that does not fit."""
    try:
        if isinstance(shape, TypeAdapter):
            return shape.validate_python(data)
        return shape.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ProtocolError(
            f"unexpected answer ({where}: {first['msg']})", endpoint=endpoint
        ) from None
