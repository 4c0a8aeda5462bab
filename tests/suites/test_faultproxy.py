"""The fault proxy itself: every mode does what the suites rely on (fast, no daemon)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.faultproxy import Chaos, Fault, FaultProxy, running_proxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _EchoServer = self.server  # type: ignore[assignment]
        total = 0
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    break
                total += len(data)
                self.request.sendall(data)
        except OSError:
            server.resets += 1
        finally:
            server.received.append(total)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.received: list[int] = []
        self.resets = 0


@pytest.fixture
def echo() -> Iterator[_EchoServer]:
    server = _EchoServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: _EchoServer) -> Iterator[FaultProxy]:
    with running_proxy(*echo.server_address[:2]) as p:  # type: ignore[misc]
        yield p


def _connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf)


def _recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return bytes(buf)
        buf += data


def _read_until_error(sock: socket.socket) -> tuple[bytes, OSError | None]:
    """Everything received until EOF (error None) or until the socket fails (the error)."""
    buf = bytearray()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return bytes(buf), None
            buf += data
    except OSError as exc:
        return bytes(buf), exc


def _assert_refused(proxy: FaultProxy) -> None:
    """The connection is reset before anything comes back (connect itself may see the RST)."""
    try:
        with _connect(proxy) as s:
            s.sendall(b"a")
            time.sleep(0.05)
            s.sendall(b"b")
            got, err = _read_until_error(s)
    except (ConnectionResetError, BrokenPipeError):
        return
    assert got == b""
    assert isinstance(err, ConnectionResetError), err


def test_pass_forwards_both_ways_and_counts(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 4000  # ~1 MB
    with _connect(proxy) as s:
        s.sendall(payload)
        assert _recv_exactly(s, len(payload)) == payload
    st = proxy.stats()
    assert st["connections"] == 1 and st["faults_total"] == 0
    assert st["bytes_up"] == st["bytes_down"] == len(payload)


def test_reset_after_n_bytes_sends_an_rst(proxy: FaultProxy, echo: _EchoServer) -> None:
    proxy.fail_next(Fault.reset(after=1000, on="up"))
    with _connect(proxy) as s:
        s.sendall(b"x" * 5000)
        got, err = _read_until_error(s)
    assert isinstance(err, ConnectionResetError), err
    assert len(got) <= 1000
    deadline = time.monotonic() + 2
    while not echo.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert echo.received and echo.received[0] <= 1000
    assert proxy.stats()["faults"] == {"reset": 1}


def test_stall_delays_then_delivers(proxy: FaultProxy) -> None:
    proxy.fail_next(Fault.stall(0.6, after=10, on="up"))
    with _connect(proxy) as s:
        started = time.monotonic()
        s.sendall(b"y" * 100)
        assert _recv_exactly(s, 100) == b"y" * 100
        assert time.monotonic() - started >= 0.55


def test_stall_forever_times_the_client_out_and_hangup_resets_upstream(
    proxy: FaultProxy, echo: _EchoServer
) -> None:
    proxy.fail_next(Fault.stall(None, after=0))
    with _connect(proxy, timeout=0.4) as s:
        s.sendall(b"lost in the network")
        with pytest.raises(TimeoutError):
            s.recv(10)
    # The client gave up: the bytes it sent must not surface later at the server.
    deadline = time.monotonic() + 3
    while not echo.received and time.monotonic() < deadline:
        time.sleep(0.02)
    assert echo.received == [0]
    assert proxy.stats()["active"] == 0


def test_throttle_limits_the_rate(proxy: FaultProxy) -> None:
    proxy.fail_next(Fault.throttle(400_000))
    payload = b"z" * 200_000
    with _connect(proxy) as s:
        started = time.monotonic()
        s.sendall(payload)
        assert _recv_exactly(s, len(payload)) == payload
        took = time.monotonic() - started
    assert took >= 0.45, took  # 200 kB at 400 kB/s (each way, pipelined)


def test_half_close_to_client_ends_its_stream_early(proxy: FaultProxy) -> None:
    proxy.fail_next(Fault.half_close(after=3000, target="client", on="down"))
    with _connect(proxy) as s:
        s.sendall(b"q" * 10000)
        got = _recv_all(s)  # EOF, not a reset, not a hang
    assert len(got) == 3000


def test_half_close_to_server_ends_the_request_early(proxy: FaultProxy, echo: _EchoServer) -> None:
    proxy.fail_next(Fault.half_close(after=2000, target="server", on="up"))
    with _connect(proxy) as s:
        s.sendall(b"r" * 8000)
        got = _recv_all(s)  # the server saw EOF after 2000 bytes, answered them and closed
    assert len(got) == 2000
    assert echo.received == [2000]


def test_refuse_one_connection_then_stop_and_resume_listening(proxy: FaultProxy) -> None:
    proxy.fail_next(Fault.refuse())
    _assert_refused(proxy)
    port = proxy.port
    proxy.refuse_connections()
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    proxy.accept_connections()
    assert proxy.port == port
    with _connect(proxy) as s:
        s.sendall(b"back")
        assert _recv_exactly(s, 4) == b"back"


def test_reset_all_and_freeze(proxy: FaultProxy, echo: _EchoServer) -> None:
    with _connect(proxy) as s:
        s.sendall(b"1")
        assert _recv_exactly(s, 1) == b"1"
        assert proxy.reset_all() == 1
        with pytest.raises(ConnectionResetError):
            s.recv(1)
    with _connect(proxy, timeout=0.3) as s:
        proxy.freeze()
        s.sendall(b"frozen")
        with pytest.raises(TimeoutError):
            s.recv(6)
        s.settimeout(3)
        proxy.thaw()
        assert _recv_exactly(s, 6) == b"frozen"


def test_chaos_is_seeded_and_counted(echo: _EchoServer) -> None:
    weights = {"reset": 0.3, "refuse": 0.2, "throttle": 0.2}
    a = Chaos(weights, seed=5)
    b = Chaos(weights, seed=5)
    assert [a.pick() for _ in range(50)] == [b.pick() for _ in range(50)]
    with running_proxy(*echo.server_address[:2]) as proxy:  # type: ignore[misc]
        proxy.set_chaos(Chaos({"refuse": 1.0}, seed=1))
        for _ in range(3):
            _assert_refused(proxy)
        assert proxy.stats()["faults"] == {"refuse": 3}
        proxy.clear()
        with _connect(proxy) as s:
            s.sendall(b"ok")
            assert _recv_exactly(s, 2) == b"ok"


def test_chaos_window_redraws_on_long_connections(echo: _EchoServer) -> None:
    with running_proxy(*echo.server_address[:2]) as proxy:  # type: ignore[misc]
        proxy.set_chaos(
            Chaos(
                {"throttle": 1.0},
                seed=3,
                max_after=1000,
                small_after=10,
                window=64 * 1024,
                throttle_rate=(50e6, 60e6),
            )
        )
        payload = b"w" * 1_000_000
        with _connect(proxy) as s:
            s.sendall(payload)
            assert _recv_exactly(s, len(payload)) == payload
        st = proxy.stats()
    assert st["connections"] == 1
    assert st["redraws"] >= 20  # 2 MB through, a draw every 64 KiB
    assert st["faults"]["throttle"] >= 20


def test_idle_timeout_closes_quiet_connections_with_a_fin(proxy: FaultProxy) -> None:
    proxy.idle_timeout = 0.3
    with _connect(proxy) as s:
        s.sendall(b"hi")
        assert _recv_exactly(s, 2) == b"hi"
        started = time.monotonic()
        got, err = _read_until_error(s)
    assert (got, err) == (b"", None)  # EOF: an orderly close
    assert 0.25 <= time.monotonic() - started < 2
    assert proxy.stats()["idle_closes"] == 1


def test_latency_costs_one_rtt_per_round_trip_and_one_for_the_handshake(
    proxy: FaultProxy,
) -> None:
    rtt = 0.1
    proxy.set_latency(rtt)
    started = time.monotonic()
    with _connect(proxy) as sock:
        sock.sendall(b"ping")
        assert _recv_exactly(sock, 4) == b"ping"
        first = time.monotonic() - started
        # Later round trips on the same connection cost one RTT each, no handshake.
        t0 = time.monotonic()
        for _ in range(3):
            sock.sendall(b"pong")
            assert _recv_exactly(sock, 4) == b"pong"
        later = (time.monotonic() - t0) / 3
    assert first >= 2 * rtt * 0.95, first
    assert rtt * 0.95 <= later < 2 * rtt, later


def test_latency_is_a_delay_line_not_a_bandwidth_cap(proxy: FaultProxy) -> None:
    rtt = 0.1
    proxy.set_latency(rtt)
    payload = bytes(range(256)) * 4096  # 1 MiB, many reads: each must not cost an RTT
    with _connect(proxy, timeout=10) as sock:
        t0 = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = _recv_exactly(sock, len(payload))
        sender.join()
        took = time.monotonic() - t0
    assert echoed == payload  # in order, whole
    assert took < 10 * rtt, took  # 16+ chunks of 64 KiB: a per-chunk RTT would be >= 1.6 s
