"""The client, the upload flow and the poller against a server that answers badly on purpose.

Every answer the contract's endpoints can give is scripted on a raw TCP server
(``tests/support/hostile.py``): invalid JSON, missing fields, wrong types, unknown modes and import
statuses, ``status: "failed"`` in a 200, 50 MB bodies, HTML error pages, redirects, slow and
cut-off answers. What may come out of ``daemon.delivery.marple_db.client.MarpleClient`` is a parsed
model or one of our own ``InboxdError`` types with a short readable message that never holds the
token; memory stays bounded; the poller records what it does not know and keeps polling.

Scale: ``INBOXD_SUITE=long`` runs many more hypothesis examples.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from daemon.commands import status as status_view
from daemon.compat import BaseExceptionGroup
from daemon.delivery import ImportUpdate
from daemon.delivery.files import FileRef, FileSlice
from daemon.delivery.flow import UploadOptions
from daemon.delivery.marple_db.client import (
    Dataset,
    DatasetStatus,
    Ingestion,
    MarpleClient,
    PartUrls,
    Stream,
)
from daemon.delivery.marple_db.target import MarpleDbTarget
from daemon.delivery.marple_db.upload import UploadRequest, upload_file
from daemon.engine.poller import Poller
from daemon.errors import (
    InboxdError,
    ProtocolError,
    RateLimitedError,
    RejectedError,
    ServerError,
    StorageError,
    TransportError,
    UploadFailed,
)
from daemon.net.answers import DEADLINE_FACTOR, send_request
from daemon.retry import RetryPolicy
from daemon.state import FileIdentity, Job, JobState, NewJob, Queue, Stage
from tests.support.data import TOKEN
from tests.support.hostile import (
    Answer,
    HostileServer,
    Seen,
    html_page,
    json_answer,
    running_hostile,
)

LONG = os.environ.get("INBOXD_SUITE") == "long"
EXAMPLES = 1000 if LONG else 100
TIMEOUT = 1.0  # the client's per-operation timeout in these tests
MAX_BODY = 16 * 1024 * 1024
HUGE = 50 * 1000 * 1000
SMALL = b"x,y\n" * 1000  # the file the upload tests send
_STATS: dict[str, int] = {"cases": 0, "examples": 0, "escapes": 0}


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def srv() -> Iterator[HostileServer]:
    with running_hostile() as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def _summary(request: pytest.FixtureRequest) -> Iterator[None]:
    started = time.monotonic()
    yield
    line = {
        "suite": "hostile_server",
        "cases": _STATS["cases"],
        "files": 0,
        "lost": 0,
        "duplicates": 0,
        "hypothesis_examples": _STATS["examples"],
        "raw_exceptions_escaped": _STATS["escapes"],
        "long": LONG,
        "seconds": round(time.monotonic() - started, 1),
    }
    _print_summary(request, "SUITE " + json.dumps(line))


def _print_summary(request: pytest.FixtureRequest, text: str) -> None:
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(text, flush=True)
    else:  # pragma: no cover
        print(text, flush=True)


@pytest.fixture(autouse=True)
def _fresh_script(srv: HostileServer) -> None:
    srv.reset()
    _STATS["cases"] += 1


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "a.csv"
    path.write_bytes(SMALL)
    return path


@pytest.fixture
async def client(srv: HostileServer) -> AsyncIterator[MarpleClient]:
    # verify_tls off: the server is plain HTTP, and loading the CA bundle costs ~20 ms a test.
    async with MarpleClient(srv.url, SecretStr(TOKEN), timeout=TIMEOUT, verify_tls=False) as c:
        yield c


# ------------------------------------------------------------------------------- helpers

Call = Callable[[MarpleClient, HostileServer, Path], Awaitable[Any]]

#: endpoint name → (route key, the client call)
ENDPOINTS: dict[str, tuple[str, Call]] = {
    "health": ("GET /health", lambda c, s, f: c.health()),
    "streams": ("GET /streams", lambda c, s, f: c.streams()),
    "create": (
        "POST /ingestion",
        lambda c, s, f: c.create_ingestion(stream_id=1, dataset_name="a.csv", file_size=10),
    ),
    "upload_server": (
        "POST /ingestion/{id}/upload/server",
        lambda c, s, f: c.upload_server(22, FileSlice(f, 0, f.stat().st_size), filename="a.csv"),
    ),
    "part_urls": ("GET /ingestion/{id}/upload/part-urls", lambda c, s, f: c.part_urls(22, 1, 4)),
    "complete": ("POST /ingestion/{id}/upload/complete", lambda c, s, f: c.complete(22)),
    "abort": ("POST /ingestion/{id}/abort", lambda c, s, f: c.abort(22, "test")),
    "status": (
        "POST /stream/{id}/datasets/status",
        lambda c, s, f: c.datasets_status(1, [11, 12]),
    ),
    "datasets": ("GET /stream/{id}/datasets", lambda c, s, f: c.datasets(1)),
    "dataset": (
        "GET /datapool/{datapool}/dataset",
        lambda c, s, f: c.dataset("default", path="a.csv"),
    ),
    "storage_put": (
        "PUT storage",
        lambda c, s, f: c.storage_put(f"{s.origin}/storage/22/object?sig=x", b"data"),
    ),
}
API = [name for name in ENDPOINTS if name != "storage_put"]


def _result_ok(name: str, value: Any) -> bool:
    """Is ``value`` what endpoint ``name`` returns on success?"""
    if name in ("health", "complete", "abort", "upload_server"):
        return value is None
    if name == "streams":
        return isinstance(value, list) and all(isinstance(s, Stream) for s in value)
    if name == "create":
        return isinstance(value, Ingestion)
    if name == "part_urls":
        return isinstance(value, PartUrls)
    if name == "status":
        return isinstance(value, list) and all(isinstance(s, DatasetStatus) for s in value)
    if name == "datasets":
        return isinstance(value, list) and all(isinstance(d, Dataset) for d in value)
    if name == "dataset":
        return value is None or isinstance(value, Dataset)
    if name == "storage_put":
        return value is not None
    raise AssertionError(name)


def check_error(exc: BaseException) -> None:
    """Our type, a readable bounded message, and no token anywhere in it or its causes."""
    assert isinstance(exc, InboxdError), f"raw {type(exc).__name__} escaped: {exc!r}"
    text = str(exc)
    assert text.strip(), "empty message"
    assert len(text) < 2000, f"message of {len(text)} chars"
    seen: BaseException | None = exc
    depth = 0
    while seen is not None and depth < 10:
        assert TOKEN not in str(seen) and TOKEN not in repr(seen), "the token leaked"
        seen = seen.__cause__ or seen.__context__
        depth += 1


async def call(name: str, client: MarpleClient, srv: HostileServer, small_file: Path) -> Any:
    """Run endpoint ``name``; return its result or the InboxdError it raised (checked)."""
    try:
        return await ENDPOINTS[name][1](client, srv, small_file)
    except InboxdError as exc:
        check_error(exc)
        return exc


# ------------------------------------------------------------------------ generic answers

#: (id, answer, expected error type for API endpoints, regex, for storage) — None: success
GENERIC: list[tuple[str, Answer, type[InboxdError] | None, str, type[InboxdError] | None]] = [
    (
        "invalid-json-200",
        Answer(200, b'{"streams": [1, 2'),
        ProtocolError,
        r"HTTP 200: answer is not JSON",
        None,
    ),
    ("html-502", html_page(502, "Bad Gateway"), ServerError, r"HTTP 502: <html>", StorageError),
    (
        "html-500-1MB",
        html_page(500, "Internal Server Error", "<p>trace</p>" * 80_000),
        ServerError,
        r"HTTP 500",
        StorageError,
    ),
    (
        "redirect-301",
        Answer(301, b"", headers=(("Location", "http://127.0.0.1:9/elsewhere"),)),
        RejectedError,
        r"HTTP 301",
        StorageError,
    ),
    (
        "status-failed-in-200",
        json_answer({"status": "failed", "error": "quota exceeded"}),
        RejectedError,
        r"server reported status 'failed': quota exceeded",
        None,
    ),
    (
        "huge-content-length",
        Answer(200, b'{"status": "ok", "x": "', filler_bytes=HUGE),
        ProtocolError,
        rf"larger than {MAX_BODY} bytes",
        StorageError,
    ),
    (
        "huge-chunked",
        Answer(200, b"[", filler_bytes=HUGE, chunked=True),
        ProtocolError,
        rf"larger than {MAX_BODY} bytes",
        StorageError,
    ),
    (
        "cut-mid-body",
        Answer(200, b'{"status": "success", "pad": "' + b"x" * 5000 + b'"}', cut_after=100),
        TransportError,
        r"no complete answer from the server",
        StorageError,
    ),
    ("no-answer", Answer(no_answer=True), TransportError, r"no complete answer", StorageError),
    (
        "garbage-status-line",
        Answer(status_line=b"HTTP/1.1 banana split"),
        TransportError,
        r"no complete answer",
        StorageError,
    ),
    (
        "429-absurd-retry-after",
        json_answer({"error": "slow down"}, 429, headers=(("Retry-After", "1e300"),)),
        RateLimitedError,
        r"HTTP 429: slow down",
        StorageError,
    ),
    (
        "503-retry-after-garbage",
        json_answer({"detail": {"why": ["x"]}}, 503, headers=(("Retry-After", "soon-ish"),)),
        ServerError,
        r'HTTP 503: \{"why": \["x"\]\}',
        StorageError,
    ),
]


@pytest.mark.parametrize("name", [*API, "storage_put"])
@pytest.mark.parametrize(
    ("answer", "api_error", "pattern", "storage_error"),
    [pytest.param(*case[1:], id=case[0]) for case in GENERIC],
)
async def test_generic_hostile_answers(
    srv: HostileServer,
    client: MarpleClient,
    small_file: Path,
    name: str,
    answer: Answer,
    api_error: type[InboxdError] | None,
    pattern: str,
    storage_error: type[InboxdError] | None,
) -> None:
    srv.answer(ENDPOINTS[name][0], answer)
    expected = storage_error if name == "storage_put" else api_error
    if name == "dataset" and answer.status == 301:
        expected = RejectedError
    with anyio.fail_after(TIMEOUT * 10):
        result = await call(name, client, srv, small_file)
    if expected is None:
        assert _result_ok(name, result), result
        return
    assert isinstance(result, expected), f"{type(result).__name__}: {result}"
    if name != "storage_put":
        assert re.search(pattern, str(result)), str(result)
    if answer.status == 301:
        # Never followed: the Authorization header must not travel to another place.
        assert [r.path for r in srv.requests if "elsewhere" in r.path] == []
    if answer.filler_bytes >= HUGE:
        (seen,) = srv.requests[-1:]
        assert not seen.answer_complete, "the client read a 50 MB answer to the end"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("name", ["streams", "status", "storage_put"])
async def test_huge_answers_keep_memory_bounded(
    srv: HostileServer, client: MarpleClient, small_file: Path, name: str, chunked: bool
) -> None:
    status = 500 if name == "storage_put" else 200
    srv.answer(
        ENDPOINTS[name][0],
        Answer(status, b'{"streams": [], "pad": "', filler_bytes=HUGE, chunked=chunked),
    )
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = await call(name, client, srv, small_file)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, StorageError if name == "storage_put" else ProtocolError)
    assert f"larger than {MAX_BODY} bytes" in str(result)
    # The cap is 16 MiB: what was held is the cap plus a little, never the 50 MB.
    assert peak < MAX_BODY + 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
    assert srv.requests[-1].answer_bytes_sent < HUGE


# ------------------------------------------------------------------ endpoint-specific shapes

SHAPES: list[tuple[str, str, Answer, type[InboxdError] | None, str]] = [
    ("streams", "missing-key", json_answer({"items": []}), ProtocolError, "lacks 'streams'"),
    ("streams", "a-list", json_answer([]), ProtocolError, "lacks 'streams'"),
    ("streams", "null", json_answer({"streams": None}), ProtocolError, "unexpected answer"),
    (
        "streams",
        "wrong-types",
        json_answer({"streams": [{"id": "one", "name": 5}]}),
        ProtocolError,
        r"unexpected answer \(0\.id",
    ),
    ("streams", "empty-body", Answer(200, b""), ProtocolError, "lacks 'streams'"),
    ("streams", "extra-fields", json_answer({"streams": [], "new": {"x": 1}}), None, ""),
    (
        "create",
        "missing-ingestion-id",
        json_answer({"dataset_id": 1, "mode": "server"}),
        ProtocolError,
        r"ingestion_id: Field required",
    ),
    (
        "create",
        "id-as-float",
        json_answer({"dataset_id": 1.5, "ingestion_id": 2, "mode": "server"}),
        ProtocolError,
        r"dataset_id",
    ),
    (
        "create",
        "unknown-mode",
        json_answer({"dataset_id": 1, "ingestion_id": 2, "mode": "teleport"}),
        None,
        "",
    ),
    ("create", "empty-body", Answer(200, b""), ProtocolError, "unexpected answer"),
    (
        "create",
        "html-200",
        Answer(200, b"<html>maintenance</html>", content_type="text/html"),
        ProtocolError,
        "answer is not JSON: '<html>maintenance</html>'",
    ),
    ("part_urls", "no-parts", json_answer({"expires_in": 5}), ProtocolError, r"parts"),
    (
        "part_urls",
        "part-without-url",
        json_answer({"parts": [{"part_number": 1}]}),
        ProtocolError,
        r"parts\.0\.url",
    ),
    ("status", "not-a-list", json_answer({"datasets": {"11": "x"}}), ProtocolError, "unexpected"),
    (
        "status",
        "status-is-a-number",
        json_answer([{"dataset_id": 11, "import_status": 5}]),
        ProtocolError,
        r"import_status",
    ),
    (
        "status",
        "unknown-status",
        json_answer([{"dataset_id": 11, "import_status": "REINDEXING"}]),
        None,
        "",
    ),
    ("status", "wrapped", json_answer({"datasets": []}), None, ""),
    ("status", "empty-body", Answer(200, b""), ProtocolError, "unexpected answer"),
    ("datasets", "items", json_answer({"items": [{"id": 3}]}), None, ""),
    ("datasets", "a-number", json_answer({"datasets": 3}), ProtocolError, "unexpected"),
    ("dataset", "404", json_answer({"error": "no"}, 404), None, ""),
    ("dataset", "id-not-int", json_answer({"id": "x"}), ProtocolError, r"id"),
    ("dataset", "a-list", json_answer([]), ProtocolError, "unexpected"),
    ("complete", "empty-body", Answer(200, b""), None, ""),
    ("complete", "409", json_answer({"error": "not UPLOADING"}, 409), InboxdError, "HTTP 409"),
    ("abort", "text-200", Answer(200, b"OK", content_type="text/plain"), ProtocolError, "not JSON"),
]


@pytest.mark.parametrize(
    ("name", "answer", "expected", "pattern"),
    [pytest.param(n, a, e, p, id=f"{n}-{i}") for n, i, a, e, p in SHAPES],
)
async def test_surprising_shapes(
    srv: HostileServer,
    client: MarpleClient,
    small_file: Path,
    name: str,
    answer: Answer,
    expected: type[InboxdError] | None,
    pattern: str,
) -> None:
    srv.answer(ENDPOINTS[name][0], answer)
    result = await call(name, client, srv, small_file)
    if expected is None:
        assert _result_ok(name, result), result
    else:
        assert isinstance(result, expected), f"{type(result).__name__}: {result}"
        assert re.search(pattern, str(result)), str(result)


@pytest.mark.parametrize("name", ["streams", "create", "status", "storage_put"])
async def test_answer_slower_than_the_timeout(
    srv: HostileServer, client: MarpleClient, small_file: Path, name: str
) -> None:
    srv.answer(ENDPOINTS[name][0], Answer(200, b"{}", delay=TIMEOUT * 2.5))
    with anyio.fail_after(TIMEOUT * 10):
        result = await call(name, client, srv, small_file)
    assert isinstance(result, StorageError if name == "storage_put" else TransportError)
    assert "ReadTimeout" in str(result)


async def test_slow_but_steady_answer_is_read(srv: HostileServer, client: MarpleClient) -> None:
    """Each byte arrives well within the timeout: a slow link, not a fault."""
    body = json.dumps({"streams": [{"id": 4, "name": "slow"}]}).encode()
    srv.answer("GET /streams", Answer(200, body, trickle=0.01, trickle_bytes=4))
    assert [s.id for s in await client.streams()] == [4]


# ------------------------------------------------------------- once-known client gaps, fixed


@pytest.mark.parametrize("name", ["streams", "status"])
async def test_deeply_nested_json_is_a_protocol_error(
    srv: HostileServer, client: MarpleClient, small_file: Path, name: str
) -> None:
    """json.loads raises RecursionError (not a ValueError) on 200 000 open brackets."""
    srv.answer(ENDPOINTS[name][0], Answer(200, b"[" * 200_000))
    result = await call(name, client, srv, small_file)
    assert isinstance(result, ProtocolError), result
    assert "nested too deeply" in str(result)


async def test_deeply_nested_error_answer_keeps_its_status(
    srv: HostileServer, client: MarpleClient
) -> None:
    srv.answer("GET /streams", Answer(503, b"[" * 200_000))
    with pytest.raises(ServerError, match="HTTP 503"):
        await client.streams()


@pytest.mark.parametrize("encoding", ["gzip", "zlib-deflate", "raw-deflate", "gzip, gzip"])
async def test_compressed_answer_is_decoded(
    srv: HostileServer, client: MarpleClient, encoding: str
) -> None:
    body = json.dumps({"streams": [{"id": 9, "name": "zipped"}]}).encode()
    if encoding == "gzip":
        srv.answer("GET /streams", Answer(200, body, encoding="gzip"))
    else:
        srv.answer("GET /streams", _encoded(body, encoding))
    assert [s.id for s in await client.streams()] == [9]


def _encoded(body: bytes, encoding: str) -> Answer:
    if encoding == "gzip, gzip":
        data, header = gzip.compress(gzip.compress(body)), "gzip, gzip"
    else:
        wbits = zlib.MAX_WBITS if encoding == "zlib-deflate" else -zlib.MAX_WBITS
        packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
        data, header = packer.compress(body) + packer.flush(), "deflate"
    # trickled a byte at a time: the deflate flavour must be told from the first bytes alone
    return Answer(200, data, headers=(("Content-Encoding", header),), trickle=0.001)


async def test_compressed_answer_a_byte_at_a_time(srv: HostileServer, client: MarpleClient) -> None:
    body = json.dumps({"streams": [{"id": 3, "name": "slow"}]}).encode()
    for encoding in ("zlib-deflate", "raw-deflate"):
        srv.answer("GET /streams", _encoded(body, encoding))
        assert [s.id for s in await client.streams()] == [3], encoding


async def test_client_offers_only_the_encodings_it_decodes(
    srv: HostileServer, client: MarpleClient
) -> None:
    await client.streams()
    await client.storage_put(f"{srv.origin}/storage/22/object?sig=x", b"data")
    offered = [r.headers.get("accept-encoding") for r in srv.requests]
    assert offered == ["gzip, deflate", "gzip, deflate"]


@pytest.mark.parametrize(
    ("headers", "body", "pattern"),
    [
        ((("Content-Encoding", "br"),), b"\x1b\x00", r"'br'-encoded, which inboxd cannot read"),
        ((("Content-Encoding", "gzip"),), b"not gzip at all", r"gzip encoding is corrupt"),
    ],
    ids=["unknown-encoding", "corrupt-gzip"],
)
async def test_undecodable_answer_is_a_protocol_error(
    srv: HostileServer,
    client: MarpleClient,
    headers: tuple[tuple[str, str], ...],
    body: bytes,
    pattern: str,
) -> None:
    srv.answer("GET /streams", Answer(200, body, headers=headers))
    with pytest.raises(ProtocolError, match=pattern) as info:
        await client.streams()
    check_error(info.value)
    # An error answer keeps its status whatever its encoding.
    srv.answer("GET /streams", Answer(503, body, headers=headers))
    with pytest.raises(ServerError, match="HTTP 503"):
        await client.streams()


@pytest.mark.parametrize("name", ["streams", "storage_put"])
async def test_gzip_bomb_stays_bounded(
    srv: HostileServer, client: MarpleClient, small_file: Path, name: str
) -> None:
    """A small answer inflating to 256 MiB is refused at the 16 MiB cap, not held in RAM."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1024 * 1024)
    bomb = b"".join(compressor.compress(block) for _ in range(256)) + compressor.flush()
    assert len(bomb) < 1024 * 1024  # inflates to 256 MiB
    status = 500 if name == "storage_put" else 200
    srv.answer(ENDPOINTS[name][0], Answer(status, bomb, headers=(("Content-Encoding", "gzip"),)))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = await call(name, client, srv, small_file)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, StorageError if name == "storage_put" else ProtocolError), result
    assert f"larger than {MAX_BODY} bytes" in str(result)
    assert peak < MAX_BODY + 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("status", [403, 500])
