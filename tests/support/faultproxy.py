"""An in-tree TCP fault proxy for the reliability suites: no root, no toxiproxy, no netem.

    with running_proxy("127.0.0.1", sandbox_port) as proxy:
        url = proxy.url("/api/v1")                   # point the daemon here
        proxy.fail_next(Fault.reset(after=2000))    # the next connection is reset mid-request
        proxy.set_chaos(Chaos(seed=7, weights={"reset": 0.1, "stall": 0.05}))
        proxy.refuse_connections()                  # "API down": connection refused
        proxy.accept_connections()                  # back
        proxy.freeze(); proxy.thaw()                # every connection goes quiet (timeouts)
        proxy.set_latency(0.040)                    # a 40 ms round trip, as on a WAN link

It listens on 127.0.0.1, port 0 by default, and forwards each accepted connection to the
target. What happens to a connection is decided when it is accepted: the next scripted fault
(``fail_next``), else a fault drawn by the seeded ``Chaos`` mix, else the default (``set_default``,
initially ``Fault.passthrough()``). A fault fires once ``after`` bytes went through (counted in
the direction ``on``: ``up`` = client → target, ``down`` = target → client, ``any``):

=============  ==================================================================================
``pass``       forward everything
``reset``      forward up to the byte count, then reset both sides (SO_LINGER 0 → RST)
``stall``      forward up to the byte count, then nothing either way for ``seconds`` (None: until
               ``release_stalls``/``thaw``/stop, or until the client hangs up, which then resets
               the connection instead of delivering stale bytes)
``throttle``   from the byte count on, forward at ``rate`` bytes/s in each direction
``half_close`` forward up to the byte count, then shut down writing towards ``target`` (the
               ``client``: it sees the answer end early; the ``server``: its request ends early);
               what would still flow that way is read and discarded
``refuse``     accept and reset at once, before a byte is forwarded
=============  ==================================================================================

A ``Chaos`` with a ``window`` draws again every ``window`` bytes of a connection, so long-lived
keep-alive connections keep meeting faults; ``idle_timeout`` closes connections that stay quiet
that long (an orderly FIN both ways, as load balancers do), so pools keep opening new ones.

``refuse_connections()`` goes further: it stops listening (the port stays reserved by a bound,
non-listening socket), so clients get ECONNREFUSED — a server that is down. ``reset_all()`` resets
the connections open now (a keep-alive pool must not outlive an outage).

``set_latency(rtt)`` makes the proxy a link with that round-trip time (netem without root): every
byte is delivered ``rtt / 2`` after it arrived, in each direction, in order and pipelined (a
delay line, so bandwidth is not cut), and a new connection's first bytes also wait for the
TCP handshake a real link would cost (one more ``rtt``). A request and its answer therefore
take one ``rtt``, and the first on a new connection two. At most ``_DELAY_BUFFER`` bytes wait in
each direction's line; the proxy stops reading that way meanwhile. Faults apply to the bytes as
they leave the line.

The proxy runs its own asyncio loop in a background thread (like ``running_sandbox``), so it
serves daemons in other processes and tests of any flavour; control methods are thread-safe.
``stats()`` counts connections, bytes and the faults that actually fired (a fault whose byte count
is never reached is not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["pass", "reset", "stall", "throttle", "half_close", "refuse"]
KINDS: tuple[Kind, ...] = ("pass", "reset", "stall", "throttle", "half_close", "refuse")
Direction = Literal["up", "down", "any"]
_CHUNK = 64 * 1024
#: most bytes held back per direction of a connection by ``set_latency`` before reading pauses
_DELAY_BUFFER = 4 * 1024 * 1024
_START_TIMEOUT = 10.0
# Linux reports a peer's FIN with POLLRDHUP even while unread bytes are buffered.
_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


@dataclass(frozen=True)
class Fault:
    """What happens to one connection. Build with the class methods."""

    kind: Kind = "pass"
    #: bytes forwarded (in direction ``on``) before the fault fires
    after: int = 0
    on: Direction = "any"
    #: ``stall``: how long; None = until released, thawed, stopped or the client hangs up
    seconds: float | None = None
    #: ``throttle``: bytes per second, each direction
    rate: float = 0.0
    #: ``half_close``: who gets the FIN
    target: Literal["client", "server"] = "client"

    @classmethod
    def passthrough(cls) -> Fault:
        return cls("pass")

    @classmethod
    def reset(cls, after: int = 0, on: Direction = "any") -> Fault:
        return cls("reset", after=after, on=on)

    @classmethod
    def stall(cls, seconds: float | None = None, after: int = 0, on: Direction = "any") -> Fault:
        return cls("stall", after=after, on=on, seconds=seconds)

    @classmethod
    def throttle(cls, rate: float, after: int = 0, on: Direction = "any") -> Fault:
        if rate <= 0:
            raise ValueError("throttle rate must be > 0 bytes/s")
        return cls("throttle", after=after, on=on, rate=rate)

    @classmethod
    def half_close(
        cls,
        after: int = 0,
        target: Literal["client", "server"] = "client",
        on: Direction = "any",
    ) -> Fault:
        return cls("half_close", after=after, on=on, target=target)

    @classmethod
    def refuse(cls) -> Fault:
        return cls("refuse")


@dataclass
class Chaos:
    """A seeded random mix: per new connection, a fault kind drawn with these probabilities.

    ``weights`` maps kinds to probabilities; whatever is left up to 1 is ``pass``. The byte
    count is small (uniform in [0, ``small_after``]: it hits short API exchanges and request
    heads) or large (uniform in [0, ``max_after``]: mid-body), half and half; the direction it
    counts is uniform over up/down/any; stall lengths are uniform in ``stall_seconds``,
    throttle rates in ``throttle_rate``.

    ``window``: when set, a connection draws again each time this many more bytes went through
    it (either way), so long-lived keep-alive connections meet faults in proportion to their
    traffic; a throttle stays in force until another throttle replaces it. None: one draw per
    connection.
    """

    weights: dict[str, float]
    seed: int = 0
    max_after: int = 256 * 1024
    small_after: int = 4 * 1024
    stall_seconds: tuple[float, float] = (1.0, 4.0)
    throttle_rate: tuple[float, float] = (128 * 1024.0, 2 * 1024 * 1024.0)
    window: int | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        if sum(self.weights.values()) > 1.0 + 1e-9 or min(self.weights.values(), default=0) < 0:
            raise ValueError("chaos weights must be >= 0 and sum to at most 1")
        if self.window is not None and self.window <= self.max_after:
            raise ValueError("window must be larger than max_after")
        self._rng = random.Random(self.seed)

    def pick(self, *, mid_stream: bool = False) -> Fault:
        """The next fault; ``mid_stream`` (a window's re-draw) turns ``refuse`` into ``reset``."""
        rng = self._rng
        roll = rng.random()
        kind: str = "pass"
        acc = 0.0
        for k, w in self.weights.items():
            acc += w
            if roll < acc:
                kind = k
                break
        after = rng.randint(0, self.small_after if rng.random() < 0.5 else self.max_after)
        on: Direction = rng.choice(("up", "down", "any"))
        if kind == "refuse" and mid_stream:
            kind = "reset"
        if kind == "reset":
            return Fault.reset(after, on)
        if kind == "stall":
            return Fault.stall(rng.uniform(*self.stall_seconds), after, on)
        if kind == "throttle":
            return Fault.throttle(rng.uniform(*self.throttle_rate), after, on)
        if kind == "half_close":
            return Fault.half_close(after, rng.choice(("client", "server")), on)
        if kind == "refuse":
            return Fault.refuse()
        return Fault.passthrough()


@dataclass
class FaultEvent:
    """A fault that fired."""

    time: float
    conn: int
    kind: str
    at_bytes: int
    detail: str = ""


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, not a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _hung_up(writer: asyncio.StreamWriter) -> bool:
    """Has the peer of this socket closed its end (FIN or RST)? Does not read."""
    if writer.transport.is_closing():
        return True
    sock = writer.get_extra_info("socket")
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock.fileno(), _HANGUP)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class _Conn:
    def __init__(self, proxy: FaultProxy, cid: int, fault: Fault) -> None:
        self.proxy = proxy
        self.id = cid
        self.fault = fault
        self.fired = False
        self.counted = 0
        self.stalled_until = 0.0
        self.stall_forever = False
        self.rate = 0.0
        self.shut: set[str] = set()  # directions whose writing was shut down ("up"/"down")
        self.client: asyncio.StreamWriter | None = None
        self.server: asyncio.StreamWriter | None = None
        self.dead = False
        self._release_seen = proxy._release_gen
        #: set when the fault came from chaos with a window: re-draw every ``window`` bytes
        self.chaos: Chaos | None = None
        self.in_window = 0
        self.last_active = time.monotonic()

    def reset(self) -> None:
        self.dead = True
        _rst(self.client)
        _rst(self.server)

    def stalled(self) -> bool:
        if self.proxy._release_gen != self._release_seen:
            self._release_seen = self.proxy._release_gen
            self.stall_forever = False
            self.stalled_until = 0.0
        return self.stall_forever or time.monotonic() < self.stalled_until


