"""The socket layer under httpx on asyncio: one protocol object per connection, no extra layers.

Why no library: httpcore ships only its anyio backend for asyncio (a plain-asyncio one was
declined upstream, encode/httpcore#930) and that backend cost a fifth of the daemon's CPU
(docs/benchmarks.md); ``httpx-aiohttp`` would swap the whole HTTP stack (and its errors,
timeouts and TLS) for aiohttp's, not just the socket layer.

httpcore's default backend on asyncio goes through anyio: every read and write enters a
``fail_after`` cancel scope, an exception map and anyio's socket stream, and every reuse of a
pooled connection rebuilds anyio's attribute table to ask whether the socket is readable. For
large uploads that is noise; for a daemon sending three small requests per 4 KiB file it was
a fifth of its CPU time. This backend keeps httpcore's contract (``AsyncNetworkBackend``) with
a plain ``asyncio.Protocol``: reads wait on a future with a timer for the timeout, writes wait
only when the transport's buffer is full.

Cancellation is anyio's as usual: a cancelled task is interrupted at the future it waits on,
and the timer is cancelled on the way out. Off asyncio (trio), httpcore's own backend is used.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import httpcore
import httpx
import sniffio

#: read no more from the socket while this much is buffered and unread
_READ_HIGH_WATER = 1 << 20


class _Protocol(asyncio.Protocol):
    """Collects what the socket delivers; wakes the one reader, or the one writer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _READ_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # close our side too: HTTP/1.1 has no use for a half-open socket

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc
        self._wake_reader()
        self._writing_paused = False
        self._wake_writer()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # -- waiting ------------------------------------------------------------------------

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_readable(self, timeout: float | None) -> None:
        self._read_waiter = self._loop.create_future()
        try:
            await _wait(self._loop, self._read_waiter, timeout, httpcore.ReadTimeout)
        finally:
            self._read_waiter = None

    async def wait_writable(self, timeout: float | None) -> None:
        if not self._writing_paused:
            return
        self._write_waiter = self._loop.create_future()
        try:
            await _wait(self._loop, self._write_waiter, timeout, httpcore.WriteTimeout)
        finally:
            self._write_waiter = None