async def test_token_echoed_by_server_never_reaches_the_message(
    srv: HostileServer, client: MarpleClient, status: int
) -> None:
    """Fixed upstream (client.py send_request scrubs the token from server text); kept as a
    regression test: errors.py promises str() never holds a token."""

    def echo(seen: Seen) -> Answer:
        # What some gateways and debug pages do: quote the credentials they were given.
        return json_answer({"detail": f"rejected: {seen.headers['authorization']}"}, status)

    srv.answer("GET /streams", echo)
    with pytest.raises(InboxdError) as info:
        await client.streams()
    assert TOKEN not in str(info.value), str(info.value)


#: the whole-answer deadline of the ``client`` fixture (DEADLINE_FACTOR x its timeout)
DEADLINE = DEADLINE_FACTOR * TIMEOUT


@pytest.mark.parametrize("name", ["streams", "status", "storage_put"])
async def test_endless_trickle_is_cut_off(
    srv: HostileServer, client: MarpleClient, small_file: Path, name: str
) -> None:
    """Each byte arrives within the read timeout, but the answer never ends (slowloris)."""
    srv.answer(
        ENDPOINTS[name][0],
        Answer(200, b'{"streams": []', filler_bytes=10**9, trickle=0.2, trickle_bytes=1),
    )
    started = time.monotonic()
    with anyio.fail_after(TIMEOUT * 3):
        result = await call(name, client, srv, small_file)
    assert isinstance(result, StorageError if name == "storage_put" else TransportError), result
    assert result.retryable
    assert f"no complete answer within {DEADLINE:g} s" in str(result)
    assert time.monotonic() - started >= DEADLINE * 0.9


