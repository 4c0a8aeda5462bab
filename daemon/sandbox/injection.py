"""Fault injection on the wire: lost responses and canned error answers.

`Sender` wraps an ASGI `send` and can cut a response off half-way (a "lost response": the
server did the work, the client sees a protocol error). The S3-style XML errors are what the
sandbox's storage answers, faulted or not, so clients meet the same bodies as from real S3.
"""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from xml.sax.saxutils import escape

from starlette.responses import Response
from starlette.types import Message, Send

from daemon.sandbox.models import RequestRecord

# Set while a request's response is being cut off on purpose, so uvicorn's complaint about the
# incomplete response (logged from the same task, right after the app returns) can be hidden.
DROPPING: ContextVar[bool] = ContextVar("inboxd_sandbox_dropping", default=False)


class _DropLogFilter(logging.Filter):
    """Hides uvicorn's error line for responses the sandbox cut off deliberately."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (DROPPING.get() and "without completing response" in str(record.msg))


def install_log_filter() -> None:
    """Attach the filter for deliberately cut responses to uvicorn's error logger (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropLogFilter) for f in logger.filters):
        logger.addFilter(_DropLogFilter())


def s3_error(status: int, code: str, message: str, **extra: str) -> Response:
    """An S3-style XML error document."""
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in extra.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{fields}"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId>"
        f"<HostId>{uuid.uuid4().hex}</HostId></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml")


def retry_after_header(status: int, retry_after: float | str | None) -> dict[str, str]:
    """The Retry-After header a faulted 429/503 carries, when one is configured.

    A number is sent as seconds; a string verbatim (an HTTP date, ``inf``, garbage: what
    confused or hostile servers send).
    """
    if status in (429, 503) and retry_after is not None:
        value = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
        return {"Retry-After": value}
    return {}


def storage_fault(status: int, retry_after: float | str | None) -> Response:
    """The S3 error a storage fault with `status` answers."""
    if status == 503:
        answer = s3_error(503, "SlowDown", "Please reduce your request rate.")
    elif status == 500:
        answer = s3_error(
            500, "InternalError", "We encountered an internal error. Please try again."
        )
    else:
        answer = s3_error(status, "InjectedFault", f"Injected fault {status}")
    answer.headers.update(retry_after_header(status, retry_after))
    return answer


class Control:
    """Per-request switches shared between the fault layer and the handlers."""

    def __init__(self) -> None:
        self.drop = False
        self.dropped = False


class Sender:
    """Wraps `send`: records the status and, when asked, cuts the response off half-way.

    A cut response has its full headers (Content-Length included, or chunked encoding for an
    empty body) and half its body, then the connection closes: the client sees the request
    "fail" although the server did all the work - a lost response.
    """

    def __init__(self, send: Send, record: RequestRecord, ctl: Control) -> None:
        self._send = send
        self._record = record
        self._ctl = ctl
        self._start: Message | None = None
        self._body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._record.status = int(message["status"])
            if self._ctl.drop:
                self._start = message
                return
        elif message["type"] == "http.response.body" and self._start is not None:
            self._body += message.get("body", b"")
            if not message.get("more_body", False):
                await self._cut()
            return
        await self._send(message)

    async def _cut(self) -> None:
        assert self._start is not None
        body = bytes(self._body)
        headers = [
            (k, v) for k, v in self._start.get("headers", []) if k.lower() != b"content-length"
        ]
        if body:
            headers.append((b"content-length", str(len(body)).encode()))
        # Without a Content-Length the server uses chunked encoding, so even an empty body
        # is visibly incomplete when the connection closes.
        await self._send({**self._start, "headers": headers})
        await self._send(
            {"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True}
        )
        self._ctl.dropped = True
        self._record.dropped = True