async def _wait(
    loop: asyncio.AbstractEventLoop,
    waiter: asyncio.Future[None],
    timeout: float | None,
    timeout_error: type[Exception],
) -> None:
    if timeout is None:
        await waiter
        return

    def expire() -> None:
        if not waiter.done():
            waiter.set_exception(timeout_error(f"no progress in {timeout} s"))

    timer = loop.call_later(timeout, expire)
    try:
        await waiter
    finally:
        timer.cancel()


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, protocol: _Protocol) -> None:
        self._p = protocol

    def _transport(self) -> asyncio.Transport:
        if self._p.transport is None:  # pragma: no cover - connection_made runs first
            raise httpcore.ReadError("the connection is not open")
        return self._p.transport

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._p
        if not p.buffer and not p.eof:
            await p.wait_readable(timeout)
        if p.buffer:
            data = bytes(p.buffer[:max_bytes])
            del p.buffer[:max_bytes]
            if p.reading_paused and len(p.buffer) <= _READ_HIGH_WATER // 2:
                p.reading_paused = False
                self._transport().resume_reading()
            return data
        if p.error is not None:
            raise httpcore.ReadError(f"{type(p.error).__name__}: {p.error}") from p.error
        return b""  # end of stream

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        transport = self._transport()
        if transport.is_closing():
            cause = self._p.error
            text = f"{type(cause).__name__}: {cause}" if cause else "the connection is closed"
            raise httpcore.WriteError(text)
        transport.write(buffer)
        await self._p.wait_writable(timeout)

    async def aclose(self) -> None:
        # abort, not close: close() would still flush what is buffered, so a request cut off
        # by a cancellation or a timeout could reach the server whole after all.
        if self._p.transport is not None:
            self._p.transport.abort()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(
                self._transport(),
                self._p,
                ssl_context,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
        except TimeoutError as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout(f"TLS handshake took over {timeout} s") from exc
        except (OSError, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore.ConnectError(f"{type(exc).__name__}: {exc}") from exc
        if new is None:  # pragma: no cover - only for a transport without TLS support
            raise httpcore.ConnectError("TLS could not be started on this connection")
        assert isinstance(new, asyncio.Transport)
        self._p.transport = new
        return self

    def get_extra_info(self, info: str) -> Any:
        transport = self._p.transport
        if info == "is_readable":
            # httpcore asks this of an idle pooled connection: anything to read (data, EOF,
            # an error) means the server closed it or broke the protocol; do not reuse it.
            return bool(self._p.buffer) or self._p.eof or transport is None
        if transport is None:
            return None
        key = {
            "ssl_object": "ssl_object",
            "client_addr": "sockname",
            "server_addr": "peername",
            "socket": "socket",
        }.get(info)
        return transport.get_extra_info(key) if key else None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on plain asyncio (see the module docstring)."""

    def __init__(self) -> None:
        self._fallback: httpcore.AsyncNetworkBackend | None = None

    def _other(self) -> httpcore.AsyncNetworkBackend | None:
        if sniffio.current_async_library() == "asyncio":
            return None
        if self._fallback is None:
            self._fallback = httpcore.AnyIOBackend()
        return self._fallback

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        other = self._other()
        if other is not None:
            return await other.connect_tcp(host, port, timeout, local_address, socket_options)
        local = (local_address, 0) if local_address else None
        return await _connect(
            lambda loop, make: loop.create_connection(make, host, port, local_addr=local),
            timeout,
            socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        other = self._other()
        if other is not None:
            return await other.connect_unix_socket(path, timeout, socket_options)
        return await _connect(
            lambda loop, make: loop.create_unix_connection(make, path), timeout, socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


_Opener = Callable[
    [asyncio.AbstractEventLoop, Callable[[], _Protocol]],
    Awaitable[tuple[asyncio.BaseTransport, _Protocol]],
]


async def _connect(
    open_: _Opener, timeout: float | None, options: Iterable[httpcore.SOCKET_OPTION] | None
) -> _Stream:
    """One connection through ``open_`` (TCP or Unix), with httpcore's errors for failures."""
    loop = asyncio.get_running_loop()
    protocol = _Protocol(loop)
    try:
        with anyio.fail_after(timeout):
            await open_(loop, lambda: protocol)
    except TimeoutError as exc:
        raise httpcore.ConnectTimeout(f"no connection within {timeout} s") from exc
    except OSError as exc:
        raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
    _apply_options(protocol, options)
    return _Stream(protocol)


def _apply_options(protocol: _Protocol, options: Iterable[httpcore.SOCKET_OPTION] | None) -> None:
    if not options or protocol.transport is None:
        return
    sock: socket.socket = protocol.transport.get_extra_info("socket")
    for option in options:
        sock.setsockopt(*option)


def adopt(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """Make ``client``'s connection pools (its own and any proxy's) use ``AsyncioBackend``,
    and assign requests to connections in linear time (``_assign_requests``).

    httpx offers no argument for httpcore's ``network_backend``, and passing a ``transport``
    of our own would switch off the proxy settings httpx reads from the environment, so the
    backend is set on the pools httpx built. ``uses_asyncio_backend`` lets a test notice if
    an upgrade of httpx or httpcore moves them.
    """
    for pool in _pools(client):
        if hasattr(pool, "_network_backend"):
            pool._network_backend = AsyncioBackend()
        if _POOL_FIX_APPLIES:
            fixed = types.MethodType(_assign_requests, pool)
            pool._assign_requests_to_connections = fixed  # type: ignore[method-assign]
    return client


#: ``_assign_requests`` mirrors httpcore 1.0's method of that name; another release may differ
_POOL_FIX_APPLIES = httpcore.__version__.startswith("1.0.")


def _assign_requests(pool: Any) -> list[Any]:
    """httpcore 1.0's ``AsyncConnectionPool._assign_requests_to_connections``, cheaper.

    httpcore runs it whenever a request starts or ends. It first sweeps every connection
    (closed? expired? idle beyond the keep-alive limit? — counting the pool for each idle one
    by building a list that asks every connection ``is_idle()``: quadratic, about 1,300 calls
    per request with 36 files in flight, more CPU than the request itself), then lists every
    available connection to take the first. Here the sweep runs at most every
    ``_SWEEP_SECONDS`` and counts once; in between, a connection is checked for being closed
    or expired only when it is about to be given a request (the same check, on the one
    connection it matters for). The decisions and their order are httpcore's.
    """
    closing: list[Any] = []
    conns: list[Any] = pool._connections
    now = time.monotonic()
    if now - _SWEPT.get(pool, -_SWEEP_SECONDS) >= _SWEEP_SECONDS:
        _SWEPT[pool] = now
        for connection in list(conns):
            if connection.is_closed():
                conns.remove(connection)
            elif connection.has_expired() or (
                connection.is_idle() and len(conns) > pool._max_keepalive_connections
            ):
                conns.remove(connection)
                closing.append(connection)
    for pool_request in [request for request in pool._requests if request.is_queued()]:
        origin = pool_request.request.url.origin
        available = None
        for connection in list(conns):
            if not (connection.can_handle_request(origin) and connection.is_available()):
                continue
            if connection.is_closed():
                conns.remove(connection)
            elif connection.has_expired():
                conns.remove(connection)
                closing.append(connection)
            else:
                available = connection
                break
        if available is not None:
            pool_request.assign_to_connection(available)
            continue
        if len(conns) >= pool._max_connections:
            # At the limit, closed connections must not count: httpcore drops them on every
            # call, and the next sweep here may be a second away (a request queued behind a
            # closed connection would wait for nothing and end in a PoolTimeout).
            conns[:] = [c for c in conns if not c.is_closed()]
        if len(conns) >= pool._max_connections:
            idle = next((c for c in conns if c.is_idle()), None)
            if idle is None:
                continue  # stays queued until a connection frees up
            conns.remove(idle)
            closing.append(idle)
        connection = pool.create_connection(origin)
        conns.append(connection)
        pool_request.assign_to_connection(connection)
    return closing


#: how often ``_assign_requests`` sweeps a whole pool for closed, expired or surplus connections
_SWEEP_SECONDS = 1.0
_SWEPT: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def uses_asyncio_backend(client: httpx.AsyncClient) -> bool:
    """Whether every connection pool of ``client`` sends through ``AsyncioBackend``."""
    pools = _pools(client)
    return bool(pools) and all(
        isinstance(getattr(pool, "_network_backend", None), AsyncioBackend) for pool in pools
    )


def _pools(client: httpx.AsyncClient) -> list[httpcore.AsyncConnectionPool]:
    transports = [getattr(client, "_transport", None)]
    transports += list(getattr(client, "_mounts", {}).values())
    return [
        pool
        for t in transports
        if isinstance(t, httpx.AsyncHTTPTransport)
        and isinstance(pool := getattr(t, "_pool", None), httpcore.AsyncConnectionPool)
    ]
