"""Prometheus metrics, and the optional loopback HTTP endpoint that serves them.

Enabled by ``[metrics] listen = "127.0.0.1:9464"``. The endpoint answers two paths:

``GET /metrics``
    200, the metrics below as ``prometheus_client`` exposes them: the text format 0.0.4
    (``text/plain; version=0.0.4; charset=utf-8``) unless the scraper asks for OpenMetrics;
    gzip when the scraper accepts it; ``?name[]=`` selects metrics. The queue gauges are read
    from the state database on the daemon's event loop just before each exposition, so they
    are current without a background loop, and one scrape sees one reading of the queue.
``GET /healthz``
    200 ``ok`` when the daemon is alive and the API reachable, 503 with the reason otherwise.

The metric names are an interface (dashboards and alerts are built on them); rename one only
with a note in the changelog::

    name                                          type       labels   meaning
    inboxd_files_uploaded_total                   counter             uploads completed
    inboxd_bytes_uploaded_total                   counter             bytes of those files
    inboxd_retries_total                          counter    reason   tries sent back to the queue
    inboxd_failures_total                         counter    reason   jobs that ended FAILED
    inboxd_queue_jobs                             gauge      state    jobs per queue state
    inboxd_oldest_queued_age_seconds              gauge               age of oldest QUEUED job
    inboxd_upload_duration_seconds                histogram           upload time per file
    inboxd_imports_total                          counter    outcome  "finished" or "failed"
    inboxd_last_upload_success_timestamp_seconds  gauge               Unix time; 0 = never
    inboxd_paused                                 gauge               1 = paused (token refused)
    inboxd_upload_window_open                     gauge               1 = inside upload window
    inboxd_inbox_free_bytes                       gauge               free bytes on inbox disk
    inboxd_disk_low                               gauge               1 = under warning threshold
    inboxd_up                                     gauge               always 1
    inboxd_build_info                             gauge      version  always 1

``reason`` is an error ``kind`` (``network``, ``server``, ``rate_limited``, ``storage``,
``url_expired``, ...); a value that does not look like one, and every new one past the first
64, is counted as ``other`` so the number of series stays bounded. ``state`` is every state
:meth:`daemon.state.Queue.counts` reports (``settling``, ``queued``, ``uploading``,
``importing``, ``done``, ``failed``, ``superseded``).
Counters start at 0 with each daemon process, as Prometheus expects (``rate()`` handles resets).

The registry and the exposition are ``prometheus_client``'s, with a private registry per
:class:`Metrics` (several daemons may run in one test process). The endpoint is its WSGI app
behind the standard library's threaded WSGI server, in threads of its own: a slow or hostile
client costs a thread, never the event loop.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Protocol
from wsgiref.simple_server import WSGIRequestHandler

import anyio
import anyio.abc
import anyio.to_thread
import structlog
from anyio.from_thread import BlockingPortal
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from daemon import __version__
from daemon.errors import ConfigError
from daemon.net.addresses import parse_listen

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["UPLOAD_DURATION_BUCKETS", "HealthCheck", "Metrics", "MetricsServer", "QueueStats"]

_log = structlog.get_logger(__name__)

# Without this every counter and histogram gets a second series, ``<name>_created``: the
# metric names are an interface, and Prometheus handles counter resets without it. The switch
# is process-wide; the daemon is the only user of prometheus_client in its process.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Buckets of ``inboxd_upload_duration_seconds``: a small file over loopback takes ~50 ms, a
#: multi-gigabyte file over a slow link hours; a factor of 2 to 3 per step keeps the quantile
#: error bounded across that whole range with 19 buckets.
# fmt: off
UPLOAD_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,  # to 10 min
    1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 21600.0,  # to 6 h
)
# fmt: on


class QueueStats(Protocol):
    """What :meth:`Metrics.refresh` reads; :class:`daemon.state.Queue` provides it."""

    async def counts(self) -> dict[str, int]:
        """Jobs per state."""
        ...

    async def oldest_queued_at(self) -> float | None:
        """When the oldest QUEUED job was enqueued, or None."""
        ...


class _QueueCollector(Collector):
    """The queue gauges, from the last reading of the queue (one tuple, replaced whole, so a
    scrape never mixes two readings)."""

    def __init__(self) -> None:
        self.reading: tuple[dict[str, int], float] = ({}, 0.0)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts, oldest_age = self.reading
        jobs = GaugeMetricFamily(
            "inboxd_queue_jobs", "Jobs in the queue per state.", labels=["state"]
        )
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily(
            "inboxd_oldest_queued_age_seconds",
            "Seconds since the oldest job still queued was enqueued (0 when none is queued).",
            value=oldest_age,
        )


# A reason label is an error kind ("rate_limited"). Anything else (a message, a path passed by
# mistake) becomes "other", and so does every new kind past the cap: a label value is a time
# series in Prometheus, so their number must stay bounded whatever the callers do.
_REASON: Final = re.compile(r"[a-z][a-z0-9_]{0,47}\Z")
_MAX_REASONS: Final = 64
_OTHER_REASON: Final = "other"


class Metrics:
    """The daemon's metrics: created once at start-up and handed to the parts that count.

    Attributes are the metric objects (see the module docstring for their names), all in
    :attr:`registry`; the methods are what the workers, the poller and the service call.
    """

    def __init__(
        self, *, version: str = __version__, clock: Callable[[], float] = time.time
    ) -> None:
        """``clock`` gives Unix time (the oldest-queued age and the last-success timestamp)."""
        self._clock = clock
        self._reasons: set[str] = set()
        r = self.registry = CollectorRegistry(auto_describe=True)
        counter, gauge = partial(Counter, registry=r), partial(Gauge, registry=r)
        self.files_uploaded = counter(
            "inboxd_files_uploaded_total", "Files whose upload completed."
        )
        self.bytes_uploaded = counter(
            "inboxd_bytes_uploaded_total", "Bytes of the files whose upload completed."
        )
        self.retries = counter(
            "inboxd_retries_total",
            "Upload tries that ended in trouble and were put back in the queue, by error kind.",
            ["reason"],
        )
        self.failures = counter(
            "inboxd_failures_total", "Jobs that ended failed, by error kind.", ["reason"]
        )
        self._queue = _QueueCollector()
        r.register(self._queue)
        self.upload_duration = Histogram(
            "inboxd_upload_duration_seconds",
            "Time from the start of a file's upload try to its completion.",
            buckets=UPLOAD_DURATION_BUCKETS,
            registry=r,
        )
        self.imports = counter(
            "inboxd_imports_total", "Imports that ended, by outcome (finished|failed).", ["outcome"]
        )
        self.last_upload_success = gauge(
            "inboxd_last_upload_success_timestamp_seconds",
            "Unix time of the last completed upload (0 = none since start).",
        )
        self.paused = gauge(
            "inboxd_paused", "1 while uploads are paused because the API refused the token."
        )
        self.upload_window_open = gauge(
            "inboxd_upload_window_open", "1 while uploads are allowed by the upload window."
        )
        self.inbox_free_bytes = gauge(
            "inboxd_inbox_free_bytes", "Free bytes on the inbox filesystem (0 until checked)."
        )
        self.disk_low = gauge(
            "inboxd_disk_low", "1 while the inbox free space is under the warning threshold."
        )
        self.up = gauge("inboxd_up", "Always 1 while the daemon runs.")
        self.build_info = gauge(
            "inboxd_build_info", "Always 1; the version label says which inboxd.", ["version"]
        )

        # Known label values start at 0, so that rate() and absent() work before the first
        # event instead of the series appearing out of nothing.
        for outcome in ("finished", "failed"):
            self.imports.labels(outcome=outcome)
        # No window configured means always open.
        self.upload_window_open.set(1)
        self.up.set(1)
        self.build_info.labels(version=version).set(1)

    # -- what the daemon's parts call --------------------------------------------------------

    def upload_succeeded(self, size: int, seconds: float) -> None:
        """A file of ``size`` bytes finished uploading after ``seconds``."""
        self.files_uploaded.inc()
        self.bytes_uploaded.inc(max(size, 0))
        self.upload_duration.observe(max(seconds, 0.0))
        self.last_upload_success.set(self._clock())

    def retried(self, reason: str) -> None:
        """A try ended in trouble of kind ``reason`` and the job went back to the queue."""
        self.retries.labels(reason=self._reason(reason)).inc()

    def failed(self, reason: str) -> None:
        """A job ended FAILED because of trouble of kind ``reason``."""
        self.failures.labels(reason=self._reason(reason)).inc()

    def import_finished(self, ok: bool) -> None:
        """An import reached a terminal status: finished (``ok``) or failed."""
        self.imports.labels(outcome="finished" if ok else "failed").inc()

    def set_paused(self, paused: bool) -> None:
        """Uploads are (or are no longer) paused by a refused token."""
        self.paused.set(1 if paused else 0)

    def set_upload_window_open(self, is_open: bool) -> None:
        """The upload window opened or closed."""
        self.upload_window_open.set(1 if is_open else 0)

    def set_disk(self, free_bytes: int, *, low: bool) -> None:
        """The inbox filesystem has ``free_bytes`` free; ``low`` = under the warning threshold."""
        self.inbox_free_bytes.set(max(free_bytes, 0))
        self.disk_low.set(1 if low else 0)

    def _reason(self, reason: str) -> str:
        if not _REASON.match(reason):
            return _OTHER_REASON
        if reason not in self._reasons:
            if len(self._reasons) >= _MAX_REASONS:
                return _OTHER_REASON
            self._reasons.add(reason)
        return reason

    # -- scrape time -------------------------------------------------------------------------

    async def refresh(self, queue: QueueStats) -> None:
        """Read the queue gauges from ``queue`` (before each exposition)."""
        counts = await queue.counts()
        oldest = await queue.oldest_queued_at()
        age = 0.0 if oldest is None else max(0.0, self._clock() - oldest)
        self._queue.reading = (dict(counts), age)


# ---------------------------------------------------------------------------------------------
# The HTTP endpoint

HealthCheck = Callable[[], Awaitable[tuple[bool, str]]]

_PATHS: Final = ("/metrics", "/healthz")
#: how often the accepting thread looks up from waiting (stop requests, overdue clients)
_POLL_SECONDS: Final = 0.1
#: most bytes of a request body read (and thrown away) before answering
_MAX_DISCARDED: Final = 64 * 1024


class _Handler(WSGIRequestHandler):
    """One connection, one request (HTTP/1.0 answers, then close), said nowhere."""

    server_version = "inboxd"
    sys_version = ""

    def setup(self) -> None:
        assert isinstance(self.server, _Server)
        # Bounds each read and write on the socket; the server bounds the head as a whole.
        self.request.settimeout(self.server.io_timeout)
        super().setup()

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        assert isinstance(self.server, _Server)
        self.server.head_read(self.connection)
        return parsed

    def log_message(self, format: str, *args: object) -> None:
        # One line per request on stderr is noise in the journal; what a client sent is not
        # the daemon's to log.
        pass


class _Server(ThreadingWSGIServer):
    """prometheus_client's thread-per-connection WSGI server, bounded: at most
    ``max_connections`` served at once (more wait in the kernel's backlog), and a client that
    has not sent its request head within ``read_timeout`` seconds is cut off."""

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        *,
        read_timeout: float,
        io_timeout: float,
        max_connections: int,
    ) -> None:
        self.address_family = family
        self.io_timeout = io_timeout
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._open: dict[socket.socket, float] = {}  # connection -> deadline for its head
        self._changed = threading.Condition()
        self._stopping = False
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer would ask the resolver for the address's name (socket.getfqdn): on an
        # offline PC whose DNS is unreachable that can stall the start; the name is unused.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()

    # A TCP server's request is its connected socket (typeshed allows a UDP one too).
    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._changed:
            while len(self._open) >= self._max_connections and not self._stopping:
                self._cut_overdue()
                self._changed.wait(_POLL_SECONDS)
            if self._stopping:
                self.shutdown_request(request)
                return
            self._open[request] = time.monotonic() + self._read_timeout
        super().process_request(request, client_address)

    def head_read(self, connection: socket.socket) -> None:
        """The request head has arrived: the rest is bounded by the endpoint's own timeouts."""
        with self._changed:
            if connection in self._open:
                self._open[connection] = float("inf")

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        # Forgotten under the lock before it is closed: _cut_overdue never touches a socket
        # whose descriptor may already belong to something else.
        with self._changed:
            self._open.pop(request, None)
            self._changed.notify_all()
        super().shutdown_request(request)

    def service_actions(self) -> None:
        with self._changed:
            self._cut_overdue()

    def _cut_overdue(self, *, everyone: bool = False) -> None:
        now = time.monotonic()
        for connection, deadline in self._open.items():
            if everyone or deadline <= now:
                # The handler's blocked read returns at once: it sees the end of the stream.
                with contextlib.suppress(OSError):  # already gone
                    connection.shutdown(socket.SHUT_RDWR)
                self._open[connection] = float("inf")

    def handle_error(self, request: object, client_address: object) -> None:
        # A timed-out, reset or cut-off client: its trouble alone, not a traceback on stderr.
        _log.debug("metrics.connection_error", error=repr(sys.exc_info()[1]))

    def stop(self) -> None:
        """Stop accepting, cut every open connection off, close the listener (blocking)."""
        with self._changed:
            self._stopping = True
            self._cut_overdue(everyone=True)
            self._changed.notify_all()
        self.shutdown()  # returns once serve_forever() has
        self.server_close()


def _bind_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    if not host:  # every interface (only with allow_remote): both IPv4 and IPv6 where possible
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, ("::", port)
        return socket.AF_INET, ("0.0.0.0", port)
    # "localhost" may name 127.0.0.1 and ::1; one socket serves one of them: IPv4 first, which
    # every client tries.
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, address = min(infos, key=lambda info: info[0] != socket.AF_INET)
    return family, (str(address[0]), port)


def _discard_body(environ: WSGIEnvironment) -> None:
    # Read (a bounded amount of) what came with the request: closing a socket with unread data
    # resets the connection, which can destroy the answer before the client has read it.
    length = str(environ.get("CONTENT_LENGTH") or "0")
    if length.isdigit():
        environ["wsgi.input"].read(min(int(length), _MAX_DISCARDED))


def _text(
    start_response: StartResponse, status: int, text: str, *headers: tuple[str, str]
) -> list[bytes]:
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store"), *headers],
    )
    return [(text if text.endswith("\n") else text + "\n").encode("utf-8", "replace")]


