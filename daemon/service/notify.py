"""The systemd notify protocol, in-tree: one datagram per message to ``$NOTIFY_SOCKET``.

Why no library: the pure-Python ``sdnotify`` has had no release since 2017, and
``systemd-python``/``cysystemd`` bind libsystemd in C (a compiler and headers, or wheels a field
PC's distribution may not match) — all for one ``sendto`` per message.

``READY=1``, ``STATUS=…``, ``WATCHDOG=1``, ``STOPPING=1`` and ``EXTEND_TIMEOUT_USEC=…`` are
newline-separated ``KEY=VALUE`` lines sent over an ``AF_UNIX`` datagram socket. A socket path
that starts with ``@`` names an abstract socket (a leading NUL byte). Without
``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op, so the daemon runs the same
everywhere.
"""

from __future__ import annotations

import os
import socket

import structlog

_log = structlog.get_logger(__name__)


class Notifier:
    """Sends notify messages; silent when not started by systemd with ``Type=notify``."""

    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if addr.startswith("@"):
            self._address = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self._address = addr
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one message, e.g. ``send(READY=1, STATUS="ready")``; True when delivered."""
        if self._address is None:
            return False
        text = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), self._address)
        except OSError as exc:
            # A missing manager must never take the daemon down; say it once.
            if not self._warned:
                _log.warning("notify.failed", error=f"{type(exc).__name__}: {exc.strerror}")
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        """``READY=1`` with a first status line."""
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """``STATUS=`` — the one line ``systemctl status`` shows."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the daemon is alive (send only after checking that it is)."""
        return self.send(WATCHDOG=1)

    def stopping(self, extend_seconds: float | None = None) -> bool:
        """``STOPPING=1``, optionally asking for more time to stop gracefully."""
        if extend_seconds is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, EXTEND_TIMEOUT_USEC=int(extend_seconds * 1_000_000))

    def close(self) -> None:
        """Close the socket (sending again reopens it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for this process, or None when there is none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None


def _one_line(value: str | int) -> str:
    return " ".join(str(value).split())