async def test_trickled_headers_are_cut_off(srv: HostileServer, client: MarpleClient) -> None:
    """A status line and headers dribbled out a byte at a time are under the same deadline."""
    pad = (("X-Pad", "x" * 10_000),)
    srv.answer("GET /health", Answer(200, b"{}", headers=pad, head_trickle=0.05))
    started = time.monotonic()
    with anyio.fail_after(TIMEOUT * 3), pytest.raises(TransportError, match="no complete"):
        await client.health()
    assert time.monotonic() - started >= DEADLINE * 0.9
    (seen,) = srv.seen("GET /health")
    assert not seen.answer_complete


async def test_streamed_upload_slower_than_the_deadline_is_not_cut(
    srv: HostileServer, client: MarpleClient, small_file: Path
) -> None:
    """A file body may take as long as the link needs: the deadline times only the answer."""
    sent: list[int] = []

    async def slow_link(n: int) -> None:
        sent.append(n)
        await anyio.sleep(TIMEOUT * 0.5)  # under the write timeout, over the deadline in sum

    size = len(SMALL)
    part = FileSlice(small_file, 0, size, throttle=slow_link, chunk_size=size // 6 + 1)
    started = time.monotonic()
    await client.storage_put(f"{srv.origin}/storage/22/part/1?sig=x", part)
    part = FileSlice(small_file, 0, size, throttle=slow_link, chunk_size=size // 6 + 1)
    await client.upload_server(22, part, filename="a.csv")
    assert time.monotonic() - started > 2 * DEADLINE
    assert sum(sent) == 2 * size
    (put,) = srv.seen("PUT storage")
    assert put.body == SMALL


@pytest.mark.parametrize("name", ["upload_server", "storage_put"])
async def test_deadline_starts_after_a_streamed_body(
    srv: HostileServer, client: MarpleClient, small_file: Path, name: str
) -> None:
    """The answer to a (quickly) streamed file body is still bounded."""
    srv.answer(
        ENDPOINTS[name][0],
        Answer(200, b"{", filler_bytes=10**9, trickle=0.2, trickle_bytes=1),
    )
    size = len(SMALL)
    part = FileSlice(small_file, 0, size)
    with anyio.fail_after(TIMEOUT * 3):
        try:
            if name == "storage_put":
                await client.storage_put(f"{srv.origin}/storage/22/object?sig=x", part)
            else:
                await client.upload_server(22, part, filename="a.csv")
        except InboxdError as exc:
            result: BaseException = exc
    assert isinstance(result, StorageError if name == "storage_put" else TransportError), result
    assert f"no complete answer within {DEADLINE:g} s" in str(result)


@pytest.mark.parametrize("name", ["streams", "status", "storage_put"])
@pytest.mark.parametrize("location", ["A:0", "http://[::1", "http://h:99999/x", "\x7f"])
async def test_redirect_with_a_malformed_location(
    srv: HostileServer, client: MarpleClient, small_file: Path, name: str, location: str
) -> None:
    """httpx builds the next request of every 3xx even when it does not follow it."""
    srv.answer(ENDPOINTS[name][0], Answer(302, b"", headers=(("Location", location),)))
    result = await call(name, client, srv, small_file)
    assert isinstance(result, StorageError if name == "storage_put" else RejectedError), result
    assert "HTTP 302" in str(result)


async def test_malformed_redirect_through_send_request_of_any_client(
    srv: HostileServer,
) -> None:
    """send_request serves other API clients too (data service), without our response hook."""
    srv.answer("GET /streams", Answer(302, b"", headers=(("Location", "A:0"),)))
    async with httpx.AsyncClient(base_url=srv.url, timeout=TIMEOUT) as http:
        with pytest.raises(ProtocolError, match="unusable URL") as info:
            await send_request(http, "GET", "/streams", endpoint="GET /streams", server=srv.url)
    check_error(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1/storage/1/object?sig=SECRET",
        "http://127.0.0.1:99999/storage/1/object?sig=SECRET",
        "http://127.0.0.1/storage/\x00?sig=SECRET",
    ],
    ids=["urlsplit-refuses", "httpx-refuses-port", "control-char"],
)
async def test_unparsable_signed_url_is_a_storage_error(client: MarpleClient, url: str) -> None:
    with pytest.raises(StorageError, match="unusable upload URL") as info:
        await client.storage_put(url, b"data")
    check_error(info.value)
    assert "SECRET" not in str(info.value)


async def test_odd_signed_urls_are_storage_errors(client: MarpleClient) -> None:
    for url in ("ftp://127.0.0.1/x", "http://127.0.0.1:1/closed", "", "http:///nohost"):
        with pytest.raises(StorageError) as info:
            await client.storage_put(url, b"data")
        check_error(info.value)


# --------------------------------------------------------------------- property-based fuzz

_KEYS = st.sampled_from(
    [
        "status",
        "streams",
        "id",
        "name",
        "datapool",
        "type",
        "dataset_id",
        "ingestion_id",
        "mode",
        "presigned_url",
        "part_size",
        "expires_in",
        "parts",
        "part_number",
        "url",
        "next_part",
        "import_status",
        "import_progress",
        "import_message",
        "datasets",
        "items",
        "error",
        "detail",
        "message",
        "metadata",
        "path",
    ]
) | st.text(max_size=6)
_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["success", "failed", "FINISHED", "server", "multipart", "UPLOADING"])
)
JSON = st.recursive(
    _LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=6),
    max_leaves=20,
)