class MetricsServer:
    """The HTTP endpoint: ``/metrics`` and ``/healthz`` on a loopback address.

    GET only; one request per connection. The server runs in threads (one accepting, one per
    connection, at most ``max_connections``); a client must send its request head within
    ``read_timeout`` seconds and each read or write on its socket may take ``write_timeout``.
    The queue reading and the health check run on the daemon's event loop, bounded by
    ``refresh_timeout`` and ``health_timeout``.
    """

    def __init__(
        self,
        listen: str,
        metrics: Metrics,
        *,
        queue: QueueStats,
        health: HealthCheck,
        allow_remote: bool = False,
        read_timeout: float = 5.0,
        write_timeout: float = 10.0,
        refresh_timeout: float = 5.0,
        health_timeout: float = 10.0,
        max_connections: int = 32,
    ) -> None:
        """Check ``listen`` (see :func:`daemon.net.addresses.parse_listen`; raises
        :class:`ValueError`); no I/O yet."""
        self.listen = listen
        self.host, self.port = parse_listen(listen, allow_remote=allow_remote)
        self.metrics = metrics
        self.queue = queue
        self.health = health
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.refresh_timeout = refresh_timeout
        self.health_timeout = health_timeout
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        #: the accepting thread while :meth:`run` runs (tests check that it ends)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the endpoint (the bound port once :meth:`run` started)."""
        host = self.host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``task_status.started()`` once listening (``port`` is set).

        Raises :class:`~daemon.errors.ConfigError` before starting if the address cannot be
        bound (a port in use is a setting to change, not a reason to restart: exit 78, which
        the unit does not restart on). Cancelling stops the server's threads, closes the
        listener and cuts every connection off.
        """
        server = await anyio.to_thread.run_sync(self._bind)
        self.port = server.server_address[1]
        try:
            async with BlockingPortal() as portal:
                server.set_app(self._app(portal))
                self.thread = threading.Thread(
                    target=server.serve_forever,
                    args=(_POLL_SECONDS,),
                    name="inboxd-metrics",
                    daemon=True,
                )
                self.thread.start()
                _log.info("metrics.listening", url=self.url)
                try:
                    task_status.started()
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(server.stop)
                        # Requests still waiting for the loop answer 503 and end.
                        await portal.stop(cancel_remaining=True)
        finally:
            server.server_close()  # also when cancelled before serving began

    def _bind(self) -> _Server:
        try:
            family, address = _bind_address(self.host, self.port)
            return _Server(
                address,
                family,
                read_timeout=self.read_timeout,
                io_timeout=self.write_timeout,
                max_connections=self.max_connections,
            )
        except OSError as exc:
            why = "in use by another program" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(
                f"metrics.listen = {self.listen!r}: cannot listen for metrics on {self.listen}"
                f" ({why or exc}) — stop the program using that port (`ss -ltnp | grep"
                f" :{self.port}`), or set [metrics] listen to a free port"
            ) from None

    def _app(self, portal: BlockingPortal) -> WSGIApplication:
        exposition: WSGIApplication = make_wsgi_app(self.metrics.registry)

        def on_loop(func: Callable[[], Awaitable[tuple[bool, str]]]) -> tuple[bool, str]:
            try:
                return portal.call(func)
            except (RuntimeError, concurrent.futures.CancelledError):
                return False, "the daemon is stopping"

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
            try:
                return answer(environ, start_response)
            except Exception as exc:  # our bug: one 500, not a traceback on stderr
                _log.error("metrics.request_failed", error=repr(exc))
                return _text(start_response, 500, "internal error; see the daemon's log")

        def answer(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
            path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
            if path not in _PATHS:
                return _text(start_response, 404, "not found; the paths are /metrics and /healthz")
            if method != "GET":
                _discard_body(environ)
                return _text(
                    start_response, 405, f"method {method} not allowed; use GET", ("Allow", "GET")
                )
            if path == "/healthz":
                ok, reason = on_loop(self._health)
                return (
                    _text(start_response, 200, "ok") if ok else _text(start_response, 503, reason)
                )
            on_loop(self._refresh)
            return list(exposition(environ, start_response))

        return app

    async def _refresh(self) -> tuple[bool, str]:
        try:
            with anyio.fail_after(self.refresh_timeout):
                await self.metrics.refresh(self.queue)
        except Exception as exc:
            # A busy or broken database must not hide the other metrics: serve the queue
            # gauges as last read (the log says why they are stale).
            _log.warning("metrics.refresh_failed", error=str(exc) or type(exc).__name__)
            return False, str(exc)
        return True, ""

    async def _health(self) -> tuple[bool, str]:
        try:
            with anyio.fail_after(self.health_timeout):
                ok, reason = await self.health()
        except TimeoutError:
            return False, f"health check timed out after {self.health_timeout:g} s"
        except Exception as exc:
            return False, f"health check failed: {str(exc) or type(exc).__name__}"
        return ok, reason or ("ok" if ok else "unhealthy")
