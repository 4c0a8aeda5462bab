"""A tiny, scriptable, misbehaving HTTP/1.1 server for client robustness tests.

Raw asyncio TCP in a background thread on 127.0.0.1:<free port>, so every byte of an answer is
under the test's control: invalid JSON, missing fields, HTML error pages, redirects, 50 MB
bodies (with a Content-Length or chunked), answers (or their headers) trickled a byte at a
time, gzip-encoded answers, connections cut half-way through a body, garbage status lines, or
no answer at all.

Without a script the server behaves like a minimal, valid Marple DB (see ``default_answer``),
so an upload flow can be driven up to the one step a test makes hostile::

    with running_hostile() as srv:
        srv.answer("POST /ingestion", Answer(200, b"{not json"))
        client = MarpleClient(srv.url, SecretStr(TOKEN))
        ...
        assert srv.seen("POST /ingestion/{id}/abort")

Route keys are ``METHOD /path`` with the ``/api/v1`` prefix dropped and numeric segments (and
the datapool name) replaced by ``{id}``/``{datapool}``; storage PUTs are ``PUT storage``. A
script entry is an :class:`Answer` or a function of the :class:`Seen` request returning one.
Every connection is closed after one answer (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

API_PREFIX = "/api/v1"
_KEEP_BODY = 1024 * 1024  # request bytes kept per request (the rest is read and dropped)
_FILL_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Answer:
    """One scripted answer. Defaults: ``200``, empty JSON-typed body, Content-Length set."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    #: raw status line (without CRLF) instead of ``HTTP/1.1 <status> <reason>``
    status_line: bytes | None = None
    #: Transfer-Encoding: chunked instead of Content-Length
    chunked: bool = False
    #: the Content-Length to declare (default: the real length)
    declared_length: int | None = None
    #: filler bytes streamed after ``body`` (lazily: a 50 MB answer costs no memory here)
    filler_bytes: int = 0
    filler: bytes = b" "
    #: seconds to wait before the status line
    delay: float = 0.0
    #: seconds between single bytes of the status line and headers (slowloris, head first)
    head_trickle: float = 0.0
    #: seconds between body pieces of ``trickle_bytes`` bytes (slowloris)
    trickle: float = 0.0
    trickle_bytes: int = 1
    #: send only this many body bytes, then close the connection
    cut_after: int | None = None
    #: "gzip": compress ``body`` and say so in Content-Encoding
    encoding: str | None = None
    #: read the request, then close without a single byte of answer
    no_answer: bool = False


def json_answer(obj: Any, status: int = 200, **kw: Any) -> Answer:
    """A JSON answer of ``obj`` (``json.dumps``; NaN/Infinity allowed, as Python writes them)."""
    return Answer(status, json.dumps(obj).encode(), **kw)