#: a valid answer per endpoint, for mutation
VALID: dict[str, Any] = {
    "health": {"status": "healthy"},
    "streams": {"streams": [{"id": 1, "name": "inbox", "datapool": "default"}]},
    "create": {"dataset_id": 1, "ingestion_id": 2, "mode": "single", "presigned_url": "http://x"},
    "upload_server": {"status": "success"},
    "part_urls": {"parts": [{"part_number": 1, "url": "http://x"}], "expires_in": 60},
    "complete": {"status": "success"},
    "abort": {"status": "success"},
    "status": [{"dataset_id": 11, "import_status": "IMPORTING", "import_progress": 0.5}],
    "datasets": [{"id": 1, "path": "a.csv", "metadata": {}}],
    "dataset": {"id": 1, "path": "a.csv", "metadata": {"inboxd_upload_id": "k"}},
    "storage_put": {},
}


@st.composite
def mutated(draw: st.DrawFn, name: str) -> Any:
    """The endpoint's valid answer with keys dropped or values replaced, at any depth."""
    value = json.loads(json.dumps(VALID[name]))

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            for key in list(node):
                action = draw(st.sampled_from(["keep", "keep", "drop", "replace", "walk"]))
                if action == "drop":
                    del node[key]
                elif action == "replace":
                    node[key] = draw(JSON)
                elif action == "walk":
                    node[key] = walk(node[key])
        elif isinstance(node, list):
            node = [walk(item) for item in node] + draw(st.lists(JSON, max_size=2))
        return node

    return walk(value)


