"""daemon.net.backend: httpx over the asyncio backend, against real sockets on loopback.

Each test scripts a small raw TCP server (``asyncio.start_server``) to do what real servers
and networks do to a client: keep connections alive and close them when idle, answer slowly
or never, reset mid-answer, send and take more than fits in a socket buffer, speak TLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest
import trustme

from daemon.net.backend import AsyncioBackend, adopt, uses_asyncio_backend

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MiB = 1024 * 1024


class _Server:
    def __init__(self, port: int, scheme: str) -> None:
        self.url = f"{scheme}://localhost:{port}"
        self.connections = 0


@asynccontextmanager
async def serve(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[_Server]:
    server_ref: list[_Server] = []
    tasks: set[asyncio.Task[object]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_ref[0].connections += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    port = srv.sockets[0].getsockname()[1]
    server_ref.append(_Server(port, "https" if tls else "http"))
    try:
        yield server_ref[0]
    finally:
        srv.close()
        for task in tasks:
            task.cancel()
        await srv.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: (request line + headers, body by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head, body


def answer(body: bytes, *, close: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def client(*, verify: ssl.SSLContext | bool = True, timeout: float = 5.0) -> httpx.AsyncClient:
    built = adopt(httpx.AsyncClient(verify=verify, timeout=timeout))
    assert uses_asyncio_backend(built)
    return built


async def test_keep_alive_reuses_one_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            writer.write(answer(b"echo:" + body))
            await writer.drain()

    async with serve(handler) as srv, client() as http:
        for i in range(5):
            r = await http.post(srv.url, content=b"n%d" % i)
            assert r.content == b"echo:n%d" % i
    assert srv.connections == 1


async def test_idle_connection_closed_by_server_is_not_reused() -> None:
    # The server answers once and closes without "Connection: close", as servers do when a
    # keep-alive timeout runs out between requests; the next request must not hit the dead
    # socket (httpcore asks the backend whether an idle connection is readable).
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"once"))
        await writer.drain()

    async with serve(handler) as srv, client() as http:
        assert (await http.get(srv.url)).content == b"once"
        await anyio.sleep(0.1)  # the FIN arrives while the connection sits in the pool
        assert (await http.get(srv.url)).content == b"once"
    assert srv.connections == 2


async def test_large_answer_read_slowly_arrives_whole() -> None:
    blob = bytes(range(256)) * (40 * 4096)  # 40 MiB: well past the read high-water mark

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(blob))
        await writer.drain()

    async with serve(handler) as srv, client() as http:
        digest = hashlib.sha256()
        most_buffered = 0
        async with http.stream("GET", srv.url) as r:
            unread = r.extensions["network_stream"]._p.buffer
            async for chunk in r.aiter_raw():
                digest.update(chunk)
                most_buffered = max(most_buffered, len(unread))
                if digest.digest()[0] < 64:
                    await anyio.sleep(0.002)  # a slow reader now and then
    assert digest.hexdigest() == hashlib.sha256(blob).hexdigest()
    # Reading pauses at the high-water mark: memory does not grow with the answer's size.
    assert most_buffered <= 2 * MiB, most_buffered


async def test_large_upload_to_a_slow_reader_arrives_whole() -> None:
    received = hashlib.sha256()
    total = 24 * MiB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        left = total
        while left:
            chunk = await reader.read(min(left, 64 * 1024))
            received.update(chunk)
            left -= len(chunk)
            await asyncio.sleep(0)  # slower than the client writes: its buffer fills
        writer.write(answer(b"ok"))
        await writer.drain()

    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for i in range(total // MiB):
            chunk = bytes([i]) * MiB
            sent.update(chunk)
            yield chunk

    async with serve(handler) as srv, client() as http:
        r = await http.post(srv.url, content=body(), headers={"Content-Length": str(total)})
        assert r.content == b"ok"
    assert received.hexdigest() == sent.hexdigest()


async def test_silent_server_gives_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with serve(handler) as srv, client(timeout=0.3) as http:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.get(srv.url)
        assert time.monotonic() - started < 5


async def test_reset_mid_answer_is_a_transport_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        # SO_LINGER 0: close() sends RST, as a crashed peer or a middlebox would
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with serve(handler) as srv, client() as http:
        with pytest.raises(httpx.TransportError):
            await http.get(srv.url)


async def test_closed_port_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        async with client() as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{port}/")


async def test_cancelled_request_leaves_the_client_usable() -> None:
    slow = True

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            if slow:
                await asyncio.sleep(30)
            writer.write(answer(b"fine"))
            await writer.drain()

    async with serve(handler) as srv, client() as http:
        with anyio.move_on_after(0.2) as scope:
            await http.get(srv.url)
        assert scope.cancelled_caught
        slow = False
        assert (await http.get(srv.url)).content == b"fine"


async def test_tls_with_a_private_ca() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            writer.write(answer(b"tls:" + body))
            await writer.drain()

    async with serve(handler, tls=server_ctx) as srv:
        async with client(verify=client_ctx) as http:
            for i in range(3):
                r = await http.post(srv.url, content=b"%d" % i)
                assert r.content == b"tls:%d" % i
            assert r.extensions["network_stream"].get_extra_info("ssl_object") is not None
        assert srv.connections == 1
        async with client(verify=ssl.create_default_context()) as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(srv.url)


async def test_trio_style_fallback_is_not_needed_on_asyncio() -> None:
    # On asyncio the backend is itself; the anyio fallback exists only for other loops.
    backend = AsyncioBackend()
    assert backend._other() is None


def test_proxies_from_the_environment_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # Passing a transport of our own would make httpx ignore HTTPS_PROXY; adopt() must not.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    built = adopt(httpx.AsyncClient())
    assert any(isinstance(t, httpx.AsyncHTTPTransport) for t in built._mounts.values())
    assert uses_asyncio_backend(built)


def test_marple_client_sends_through_the_asyncio_backend() -> None:
    from pydantic import SecretStr

    from daemon.delivery.marple_db.client import MarpleClient

    client = MarpleClient("http://127.0.0.1:9/api/v1", SecretStr("t"))
    assert uses_asyncio_backend(client._api)
    assert uses_asyncio_backend(client._storage)


async def test_marple_client_keeps_and_sends_no_cookies() -> None:
    from pydantic import SecretStr

    from daemon.delivery.marple_db.client import MarpleClient

    heads: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            heads.append(head.lower())
            body = b'{"status": "ok"}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Set-Cookie: session=abc123; Path=/\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()

    async with serve(handler) as srv, MarpleClient(f"{srv.url}/api/v1", SecretStr("t")) as client:
        await client.health()
        await client.health()
    assert len(heads) == 2
    assert all(b"cookie:" not in head for head in heads), heads


async def test_cancelled_upload_does_not_reach_the_server_whole() -> None:
    # A cancelled request must be cut off, not flushed: storage would otherwise store a part
    # the client gave up on (and count it twice in the journal's eyes).
    total = 32 * MiB  # one write: all of it sits in the transport's buffer when cancelled
    received = 0
    finished = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await reader.readuntil(b"\r\n\r\n")
        try:
            await asyncio.sleep(0.5)  # not reading: the client's buffers fill up
            while received < total:
                chunk = await reader.read(64 * 1024)
                if not chunk:
                    break
                received += len(chunk)
        finally:
            finished.set()

    async def body() -> AsyncIterator[bytes]:
        yield bytes(total)

    async with serve(handler) as srv, client() as http:
        with anyio.move_on_after(0.2) as scope:
            await http.post(srv.url, content=body(), headers={"Content-Length": str(total)})
        assert scope.cancelled_caught
        with anyio.fail_after(10):
            await finished.wait()
    assert received < total


async def test_many_requests_in_flight_share_kept_alive_connections_in_linear_time() -> None:
    """32 requests in flight, 32 kept-alive connections: every request reuses one, and the
    pool's bookkeeping per request grows with the pool (httpcore's own is quadratic)."""
    import httpcore

    from daemon.net.backend import _POOL_FIX_APPLIES

    assert _POOL_FIX_APPLIES, f"httpcore {httpcore.__version__}: check netio._assign_requests"
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await gate.wait()  # hold answers until all 32 are in flight
            writer.write(answer(b"ok"))
            await writer.drain()

    calls = 0
    real = httpcore.AsyncHTTP11Connection.is_idle

    def counting(self: httpcore.AsyncHTTP11Connection) -> bool:
        nonlocal calls
        calls += 1
        return real(self)

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with serve(handler) as srv, adopt(httpx.AsyncClient(limits=limits, timeout=5.0)) as http:

        async def one() -> None:
            r = await http.get(srv.url)
            assert r.content == b"ok"

        async def rounds() -> None:
            for _ in range(3):
                gate.clear()
                async with anyio.create_task_group() as tg:
                    for _ in range(32):
                        tg.start_soon(one)
                    while len(http._transport._pool._requests) < 32:  # type: ignore[attr-defined]
                        await asyncio.sleep(0.005)
                    gate.set()

        pytest.MonkeyPatch().setattr(httpcore.AsyncHTTP11Connection, "is_idle", counting)
        try:
            await rounds()
        finally:
            httpcore.AsyncHTTP11Connection.is_idle = real  # type: ignore[method-assign]
    assert srv.connections == 32  # opened once, then reused by rounds 2 and 3
    # 96 requests, two pool passes each over at most 32 connections: linear is ~6,000 calls;
    # httpcore's quadratic count would be ~100,000.
    assert calls < 15_000, calls


async def test_file_bodies_go_to_https_in_cache_sized_chunks(tmp_path: Path) -> None:
    """A file PUT to an https:// URL is read and sent in chunks of at most TLS_CHUNK_SIZE
    (asyncio's TLS layer copies each chunk whole); to http:// in CHUNK_SIZE chunks. The bytes
    that arrive are the file's either way."""
    from pydantic import SecretStr

    from daemon.delivery.files import CHUNK_SIZE, TLS_CHUNK_SIZE, FileSlice
    from daemon.delivery.marple_db.client import MarpleClient

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    data = bytes(range(256)) * (5 * MiB // 256)
    path = tmp_path / "part.bin"
    path.write_bytes(data)
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, body = await read_request(reader)
            received.append(body)
            writer.write(answer(b""))
            await writer.drain()

    sizes: dict[str, list[int]] = {"https": [], "http": []}
    async with MarpleClient("http://127.0.0.1:9/api/v1", SecretStr("t"), ca_file=ca_file) as marple:
        for scheme, tls in (("https", server_ctx), ("http", None)):
            async with serve(handler, tls=tls) as srv:
                source = FileSlice(path, 0, len(data))
                await marple.storage_put(
                    f"{srv.url}/part?sig=x", source, progress=sizes[scheme].append
                )
    assert received == [data, data]
    assert max(sizes["https"]) == TLS_CHUNK_SIZE < CHUNK_SIZE
    assert max(sizes["http"]) == CHUNK_SIZE


async def test_a_closed_connection_at_the_pool_limit_makes_room_at_once() -> None:
    """A pool at its connection limit whose one connection the server closed ("Connection:
    close") serves the next request straight away with a new connection: the closed one
    does not hold the slot until the next sweep (a request queued behind it would end in a
    PoolTimeout, as a hypothesis example of the hostile-server suite once found)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"ok", close=True))
        await writer.drain()

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    timeout = httpx.Timeout(5.0, pool=1.0)
    async with (
        serve(handler) as srv,
        adopt(httpx.AsyncClient(limits=limits, timeout=timeout)) as http,
    ):
        for _ in range(3):  # well within one sweep interval
            r = await http.get(srv.url)
            assert r.content == b"ok"
    assert srv.connections == 3