def html_page(status: int, title: str, extra: str = "") -> Answer:
    """The kind of error page a proxy or load balancer answers with."""
    body = (
        f"<html>\r\n<head><title>{status} {title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {title}</h1></center>\r\n{extra}<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    )
    return Answer(status, body.encode(), content_type="text/html")


@dataclass
class Seen:
    """A request the server received."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    body_length: int
    key: str
    #: body bytes of the answer actually written to the socket (the client may stop reading)
    answer_bytes_sent: int = 0
    #: whether the whole scripted answer was written
    answer_complete: bool = False

    def json(self) -> Any:
        return json.loads(self.body)


Script = Answer | Callable[[Seen], Answer]


def route_key(method: str, path: str) -> str:
    """``POST /api/v1/ingestion/7/abort`` → ``POST /ingestion/{id}/abort``."""
    if path.startswith("/storage/"):
        return f"{method} storage"
    if path.startswith(API_PREFIX):
        path = path[len(API_PREFIX) :]
    path = re.sub(r"^/datapool/[^/]+/", "/datapool/{datapool}/", path)
    path = re.sub(r"/\d+(?=/|$)", "/{id}", path)
    return f"{method} {path}"


class HostileServer:
    """The server's state; build it with :func:`running_hostile`."""

    def __init__(self) -> None:
        self.script: dict[str, Script] = {}
        self.requests: list[Seen] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: ids handed out by the default answers
        self.dataset_id = 11
        self.ingestion_id = 22

    # ---------------------------------------------------------------- test-side API

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The API base URL to give ``MarpleClient``."""
        return self.origin + API_PREFIX

    def answer(self, key: str, script: Script) -> None:
        """Answer requests of route ``key`` with ``script`` from now on."""
        self.script[key] = script

    def answer_once(self, key: str, *answers: Answer) -> None:
        """Answer the next requests of ``key`` with ``answers`` in order, then the default."""
        pending = list(answers)

        def next_answer(seen: Seen) -> Answer:
            if pending:
                return pending.pop(0)
            return default_answer(self, seen)

        self.script[key] = next_answer

    def reset(self) -> None:
        """Forget the script and the request log."""
        self.script = {}
        self.requests = []

    def seen(self, key: str) -> list[Seen]:
        """The requests received for route ``key``."""
        return [r for r in list(self.requests) if r.key == key]

    # ---------------------------------------------------------------- server side

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, limit=1024 * 1024, backlog=256
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            seen = await _read_request(reader)
            if seen is None:
                return
            self.requests.append(seen)
            script = self.script.get(seen.key)
            if script is None:
                answer = default_answer(self, seen)
            elif isinstance(script, Answer):
                answer = script
            else:
                answer = script(seen)
            if answer.no_answer:
                return
            await _write_answer(writer, answer, seen)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away: that is its right
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> Seen | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    path, _, query = target.partition("?")
    kept = bytearray()
    total = 0
    if "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            chunk = await reader.read(min(left, 256 * 1024))
            if not chunk:
                break
            left -= len(chunk)
            total += len(chunk)
            if len(kept) < _KEEP_BODY:
                kept += chunk[: _KEEP_BODY - len(kept)]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            chunk = await reader.readexactly(size)
            await reader.readexactly(2)
            total += size
            if len(kept) < _KEEP_BODY:
                kept += chunk[: _KEEP_BODY - len(kept)]
    return Seen(method, path, query, headers, bytes(kept), total, route_key(method, path))


def _pieces(answer: Answer, body: bytes) -> Iterator[bytes]:
    step = answer.trickle_bytes if answer.trickle > 0 else _FILL_CHUNK
    for i in range(0, len(body), step):
        yield body[i : i + step]
    left = answer.filler_bytes
    if left:
        block = (answer.filler * (_FILL_CHUNK // max(len(answer.filler), 1) + 1))[:_FILL_CHUNK]
        while left > 0:
            piece = block[: min(left, step)]
            left -= len(piece)
            yield piece


async def _write_answer(writer: asyncio.StreamWriter, answer: Answer, seen: Seen) -> None:
    if answer.delay:
        await asyncio.sleep(answer.delay)
    body = answer.body
    headers = list(answer.headers)
    if answer.encoding == "gzip":
        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    if answer.content_type is not None:
        headers.append(("Content-Type", answer.content_type))
    length = len(body) + answer.filler_bytes
    if answer.chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    else:
        declared = answer.declared_length if answer.declared_length is not None else length
        headers.append(("Content-Length", str(declared)))
    headers.append(("Connection", "close"))
    if answer.status_line is not None:
        status_line = answer.status_line
    else:
        try:
            reason = HTTPStatus(answer.status).phrase
        except ValueError:
            reason = "Whatever"
        status_line = f"HTTP/1.1 {answer.status} {reason}".encode()
    head = status_line + b"\r\n"
    head += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers) + b"\r\n"
    if answer.head_trickle:
        for i in range(len(head)):
            writer.write(head[i : i + 1])
            await writer.drain()
            await asyncio.sleep(answer.head_trickle)
    else:
        writer.write(head)
        await writer.drain()
    sent = 0
    for piece in _pieces(answer, body):
        if answer.cut_after is not None and sent + len(piece) >= answer.cut_after:
            piece = piece[: answer.cut_after - sent]
            _write_piece(writer, piece, answer.chunked)
            sent += len(piece)
            seen.answer_bytes_sent = sent
            await writer.drain()
            return  # the caller closes the connection: the body stays incomplete
        _write_piece(writer, piece, answer.chunked)
        sent += len(piece)
        seen.answer_bytes_sent = sent
        await writer.drain()
        if answer.trickle:
            await asyncio.sleep(answer.trickle)
    if answer.chunked:
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    seen.answer_complete = True


def _write_piece(writer: asyncio.StreamWriter, piece: bytes, chunked: bool) -> None:
    if not piece:
        return
    if chunked:
        writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    else:
        writer.write(piece)


# ------------------------------------------------------------------------- a valid server


def default_answer(server: HostileServer, seen: Seen) -> Answer:
    """What a well-behaved Marple DB answers (enough for one upload to go through)."""
    key = seen.key
    ds, ing = server.dataset_id, server.ingestion_id
    if key == "GET /health":
        return json_answer({"status": "healthy"})
    if key == "GET /streams":
        return json_answer(
            {"streams": [{"id": 1, "name": "inbox", "type": "files", "datapool": "default"}]}
        )
    if key == "POST /ingestion":
        return json_answer({"dataset_id": ds, "ingestion_id": ing, "mode": "server"})
    if key in (
        "POST /ingestion/{id}/upload/server",
        "POST /ingestion/{id}/upload/complete",
        "POST /ingestion/{id}/abort",
    ):
        return json_answer({"status": "success"})
    if key == "GET /ingestion/{id}/upload/part-urls":
        start = int(_query_value(seen.query, "start_part") or 1)
        count = int(_query_value(seen.query, "count") or 1)
        parts = [
            {"part_number": n, "url": f"{server.origin}/storage/{ing}/part/{n}?sig=x"}
            for n in range(start, start + count)
        ]
        return json_answer({"parts": parts, "expires_in": 3600})
    if key == "POST /stream/{id}/datasets/status":
        try:
            ids = seen.json()
        except ValueError:
            ids = []
        return json_answer(
            [{"dataset_id": i, "import_status": "FINISHED", "import_progress": 1.0} for i in ids]
        )
    if key == "GET /stream/{id}/datasets":
        return json_answer([])
    if key == "GET /datapool/{datapool}/dataset":
        return json_answer({"error": "dataset not found"}, status=404)
    if key == "PUT storage":
        return Answer(200, b"", content_type=None, headers=(("ETag", '"abc"'),))
    return json_answer({"error": f"no route {key}"}, status=404)


def _query_value(query: str, name: str) -> str | None:
    for pair in query.split("&"):
        k, _, v = pair.partition("=")
        if k == name:
            return v
    return None


@contextlib.contextmanager
def running_hostile() -> Iterator[HostileServer]:
    """Run a :class:`HostileServer` in a background thread until the block ends."""
    server = HostileServer()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server._start())
        except BaseException as exc:  # pragma: no cover - reported to the caller below
            failure.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(server._stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name="hostile-http", daemon=True)
    thread.start()
    started.wait(10)
    if failure:
        raise RuntimeError("the hostile server did not start") from failure[0]
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


__all__ = [
    "API_PREFIX",
    "Answer",
    "HostileServer",
    "Seen",
    "default_answer",
    "html_page",
    "json_answer",
    "route_key",
    "running_hostile",
]