def bodies(name: str) -> st.SearchStrategy[bytes]:
    as_json = st.one_of(mutated(name), JSON).map(lambda v: json.dumps(v).encode())
    return st.one_of(
        as_json,
        as_json,
        st.binary(max_size=64),
        st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )


STATUSES = st.one_of(
    st.sampled_from([200, 200, 200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404]),
    st.sampled_from([405, 409, 410, 413, 418, 422, 429, 500, 502, 503, 504]),
    st.integers(100, 599),
)
EXTRA_HEADERS = st.lists(
    st.tuples(
        st.sampled_from(["Retry-After", "Content-Type", "Location", "X-Thing"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    ),
    max_size=2,
).map(tuple)


@pytest.fixture(scope="module")
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    with anyio.from_thread.start_blocking_portal("asyncio") as p:
        yield p


@pytest.fixture(scope="module")
def shared_client(
    srv: HostileServer, portal: anyio.from_thread.BlockingPortal
) -> Iterator[MarpleClient]:
    c = MarpleClient(srv.url, SecretStr(TOKEN), timeout=TIMEOUT)
    yield c
    portal.call(c.aclose)


def _fuzz_one(
    name: str,
    status: int,
    body: bytes,
    headers: tuple[tuple[str, str], ...],
    chunked: bool,
    srv: HostileServer,
    portal: anyio.from_thread.BlockingPortal,
    client: MarpleClient,
    small_file: Path,
) -> None:
    _STATS["examples"] += 1
    srv.answer(ENDPOINTS[name][0], Answer(status, body, headers=headers, chunked=chunked))

    async def go() -> Any:
        with anyio.fail_after(TIMEOUT * 5):
            try:
                return await ENDPOINTS[name][1](client, srv, small_file)
            except InboxdError as exc:
                return exc

    try:
        result = portal.call(go)
    except Exception as exc:
        # No known exceptions any more: every raw one is a bug (and fails the example).
        _STATS["escapes"] += 1
        raise AssertionError(f"raw {type(exc).__name__} escaped: {exc!r}") from exc
    if isinstance(result, InboxdError):
        check_error(result)
        is_2xx_put = name == "storage_put" and 200 <= status < 300
        assert not is_2xx_put, f"a 2xx storage PUT failed: {result!r}"
    else:
        assert _result_ok(name, result), f"{name} returned {result!r}"


def _fuzz_test(name: str) -> Callable[..., None]:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=not LONG,
    )
    @given(
        status=STATUSES,
        body=bodies(name),
        headers=EXTRA_HEADERS,
        chunked=st.booleans(),
    )
    def test(
        srv: HostileServer,
        portal: anyio.from_thread.BlockingPortal,
        shared_client: MarpleClient,
        small_file: Path,
        status: int,
        body: bytes,
        headers: tuple[tuple[str, str], ...],
        chunked: bool,
    ) -> None:
        _fuzz_one(name, status, body, headers, chunked, srv, portal, shared_client, small_file)

    test.__name__ = f"test_fuzz_{name}_answer_decodes_or_raises_ours"
    return test


test_fuzz_health = _fuzz_test("health")
test_fuzz_streams = _fuzz_test("streams")
test_fuzz_create = _fuzz_test("create")
test_fuzz_upload_server = _fuzz_test("upload_server")
test_fuzz_part_urls = _fuzz_test("part_urls")
test_fuzz_complete = _fuzz_test("complete")
test_fuzz_abort = _fuzz_test("abort")
test_fuzz_status = _fuzz_test("status")
test_fuzz_datasets = _fuzz_test("datasets")
test_fuzz_dataset = _fuzz_test("dataset")
test_fuzz_storage_put = _fuzz_test("storage_put")


# ---------------------------------------------------------------------- the upload flow


FAST = UploadOptions(
    policy=RetryPolicy(attempts=2, base=0.01, cap=0.02),
    storage_attempts=2,
    part_concurrency=2,
)


def _request(path: Path) -> UploadRequest:
    return UploadRequest(
        file=FileRef.stat(path),
        dataset_name=path.name,
        stream=Stream(id=1, name="inbox", datapool="default"),
        metadata={},
        upload_key="k" * 32,
    )


async def _upload(client: MarpleClient, path: Path) -> BaseException | None:
    try:
        with anyio.fail_after(20):
            await upload_file(client, _request(path), options=FAST)
    except InboxdError as exc:
        check_error(exc)
        return exc
    return None


def _ingestion(mode: str, **extra: Any) -> Answer:
    return json_answer({"dataset_id": 11, "ingestion_id": 22, "mode": mode, **extra})


async def test_upload_unknown_mode_aborts_with_a_reason(
    srv: HostileServer, client: MarpleClient, small_file: Path
) -> None:
    srv.answer("POST /ingestion", _ingestion("teleport"))
    exc = await _upload(client, small_file)
    assert isinstance(exc, UploadFailed)
    assert "upload mode 'teleport'" in str(exc)
    (abort,) = srv.seen("POST /ingestion/{id}/abort")
    assert "teleport" in abort.json()["reason"]


async def test_upload_status_failed_in_200_at_create(
    srv: HostileServer, client: MarpleClient, small_file: Path
) -> None:
    srv.answer("POST /ingestion", json_answer({"status": "failed", "error": "stream is frozen"}))
    exc = await _upload(client, small_file)
    assert isinstance(exc, RejectedError)
    assert "stream is frozen" in str(exc)
    assert srv.seen("POST /ingestion/{id}/abort") == []  # nothing was opened


async def test_upload_status_failed_in_200_at_complete(
    srv: HostileServer, client: MarpleClient, small_file: Path
) -> None:
    srv.answer(
        "POST /ingestion/{id}/upload/complete",
        json_answer({"status": "failed", "message": "checksum mismatch"}),
    )
    exc = await _upload(client, small_file)
    assert isinstance(exc, UploadFailed)
    assert "checksum mismatch" in str(exc)


async def test_upload_part_urls_without_the_part_asked_for(
    srv: HostileServer, client: MarpleClient, small_file: Path
) -> None:
    srv.answer("POST /ingestion", _ingestion("multipart", part_size=1024))
    srv.answer(
        "GET /ingestion/{id}/upload/part-urls",
        json_answer({"parts": [{"part_number": 99, "url": f"{srv.origin}/storage/22/part/99"}]}),
    )
    exc = await _upload(client, small_file)
    assert isinstance(exc, UploadFailed)
    assert "no URL for part 1" in str(exc)
    assert srv.seen("POST /ingestion/{id}/abort")


async def test_upload_storage_answers_huge_error_bodies(
    srv: HostileServer, client: MarpleClient, small_file: Path
) -> None:
    srv.answer("POST /ingestion", _ingestion("multipart", part_size=1024))
    srv.answer("PUT storage", Answer(503, b"<Error>", filler_bytes=HUGE, chunked=True))
    exc = await _upload(client, small_file)
    assert isinstance(exc, StorageError)
    assert "gave up after 2 tries" in str(exc)
    assert all(not r.answer_complete for r in srv.seen("PUT storage"))


async def test_upload_single_with_garbage_url_falls_back_to_server(
    srv: HostileServer, client: MarpleClient, small_file: Path
) -> None:
    srv.answer("POST /ingestion", _ingestion("single", presigned_url="ftp://nowhere/obj"))
    assert await _upload(client, small_file) is None
    (upload,) = srv.seen("POST /ingestion/{id}/upload/server")
    assert upload.body_length > len(SMALL)


async def test_upload_server_always_answers_html_502(
    srv: HostileServer, client: MarpleClient, small_file: Path
) -> None:
    srv.answer("POST /ingestion/{id}/upload/server", html_page(502, "Bad Gateway"))
    exc = await _upload(client, small_file)
    assert isinstance(exc, ServerError)
    assert "HTTP 502" in str(exc)
    # Retryable: the ingestion is left open for the daemon to resume, not aborted.
    assert srv.seen("POST /ingestion/{id}/abort") == []


# --------------------------------------------------------------------------- the poller


async def _importing_job(queue: Queue, dataset_id: int = 11) -> int:
    (job_id,) = await queue.enqueue_many([NewJob(FileIdentity("a.csv", 10, 1, 1), 1, "a.csv", {})])
    job = await queue.claim("test", 60)
    assert job is not None and job.id == job_id
    await queue.save_progress(
        job_id, stage=Stage.COMPLETING, ingestion_id=22, remote_id=dataset_id, mode="server"
    )
    await queue.mark_uploaded(job_id)
    return job_id


async def test_poller_records_unknown_statuses_and_polls_again(
    srv: HostileServer, client: MarpleClient, tmp_path: Path
) -> None:
    answers = iter(
        [
            [{"dataset_id": 11, "import_status": "REINDEXING", "import_progress": 0.1}],
            [{"dataset_id": 11, "import_status": None}],
            [{"dataset_id": 11, "import_status": "QUANTUM", "import_message": "hm"}],
            [{"dataset_id": 11, "import_status": "FINISHED", "import_progress": 1.0}],
        ]
    )
    srv.answer("POST /stream/{id}/datasets/status", lambda seen: json_answer(next(answers)))
    async with await Queue.open(tmp_path / "state.db") as queue:
        job_id = await _importing_job(queue)
        poller = Poller(queue, MarpleDbTarget(client, FAST), interval=0.01)
        seen_statuses = []
        for _ in range(4):
            await poller.poll_once()
            job = await queue.get(job_id)
            assert job is not None
            seen_statuses.append((job.state, job.import_status))
    assert seen_statuses == [
        (JobState.IMPORTING, "REINDEXING"),
        (JobState.IMPORTING, "UNKNOWN"),
        (JobState.IMPORTING, "QUANTUM"),
        (JobState.DONE, "FINISHED"),
    ]
    assert len(srv.seen("POST /stream/{id}/datasets/status")) == 4


async def test_poller_survives_garbage_answers(
    srv: HostileServer, client: MarpleClient, tmp_path: Path
) -> None:
    bad = iter(
        [
            Answer(200, b"{nope"),
            html_page(502, "Bad Gateway"),
            Answer(200, b"[", filler_bytes=HUGE, chunked=True),
            Answer(200, b'[{"dataset_id": 11', cut_after=5),
            json_answer([{"dataset_id": "eleven"}]),
            json_answer({"status": "failed", "error": "db locked"}),
        ]
    )

    def script(seen: Seen) -> Answer:
        return next(bad, json_answer([{"dataset_id": 11, "import_status": "IMPORTING"}]))

    srv.answer("POST /stream/{id}/datasets/status", script)
    async with await Queue.open(tmp_path / "state.db") as queue:
        job_id = await _importing_job(queue)
        poller = Poller(queue, MarpleDbTarget(client, FAST), interval=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(poller.run)
            with anyio.fail_after(20):
                while poller.passes < 8:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        job = await queue.get(job_id)
    assert job is not None and job.state == JobState.IMPORTING
    assert job.import_status == "IMPORTING"


async def test_poller_survives_deeply_nested_answer(
    srv: HostileServer, client: MarpleClient, tmp_path: Path
) -> None:
    srv.answer_once("POST /stream/{id}/datasets/status", Answer(200, b"[" * 200_000))
    async with await Queue.open(tmp_path / "state.db") as queue:
        job_id = await _importing_job(queue)
        poller = Poller(queue, MarpleDbTarget(client, FAST), interval=0.01)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(poller.run)
                with anyio.fail_after(10):
                    while poller.passes < 3:
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the task group wraps what ended the poller
            raise group.exceptions[0] from None
        job = await queue.get(job_id)
    assert job is not None and job.state == JobState.DONE  # the default answer after the bad one


class _FlakyTarget:
    """A target with a bug nobody foresaw: its first ``failures`` polls raise a raw error.

    Only the poller's loop is under test here (any target's bug must not end it); the polls
    after the failures go to the real Marple DB target and the hostile server.
    """

    def __init__(self, real: MarpleDbTarget, failures: int) -> None:
        self.kind = real.kind
        self._real = real
        self.failures = failures
        self.calls: list[float] = []

    async def poll(self, jobs: Sequence[Job]) -> list[ImportUpdate]:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            raise KeyError(f"Bearer {TOKEN} slipped into a bug's message")
        return await self._real.poll(jobs)


async def test_poller_survives_an_unexpected_exception_and_backs_off(
    srv: HostileServer,
    client: MarpleClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with await Queue.open(tmp_path / "state.db") as queue:
        job_id = await _importing_job(queue)
        target = _FlakyTarget(MarpleDbTarget(client, FAST), failures=3)
        poller = Poller(queue, target, interval=0.02)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            await tg.start(poller.run)
            with anyio.fail_after(10):
                while poller.passes < 5:
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
        job = await queue.get(job_id)
    assert job is not None and job.state == JobState.DONE
    gaps = [b - a for a, b in zip(target.calls, target.calls[1:], strict=False)]
    # 0.04, 0.08, 0.16 s after the three failures: doubling from the interval
    assert all(gap >= 0.02 * 2 ** (i + 1) for i, gap in enumerate(gaps[:3])), gaps
    logged = capsys.readouterr()
    text = logged.out + logged.err
    assert "poller.unexpected" in text and "KeyError" in text
    assert TOKEN not in text


async def test_poller_lets_cancellation_through(
    srv: HostileServer, client: MarpleClient, tmp_path: Path
) -> None:
    """catch Exception, not BaseException: a cancelled poll must end run(), not be retried."""
    srv.answer("POST /stream/{id}/datasets/status", Answer(200, b"[]", delay=5))
    async with await Queue.open(tmp_path / "state.db") as queue:
        await _importing_job(queue)
        poller = Poller(queue, MarpleDbTarget(client, FAST), interval=0.01)
        started = time.monotonic()
        with anyio.move_on_after(0.2):
            await poller.run()
        assert time.monotonic() - started < 1
        assert poller.passes == 0


_STATUS_VALUES = st.one_of(
    st.none(),
    st.sampled_from(["FINISHED", "LIVE", "FAILED", "COOLING_FAILED", "IMPORTING", "WAITING"]),
    st.text(max_size=20),
)
_PROGRESS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers())


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=not LONG,
)
@given(
    status=_STATUS_VALUES,
    progress=_PROGRESS,
    message=st.one_of(st.none(), st.text(max_size=40)),
)
def test_fuzz_poller_records_any_status(
    srv: HostileServer,
    portal: anyio.from_thread.BlockingPortal,
    shared_client: MarpleClient,
    tmp_path_factory: pytest.TempPathFactory,
    status: str | None,
    progress: float | None,
    message: str | None,
) -> None:
    """Whatever the status, the job ends IMPORTING (unknown) or DONE/FAILED (terminal), and
    ``status --json`` stays strict JSON (progress values like 1e999 must not make it invalid)."""
    _STATS["examples"] += 1
    item = {"dataset_id": 11, "import_status": status, "import_progress": progress}
    item["import_message"] = message
    srv.answer("POST /stream/{id}/datasets/status", json_answer([item]))
    db = tmp_path_factory.mktemp("poll") / "state.db"

    async def go() -> tuple[Any, str]:
        async with await Queue.open(db) as queue:
            job_id = await _importing_job(queue)
            try:
                await Poller(queue, MarpleDbTarget(shared_client, FAST)).poll_once()
            except ProtocolError as exc:
                check_error(exc)
            job = await queue.get(job_id)
            snap = await status_view.snapshot(queue)
            return job, status_view.to_json(snap)

    job, text = portal.call(go)
    value = status or "UNKNOWN"
    if value in ("FINISHED", "LIVE"):
        assert job.state == JobState.DONE
    elif value in ("FAILED", "COOLING_FAILED"):
        assert job.state == JobState.FAILED and "import failed" in (job.last_error or "")
    else:
        assert job.state == JobState.IMPORTING
    _strict_json(text)


@pytest.mark.parametrize("progress", [b"1e999", b"-1e999", b"NaN", b"Infinity"])
async def test_infinite_progress_keeps_status_json_valid(
    srv: HostileServer, client: MarpleClient, tmp_path: Path, progress: bytes
) -> None:
    srv.answer(
        "POST /stream/{id}/datasets/status",
        Answer(
            200,
            b'[{"dataset_id": 11, "import_status": "IMPORTING", "import_progress": '
            + progress
            + b"}]",
        ),
    )
    async with await Queue.open(tmp_path / "state.db") as queue:
        job_id = await _importing_job(queue)
        await Poller(queue, MarpleDbTarget(client, FAST)).poll_once()
        job = await queue.get(job_id)
        text = status_view.to_json(await status_view.snapshot(queue))
    assert job is not None and job.import_status == "IMPORTING"
    assert job.import_progress is None  # not stored as a number nobody can show
    (shown,) = [j for j in _strict_json(text)["jobs"] if j["id"] == job_id]
    assert shown["import_progress"] is None