class FaultProxy:
    """See the module docstring. Use ``running_proxy`` (or ``start``/``stop``)."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._default = Fault.passthrough()
        self._script: list[Fault] = []
        self._chaos: Chaos | None = None
        self._listening = True
        self._frozen = False
        self._release_gen = 0
        self._conns: dict[int, _Conn] = {}
        self._next_id = 0
        self._faults: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self.events: list[FaultEvent] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._placeholder: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping: asyncio.Event | None = None
        #: close a connection (FIN both ways) after this many seconds without a byte; None: never
        self.idle_timeout: float | None = None
        #: round-trip time the proxy adds (``set_latency``); 0 = none
        self.latency = 0.0

    # ------------------------------------------------------------------------------ control

    @property
    def address(self) -> str:
        """``host:port`` as clients write it in a URL (and in the Host header)."""
        return f"{self.host}:{self.port}"

    def url(self, path: str = "") -> str:
        return f"http://{self.address}{path}"

    def set_default(self, fault: Fault) -> None:
        """The fault of every new connection not scripted or drawn by chaos."""
        with self._lock:
            self._default = fault

    def fail_next(self, *faults: Fault) -> None:
        """Script the faults of the next connections, in order (before chaos and default)."""
        with self._lock:
            self._script.extend(faults)

    def set_latency(self, rtt: float) -> None:
        """Add a round-trip time of ``rtt`` seconds to new connections (see the module doc)."""
        if not rtt >= 0:
            raise ValueError("latency must be >= 0 seconds")
        with self._lock:
            self.latency = rtt

    def set_chaos(self, chaos: Chaos | None) -> None:
        with self._lock:
            self._chaos = chaos

    def clear(self) -> None:
        """Back to a plain proxy: no script, no chaos, default pass, not frozen, stalls freed."""
        with self._lock:
            self._default = Fault.passthrough()
            self._script.clear()
            self._chaos = None
        self.thaw()
        self.release_stalls()

    def freeze(self) -> None:
        """Stop forwarding on every connection, open or new (clients time out)."""
        with self._lock:
            self._frozen = True
            self._counts["freezes"] += 1

    def thaw(self) -> None:
        with self._lock:
            self._frozen = False

    def release_stalls(self) -> None:
        """End every stall now (connections whose client hung up are reset instead)."""
        with self._lock:
            self._release_gen += 1

    def refuse_connections(self) -> None:
        """Stop listening: connecting fails with ECONNREFUSED until ``accept_connections``."""
        self._call(self._stop_listening)

    def accept_connections(self) -> None:
        self._call(self._start_listening)

    def reset_all(self) -> int:
        """Reset every open connection; returns how many."""
        return int(self._call(self._reset_all))

    def stats(self) -> dict[str, Any]:
        """Counters: connections, active, bytes_up, bytes_down, faults (by kind), total."""
        with self._lock:
            faults = dict(self._faults)
            return {
                "connections": self._counts["connections"],
                "active": len(self._conns),
                "upstream_failures": self._counts["upstream_failures"],
                "idle_closes": self._counts["idle_closes"],
                "redraws": self._counts["redraws"],
                "bytes_up": self._counts["bytes_up"],
                "bytes_down": self._counts["bytes_down"],
                "faults": faults,
                "faults_total": sum(faults.values()),
            }

    # ------------------------------------------------------------------------- life cycle

    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._main(ready))
            except BaseException as exc:  # reported to start() if it happens before ready
                failure.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise RuntimeError("the fault proxy did not start in time")
        if failure:
            raise RuntimeError(f"the fault proxy failed to start: {failure[0]!r}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        stopping = self._stopping
        if stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        thread.join(_START_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------- loop thread

    def _call(self, fn: Any) -> Any:
        """Run ``fn`` (a coroutine function) on the proxy's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(_START_TIMEOUT)

    async def _main(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        await self._start_listening()
        ready.set()
        await self._stopping.wait()
        if self._server is not None:
            self._server.close()
        if self._placeholder is not None:
            self._placeholder.close()
        await self._reset_all()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await asyncio.sleep(0.01)  # let the aborted transports finish closing

    def _bind(self, listen: bool) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        if listen:
            sock.listen(512)
        self.port = sock.getsockname()[1]
        return sock

    async def _start_listening(self) -> None:
        if self._server is not None:
            return
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        sock = self._bind(listen=True)
        self._server = await asyncio.start_server(self._accept, sock=sock, limit=_CHUNK)
        with self._lock:
            self._listening = True

    async def _stop_listening(self) -> None:
        if self._server is None:
            return
        # Not wait_closed(): since Python 3.12 it also waits for every open connection.
        self._server.close()
        self._server = None
        # Keep the port: a bound socket that does not listen answers SYNs with RST.
        self._placeholder = self._bind(listen=False)
        with self._lock:
            self._listening = False
            self._counts["refusals"] += 1

    async def _reset_all(self) -> int:
        conns = list(self._conns.values())
        for conn in conns:
            conn.reset()
        return len(conns)

    def _choose(self) -> tuple[int, Fault, Chaos | None]:
        with self._lock:
            self._next_id += 1
            self._counts["connections"] += 1
            if self._script:
                return self._next_id, self._script.pop(0), None
            chaos = self._chaos
            if chaos is not None:
                return self._next_id, chaos.pick(), chaos if chaos.window else None
            return self._next_id, self._default, None

    def _redraw(self, conn: _Conn) -> None:
        """A chaos window is used up: draw the connection's next fault."""
        assert conn.chaos is not None
        with self._lock:
            conn.fault = conn.chaos.pick(mid_stream=True)
            self._counts["redraws"] += 1
        conn.fired = False
        conn.counted = 0
        conn.in_window = 0

    def _fired(self, conn: _Conn, kind: str, detail: str = "") -> None:
        with self._lock:
            self._faults[kind] += 1
            self.events.append(FaultEvent(time.time(), conn.id, kind, conn.counted, detail))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        accepted = time.monotonic()
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP (ours is
            # 0): without it, an answer written in two pieces waits for a delayed ACK (40 ms).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid, fault, chaos = self._choose()
        with self._lock:
            rtt = self.latency
        conn = _Conn(self, cid, fault)
        conn.chaos = chaos
        conn.client = writer
        try:
            if fault.kind == "refuse":
                self._fired(conn, "refuse")
                _rst(writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target, limit=_CHUNK)
            except OSError:
                with self._lock:
                    self._counts["upstream_failures"] += 1
                _rst(writer)
                return
            conn.server = up_writer
            self._conns[cid] = conn
            idle = asyncio.create_task(self._idle_watch(conn))
            try:
                if rtt > 0:
                    # The client's first bytes wait for the handshake a real link costs.
                    await asyncio.gather(
                        self._delayed_pump(conn, reader, up_writer, "up", rtt, accepted + rtt),
                        self._delayed_pump(conn, up_reader, writer, "down", rtt, 0.0),
                    )
                else:
                    await asyncio.gather(
                        self._pump(conn, reader, up_writer, "up"),
                        self._pump(conn, up_reader, writer, "down"),
                    )
            finally:
                idle.cancel()
                self._conns.pop(cid, None)
                for w in (writer, up_writer):
                    if not w.transport.is_closing():
                        w.close()
        except asyncio.CancelledError:
            conn.reset()
            raise
        finally:
            self._tasks.discard(task)

    async def _pump(
        self,
        conn: _Conn,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: Literal["up", "down"],
    ) -> None:
        other = conn.server if direction == "down" else conn.client
        try:
            while not conn.dead:
                data = await src.read(_CHUNK)
                if not data:
                    if direction not in conn.shut and not dst.transport.is_closing():
                        with contextlib.suppress(OSError):
                            dst.write_eof()
                    return
                await self._forward(conn, data, dst, direction)
        except (ConnectionError, OSError):
            # One side went away abruptly: so does the other (as a real middlebox would).
            conn.reset()
        finally:
            if conn.dead and other is not None:
                _rst(other)

    async def _delayed_pump(
        self,
        conn: _Conn,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: Literal["up", "down"],
        rtt: float,
        not_before: float,
    ) -> None:
        """``_pump`` through a delay line: each chunk leaves ``rtt / 2`` after it came in."""
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        held = 0
        room = asyncio.Event()
        room.set()
        other = conn.server if direction == "down" else conn.client

        async def deliver() -> None:
            nonlocal held
            while True:
                due, data = await line.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if direction not in conn.shut and not dst.transport.is_closing():
                        with contextlib.suppress(OSError):
                            dst.write_eof()
                    return
                try:
                    await self._forward(conn, data, dst, direction)
                except (ConnectionError, OSError):
                    conn.reset()
                    return
                held -= len(data)
                if held <= _DELAY_BUFFER:
                    room.set()
                if conn.dead:
                    return

        sender = asyncio.create_task(deliver())
        try:
            while not conn.dead:
                data = await src.read(_CHUNK)
                line.put_nowait((max(time.monotonic(), not_before) + rtt / 2, data))
                if not data:
                    break
                held += len(data)
                if held > _DELAY_BUFFER:
                    room.clear()
                    await room.wait()
            await sender
        except (ConnectionError, OSError):
            conn.reset()
        finally:
            sender.cancel()
            if conn.dead and other is not None:
                _rst(other)

    async def _forward(
        self, conn: _Conn, data: bytes, dst: asyncio.StreamWriter, direction: str
    ) -> None:
        while data and not conn.dead:
            fault = conn.fault
            counts = fault.on in ("any", direction)
            cut = len(data)
            fire = redraw = False
            if not conn.fired and fault.kind != "pass" and counts:
                left = max(fault.after - conn.counted, 0)
                if left <= cut:
                    cut, fire = left, True
            window = conn.chaos.window if conn.chaos is not None else None
            if window is not None and window - conn.in_window <= cut:
                cut, fire, redraw = max(window - conn.in_window, 0), False, True
            head, data = data[:cut], data[cut:]
            if counts:
                conn.counted += len(head)
            conn.in_window += len(head)
            if head:
                await self._send(conn, head, dst, direction)
            if fire:
                conn.fired = True
                self._fire(conn, fault)
            elif redraw:
                self._redraw(conn)

    def _fire(self, conn: _Conn, fault: Fault) -> None:
        if fault.kind == "reset":
            self._fired(conn, "reset")
            conn.reset()
        elif fault.kind == "stall":
            self._fired(conn, "stall", f"{fault.seconds}s" if fault.seconds else "forever")
            if fault.seconds is None:
                conn.stall_forever = True
            else:
                conn.stalled_until = time.monotonic() + fault.seconds
            conn._release_seen = self._release_gen
        elif fault.kind == "throttle":
            self._fired(conn, "throttle", f"{fault.rate:.0f} B/s")
            conn.rate = fault.rate
        elif fault.kind == "half_close":
            self._fired(conn, "half_close", f"FIN to the {fault.target}")
            writer = conn.client if fault.target == "client" else conn.server
            conn.shut.add("down" if fault.target == "client" else "up")
            if writer is not None and not writer.transport.is_closing():
                with contextlib.suppress(OSError):
                    writer.write_eof()

    async def _idle_watch(self, conn: _Conn) -> None:
        """Close connections idle for ``idle_timeout`` s, as load balancers and NATs do."""
        while not conn.dead:
            await asyncio.sleep(0.05)
            limit = self.idle_timeout
            if limit is None or self._frozen or conn.stalled():
                continue
            if time.monotonic() - conn.last_active >= limit:
                with self._lock:
                    self._counts["idle_closes"] += 1
                for w in (conn.client, conn.server):
                    if w is not None and not w.transport.is_closing():
                        w.close()  # a FIN, not an RST: an orderly close
                return

    async def _wait_flowing(self, conn: _Conn) -> None:
        """Wait out a freeze or a stall; reset the connection if the client hangs up meanwhile."""
        waited = False
        while not conn.dead and (self._frozen or conn.stalled()):
            waited = True
            await asyncio.sleep(0.05)
            if conn.client is not None and _hung_up(conn.client):
                conn.reset()
        if waited and conn.client is not None and not conn.dead and _hung_up(conn.client):
            conn.reset()

    async def _send(
        self, conn: _Conn, data: bytes, dst: asyncio.StreamWriter, direction: str
    ) -> None:
        view = memoryview(data)
        while view and not conn.dead:
            await self._wait_flowing(conn)
            if conn.dead:
                return
            if direction in conn.shut:
                return  # shut down that way: discard
            # Throttled: 1/20 s worth at a time, then a pause; else all at once.
            piece = view[: max(1024, int(conn.rate / 20))] if conn.rate > 0 else view
            with self._lock:
                self._counts["bytes_up" if direction == "up" else "bytes_down"] += len(piece)
            dst.write(piece)
            conn.last_active = time.monotonic()
            await dst.drain()
            view = view[len(piece) :]
            if conn.rate > 0:
                await asyncio.sleep(len(piece) / conn.rate)


@contextlib.contextmanager
def running_proxy(target_host: str, target_port: int, **kw: Any) -> Iterator[FaultProxy]:
    """A started ``FaultProxy`` for the block; stopped (every connection reset) afterwards."""
    proxy = FaultProxy(target_host, target_port, **kw)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def main(argv: list[str] | None = None) -> int:
    """Run a proxy as its own process (benchmarks pin it to a core and read its CPU time):
    ``python tests/support/faultproxy.py --target 127.0.0.1:8787 --rtt-ms 40 --port-file F``.
    Writes the port it listens on to ``--port-file`` and serves until SIGTERM or SIGINT."""
    import argparse
    import signal

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", default=None)
    ns = p.parse_args(argv)
    host, _, port = ns.target.rpartition(":")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with running_proxy(host, int(port), port=ns.port) as proxy:
        proxy.set_latency(ns.rtt_ms / 1000)
        if ns.port_file:
            with open(ns.port_file + ".tmp", "w") as fh:
                fh.write(str(proxy.port))
            os.replace(ns.port_file + ".tmp", ns.port_file)
        while not stop.wait(0.5):
            pass
    return 0


__all__ = ["KINDS", "Chaos", "Fault", "FaultEvent", "FaultProxy", "main", "running_proxy"]


if __name__ == "__main__":
    raise SystemExit(main())
