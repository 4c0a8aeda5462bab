"""The systemd notify protocol against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.sandbox import Sandbox
from daemon.service.notify import Notifier, watchdog_interval
from tests.support.runner import REPO, write_config


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


def _messages(sock: socket.socket, until: str, timeout: float = 15.0) -> list[dict[str, str]]:
    """Receive datagrams until one holds the key ``until``."""
    got: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        got.append(fields)
        if until in fields:
            return got
    raise AssertionError(f"no {until} within {timeout} s; got {got}")


def test_send_to_a_path_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = Notifier(path)
    assert n.enabled
    assert n.ready("starting up")
    assert sock.recv(100) == b"READY=1\nSTATUS=starting up"
    assert n.stopping(extend_seconds=12.5)
    assert sock.recv(100) == b"STOPPING=1\nEXTEND_TIMEOUT_USEC=12500000"
    assert n.status("two\nlines")
    assert sock.recv(100) == b"STATUS=two lines"  # one line, always
    n.close()


def test_send_to_an_abstract_socket() -> None:
    name = f"inboxd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    n = Notifier("@" + name)
    try:
        assert n.watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        n.close()
        sock.close()


def test_without_systemd_everything_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready("x")
    broken = Notifier("/nonexistent/dir/notify.sock")  # a manager that went away
    assert broken.enabled
    assert not broken.watchdog()
    broken.close()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None


def test_daemon_ready_watchdog_status_stopping(
    sandbox: Sandbox, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    config = write_config(tmp_path, sandbox)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "600000"}
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "run", "--config", str(config), "--grace", "2"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        first = _messages(sock, "READY")
        ready = first[-1]
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("idle")
        # READY comes only after the state database exists and the watcher has scanned.
        assert (tmp_path / "state" / "state.db").exists()
        pings = [m for m in _messages(sock, "WATCHDOG") if "WATCHDOG" in m]
        start = time.monotonic()
        pings += [m for m in _messages(sock, "WATCHDOG") if "WATCHDOG" in m]
        assert time.monotonic() - start < 1.0  # every 0.3 s (half of WATCHDOG_USEC)
        (tmp_path / "inbox" / "x.csv").write_bytes(b"a,b\n1,2\n")
        statuses = [m["STATUS"] for m in _messages(sock, "STATUS", timeout=10) if "STATUS" in m]
        assert statuses
        proc.send_signal(signal.SIGTERM)
        stop = _messages(sock, "STOPPING")[-1]
        assert stop["STOPPING"] == "1"
        assert int(stop["EXTEND_TIMEOUT_USEC"]) == 12_000_000
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
