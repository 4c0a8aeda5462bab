"""Prometheus metrics, and the optional loopback HTTP endpoint that serves them.

Enabled by ``[metrics] listen = "127.0.0.1:9464"``. The endpoint answers two paths:

``GET /metrics``
    200, ``text/plain; version=0.0.4; charset=utf-8``: every metric below in the Prometheus
    text exposition format 0.0.4. The queue gauges are read from the state database at scrape
    time, so they are current without a background loop.
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
:meth:`daemon.queue.Queue.counts` reports (``settling``, ``queued``, ``uploading``,
``importing``, ``done``, ``failed``, ``superseded``).
Counters start at 0 with each daemon process, as Prometheus expects (``rate()`` handles resets).

The registry is a small in-process one (no dependency): :class:`Counter`, :class:`Gauge` and
:class:`Histogram` in a :class:`Registry` whose :meth:`Registry.render` writes the text format.
"""

from __future__ import annotations

import bisect
import email.utils
import errno
import http
import ipaddress
import itertools
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol, TypeVar

import anyio
import anyio.abc
import structlog

from daemon import __version__

__all__ = [
    "CONTENT_TYPE",
    "UPLOAD_DURATION_BUCKETS",
    "Counter",
    "Gauge",
    "HealthCheck",
    "Histogram",
    "Metrics",
    "MetricsServer",
    "QueueStats",
    "Registry",
    "format_value",
    "parse_listen",
]

_log = structlog.get_logger(__name__)

#: The Content-Type of ``/metrics`` (text exposition format 0.0.4).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Buckets of ``inboxd_upload_duration_seconds``: a small file over loopback takes ~50 ms, a
#: multi-gigabyte file over a slow link hours; a factor of 2 to 3 per step keeps the quantile
#: error bounded across that whole range with 19 buckets.
# fmt: off
UPLOAD_DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,  # to 10 min
    1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 21600.0,  # to 6 h
)
# fmt: on

# ---------------------------------------------------------------------------------------------
# Text format helpers

_METRIC_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Above this a float no longer holds every integer, so "%d" would print digits it does not have.
_EXACT_INT_LIMIT: Final = 2.0**53


def format_value(value: float) -> str:
    """``value`` as the text format writes it: ``+Inf``/``-Inf``/``NaN``, whole numbers without
    a fraction, anything else as the shortest string that round-trips (``0.05``, ``1e-07``).

    Every form is accepted by Prometheus (Go's ``strconv.ParseFloat``) and by Python's float().
    """
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < _EXACT_INT_LIMIT:
        return str(int(value))
    return repr(value)


def _utf8_safe(text: str) -> str:
    # Lone surrogates (how os.fsdecode spells undecodable bytes) cannot be encoded as UTF-8;
    # replace them rather than fail the whole scrape.
    return text.encode("utf-8", "replace").decode("utf-8")


def _escape_label_value(value: str) -> str:
    return _utf8_safe(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return _utf8_safe(text).replace("\\", "\\\\").replace("\n", "\\n")


def _format_labels(labels: Sequence[tuple[str, str]]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{_escape_label_value(value)}"' for name, value in labels)
    return "{" + inner + "}"


# ---------------------------------------------------------------------------------------------
# Registry

_Sample = tuple[str, tuple[tuple[str, str], ...], float]  # (name suffix, labels, value)


class _Metric:
    """Common part of the three metric types: name, help, label names, a lock."""

    kind: ClassVar[str]
    _reserved_labels: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        names = tuple(labelnames)
        for label in names:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: invalid label name {label!r}")
            if label in self._reserved_labels:
                raise ValueError(f"{name}: label name {label!r} is reserved for a {self.kind}")
        if len(set(names)) != len(names):
            raise ValueError(f"{name}: duplicate label names in {names}")
        self.name = name
        self.help = help
        self.labelnames = names
        # The event loop is single-threaded, but a worker thread (anyio.to_thread) may update a
        # metric too; a lock makes every update and every render consistent.
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, object]) -> tuple[str, ...]:
        if len(labels) != len(self.labelnames) or not all(n in labels for n in self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def _pairs(self, key: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        return tuple(zip(self.labelnames, key, strict=True))

    def samples(self) -> list[_Sample]:
        """The samples to render, in a stable order (sorted by label values)."""
        raise NotImplementedError


class _ValueMetric(_Metric):
    """A metric with one number per label set: the common part of Counter and Gauge."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        # An unlabelled metric is a single series that exists (as 0) from the start; labelled
        # series appear when first touched, since their label values are not known up front.
        self._values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def value(self, **labels: str) -> float:
        """The current value for ``labels`` (0 for a series never touched)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def samples(self) -> list[_Sample]:
        """One sample per label set."""
        with self._lock:
            items = sorted(self._values.items())
        return [("", self._pairs(key), value) for key, value in items]


class Counter(_ValueMetric):
    """A number that only goes up (per label set): things that happened, since start."""

    kind = "counter"

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        """Add ``amount`` (≥ 0) to the series for ``labels``."""
        amount = float(amount)
        if not amount >= 0:  # also refuses NaN
            raise ValueError(f"{self.name}: a counter cannot change by {amount!r}")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_ValueMetric):
    """A number that goes up and down (per label set): a current state."""

    kind = "gauge"

    def set(self, value: float, /, **labels: str) -> None:
        """Set the series for ``labels`` to ``value``."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        """Add ``amount`` to the series for ``labels``."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + float(amount)

    def dec(self, amount: float = 1.0, /, **labels: str) -> None:
        """Subtract ``amount`` from the series for ``labels``."""
        self.inc(-float(amount), **labels)


@dataclass
class _HistogramSeries:
    counts: list[int]  # per bucket, not cumulative; the last one is the +Inf bucket
    sum: float = 0.0
    count: int = 0


class Histogram(_Metric):
    """Observations counted into fixed buckets; renders ``_bucket{le=...}``, ``_sum``, ``_count``.

    ``buckets`` are the finite upper bounds (inclusive, strictly increasing); ``+Inf`` is
    always added.
    """

    kind = "histogram"
    _reserved_labels = frozenset({"le"})

    def __init__(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help, labelnames)
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] == math.inf:
            bounds.pop()
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one finite bucket")
        if any(not math.isfinite(b) for b in bounds) or any(
            a >= b for a, b in itertools.pairwise(bounds)
        ):
            raise ValueError(f"{name}: buckets must be finite and strictly increasing: {buckets}")
        self.buckets: tuple[float, ...] = tuple(bounds)
        self._series: dict[tuple[str, ...], _HistogramSeries] = {}
        if not self.labelnames:
            self._series[()] = self._new_series()

    def _new_series(self) -> _HistogramSeries:
        return _HistogramSeries(counts=[0] * (len(self.buckets) + 1))

    def observe(self, value: float, /, **labels: str) -> None:
        """Count one observation of ``value`` for ``labels``."""
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"{self.name}: cannot observe NaN")
        key = self._key(labels)
        # bisect_left: the first bound >= value, since "le" means less than or equal.
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = self._new_series()
            series.counts[index] += 1
            series.sum += value
            series.count += 1

    def count(self, **labels: str) -> int:
        """How many observations ``labels`` has had."""
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return 0 if series is None else series.count

    def sum(self, **labels: str) -> float:
        """The sum of the observations for ``labels``."""
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return 0.0 if series is None else series.sum

    def samples(self) -> list[_Sample]:
        """Cumulative buckets, then ``_sum`` and ``_count``, per label set."""
        with self._lock:
            items = sorted((key, list(s.counts), s.sum, s.count) for key, s in self._series.items())
        out: list[_Sample] = []
        for key, counts, total, count in items:
            pairs = self._pairs(key)
            cumulative = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += n
                out.append(("_bucket", (*pairs, ("le", format_value(bound))), float(cumulative)))
            out.append(("_sum", pairs, total))
            out.append(("_count", pairs, float(count)))
        return out


_M = TypeVar("_M", bound=_Metric)


class Registry:
    """An ordered set of metrics with unique names; :meth:`render` writes them all."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _M) -> _M:
        """Add ``metric``; its name must not be taken. Returns it, for chaining."""
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Create and register a :class:`Counter`."""
        return self.register(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Create and register a :class:`Gauge`."""
        return self.register(Gauge(name, help, labelnames))

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> Histogram:
        """Create and register a :class:`Histogram`."""
        return self.register(Histogram(name, help, buckets, labelnames))

    def __iter__(self) -> Iterator[_Metric]:
        return iter(list(self._metrics.values()))

    def render(self) -> str:
        """Every metric in the text exposition format 0.0.4 (HELP, TYPE, samples)."""
        lines: list[str] = []
        for metric in self:
            lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for suffix, labels, value in metric.samples():
                lines.append(f"{metric.name}{suffix}{_format_labels(labels)} {format_value(value)}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The daemon's metric set


class QueueStats(Protocol):
    """What :meth:`Metrics.refresh` reads; :class:`daemon.queue.Queue` provides it."""

    async def counts(self) -> dict[str, int]:
        """Jobs per state."""
        ...

    async def oldest_queued_at(self) -> float | None:
        """When the oldest QUEUED job was enqueued, or None."""
        ...


# A reason label is an error kind ("rate_limited"). Anything else (a message, a path passed by
# mistake) becomes "other", and so does every new kind past the cap: a label value is a time
# series in Prometheus, so their number must stay bounded whatever the callers do.
_REASON: Final = re.compile(r"[a-z][a-z0-9_]{0,47}\Z")
_MAX_REASONS: Final = 64
_OTHER_REASON: Final = "other"


class Metrics:
    """The daemon's metrics: created once at start-up and handed to the parts that count.

    Attributes are the metric objects (see the module docstring for their names); the
    convenience methods are what the workers, the poller and the service call.
    """

    def __init__(
        self, *, version: str = __version__, clock: Callable[[], float] = time.time
    ) -> None:
        """``clock`` gives Unix time (the oldest-queued age and the last-success timestamp)."""
        self._clock = clock
        self._reasons: set[str] = set()
        r = self.registry = Registry()
        self.files_uploaded = r.counter(
            "inboxd_files_uploaded_total", "Files whose upload completed."
        )
        self.bytes_uploaded = r.counter(
            "inboxd_bytes_uploaded_total", "Bytes of the files whose upload completed."
        )
        self.retries = r.counter(
            "inboxd_retries_total",
            "Upload tries that ended in trouble and were put back in the queue, by error kind.",
            ["reason"],
        )
        self.failures = r.counter(
            "inboxd_failures_total", "Jobs that ended failed, by error kind.", ["reason"]
        )
        self.queue_jobs = r.gauge("inboxd_queue_jobs", "Jobs in the queue per state.", ["state"])
        self.oldest_queued_age = r.gauge(
            "inboxd_oldest_queued_age_seconds",
            "Seconds since the oldest job still queued was enqueued (0 when none is queued).",
        )
        self.upload_duration = r.histogram(
            "inboxd_upload_duration_seconds",
            "Time from the start of a file's upload try to its completion.",
            UPLOAD_DURATION_BUCKETS,
        )
        self.imports = r.counter(
            "inboxd_imports_total", "Imports that ended, by outcome (finished|failed).", ["outcome"]
        )
        self.last_upload_success = r.gauge(
            "inboxd_last_upload_success_timestamp_seconds",
            "Unix time of the last completed upload (0 = none since start).",
        )
        self.paused = r.gauge(
            "inboxd_paused", "1 while uploads are paused because the API refused the token."
        )
        self.upload_window_open = r.gauge(
            "inboxd_upload_window_open", "1 while uploads are allowed by the upload window."
        )
        self.inbox_free_bytes = r.gauge(
            "inboxd_inbox_free_bytes", "Free bytes on the inbox filesystem (0 until checked)."
        )
        self.disk_low = r.gauge(
            "inboxd_disk_low", "1 while the inbox free space is under the warning threshold."
        )
        self.up = r.gauge("inboxd_up", "Always 1 while the daemon runs.")
        self.build_info = r.gauge(
            "inboxd_build_info", "Always 1; the version label says which inboxd.", ["version"]
        )

        # Known label values start at 0, so that rate() and absent() work before the first
        # event instead of the series appearing out of nothing.
        for outcome in ("finished", "failed"):
            self.imports.inc(0, outcome=outcome)
        # No window configured means always open.
        self.upload_window_open.set(1)
        self.up.set(1)
        self.build_info.set(1, version=version)

    # -- convenience methods ---------------------------------------------------------------------

    def upload_succeeded(self, size: int, seconds: float) -> None:
        """A file of ``size`` bytes finished uploading after ``seconds``."""
        self.files_uploaded.inc()
        self.bytes_uploaded.inc(max(size, 0))
        self.upload_duration.observe(max(seconds, 0.0))
        self.last_upload_success.set(self._clock())

    def retried(self, reason: str) -> None:
        """A try ended in trouble of kind ``reason`` and the job went back to the queue."""
        self.retries.inc(reason=self._reason(reason))

    def failed(self, reason: str) -> None:
        """A job ended FAILED because of trouble of kind ``reason``."""
        self.failures.inc(reason=self._reason(reason))

    def import_finished(self, ok: bool) -> None:
        """An import reached a terminal status: finished (``ok``) or failed."""
        self.imports.inc(outcome="finished" if ok else "failed")

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

    # -- scrape time ------------------------------------------------------------------------------

    async def refresh(self, queue: QueueStats) -> None:
        """Set the queue gauges from the queue (called at scrape time)."""
        counts = await queue.counts()
        oldest = await queue.oldest_queued_at()
        for state, n in counts.items():
            self.queue_jobs.set(n, state=state)
        age = 0.0 if oldest is None else max(0.0, self._clock() - oldest)
        self.oldest_queued_age.set(age)

    def render(self) -> str:
        """All metrics in the text exposition format (without refreshing first)."""
        return self.registry.render()


# ---------------------------------------------------------------------------------------------
# Listen address

_PORT: Final = re.compile(r"[0-9]{1,5}\Z")


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True  # RFC 6761: always the loopback interface, so safe without a DNS lookup
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name could resolve anywhere; never resolve it to decide
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def parse_listen(
    listen: str, *, allow_remote: bool = False, key: str = "metrics listen"
) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6addr]:port"``) into ``(host, port)``.

    The endpoint has no authentication, so unless ``allow_remote`` the host must be a loopback
    address (127.0.0.0/8, ``::1``) or ``localhost``. With ``allow_remote`` an empty host
    (``":9464"``) means every interface. Raises :class:`ValueError` with a message fit for a
    configuration error, starting with ``<key> = '<listen>':`` (the config passes its key).
    """
    text = listen.strip()
    where = f"{key} = {listen!r}"
    if text.startswith("["):
        close = text.find("]")
        if close == -1 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{where}: expected '[address]:port'")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{where}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{where}: expected 'host:port', e.g. 127.0.0.1:9464")
        if ":" in host:
            raise ValueError(f"{where}: write an IPv6 address in brackets, e.g. [::1]:9464")
    if not _PORT.match(port_text) or int(port_text) > 65535:
        raise ValueError(f"{where}: the port must be a number 0-65535")
    if not allow_remote and not _is_loopback(host):
        host_shown = repr(host) if host else "every interface"
        raise ValueError(
            f"{where}: {host_shown} is not a loopback address. The metrics"
            " endpoint has no authentication, so it listens only on 127.0.0.1, [::1] or"
            " localhost unless remote access is explicitly allowed"
        )
    return host, int(port_text)


# ---------------------------------------------------------------------------------------------
# HTTP server

HealthCheck = Callable[[], Awaitable[tuple[bool, str]]]

_MAX_HEAD: Final = 8 * 1024
_RECEIVE_CHUNK: Final = 4096
_LINGER_SECONDS: Final = 1.0
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSION: Final = re.compile(r"HTTP/([0-9])\.([0-9])\Z")
_PATHS: Final = ("/metrics", "/healthz")


class _HttpError(Exception):
    """Answer the request with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Request:
    method: str
    path: str


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> _Response:
        """A plain-text answer; the body always ends with a newline."""
        body = _utf8_safe(text if text.endswith("\n") else text + "\n").encode("utf-8")
        return cls(status, body, headers=headers)


def _head_end(buffer: bytes | bytearray, start: int) -> int | None:
    """Index just past the blank line that ends the head, or None if it has not arrived."""
    ends = []
    for marker in (b"\r\n\r\n", b"\n\n"):  # bare LF line ends are tolerated (RFC 9112 §2.2)
        found = buffer.find(marker, start)
        if found != -1:
            ends.append(found + len(marker))
    return min(ends) if ends else None


def _parse_head(head: bytes) -> _Request:
    # Empty lines before the request line are ignored, as RFC 9112 §2.2 asks of a server.
    lines = [line.removesuffix(b"\r") for line in head.lstrip(b"\r\n").split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise _HttpError(400, "empty request")
    try:
        request_line = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise _HttpError(400, "malformed request line") from None
    parts = request_line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise _HttpError(400, "malformed request line")
    method, target, version_text = parts
    if not _TOKEN.match(method.encode("ascii")):
        raise _HttpError(400, "malformed method")
    version = _VERSION.match(version_text)
    if version is None:
        raise _HttpError(400, "malformed HTTP version")
    if version.group(1) != "1":
        raise _HttpError(505, "only HTTP/1.x is supported")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        raise _HttpError(400, "malformed request target")

    hosts = 0
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise _HttpError(400, "obsolete header line folding")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise _HttpError(400, "malformed header line")
        if any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in value):
            raise _HttpError(400, "control character in a header value")
        if name.lower() == b"host":
            hosts += 1
    # RFC 9112 §3.2: a 1.1 request without exactly one Host, or with several, gets 400.
    if hosts > 1 or (version.group(2) != "0" and hosts != 1):
        raise _HttpError(400, "exactly one Host header is required")

    if target.startswith("/"):
        path = target.split("?", 1)[0]
    elif target.lower().startswith(("http://", "https://")):
        # absolute-form (RFC 9112 §3.2.2): a server must accept it.
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        path = "/" if slash == -1 else rest[slash:].split("?", 1)[0]
    else:
        raise _HttpError(400, "malformed request target")
    return _Request(method, path)


async def _read_head(stream: anyio.abc.ByteReceiveStream) -> bytes | None:
    """The request head (request line and headers); None if the client closed without one."""
    buffer = bytearray()
    while True:
        try:
            chunk = await stream.receive(_RECEIVE_CHUNK)
        except anyio.EndOfStream:
            if buffer.strip():
                raise _HttpError(400, "the request ended before its headers did") from None
            return None
        # Resume the search a few bytes back: the blank line may straddle two chunks.
        start = max(0, len(buffer) - 3)
        buffer += chunk
        end = _head_end(buffer, start)
        if end is not None and end <= _MAX_HEAD:
            return bytes(buffer[:end])
        if len(buffer) > _MAX_HEAD:
            raise _HttpError(431, f"the request line and headers exceed {_MAX_HEAD} bytes")


class MetricsServer:
    """The HTTP endpoint: ``/metrics`` and ``/healthz`` on a loopback address.

    A deliberately small HTTP/1.1 server: GET only, one request per connection
    (``Connection: close``), the head limited to 8 KiB and to ``read_timeout`` seconds, at most
    ``max_connections`` served at once. Whatever a client sends or fails to send, the worst
    outcome is an error answer or a closed connection for that client alone.
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
        """Check ``listen`` (see :func:`parse_listen`; raises :class:`ValueError`); no I/O yet."""
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
        the unit does not restart on). Cancelling closes the listener and every connection.
        """
        try:
            listener = await anyio.create_tcp_listener(
                local_host=self.host or None, local_port=self.port
            )
        except OSError as exc:
            from daemon.errors import ConfigError

            why = "in use by another program" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(
                f"metrics.listen = {self.listen!r}: cannot listen for metrics on {self.listen}"
                f" ({why or exc}) — stop the program using that port (`ss -ltnp | grep"
                f" :{self.port}`), or set [metrics] listen to a free port"
            ) from None
        async with listener:
            # (S610 is about Django's QuerySet.extra, not anyio's typed attributes.)
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
            _log.info("metrics.listening", url=self.url)
            # One slot per connection being served: a flood of clients waits in the kernel's
            # backlog instead of using up the daemon's file descriptors.
            slots = anyio.Semaphore(self.max_connections)
            async with anyio.create_task_group() as tg:
                for sub in listener.listeners:
                    assert isinstance(sub, anyio.abc.SocketListener)
                    tg.start_soon(self._accept_loop, sub, slots, tg)
                task_status.started()

    async def _accept_loop(
        self,
        listener: anyio.abc.SocketListener,
        slots: anyio.Semaphore,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                # EMFILE, ECONNABORTED...: transient, and no reason to stop serving.
                slots.release()
                _log.warning("metrics.accept_failed", error=str(exc))
                await anyio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            tg.start_soon(self._serve_connection, stream, slots)

    async def _serve_connection(
        self, stream: anyio.abc.SocketStream, slots: anyio.Semaphore
    ) -> None:
        try:
            async with stream:
                await self._handle(stream)
        except Exception as exc:  # one client's trouble must never reach the daemon
            _log.debug("metrics.connection_error", error=repr(exc))
        finally:
            slots.release()

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        try:
            try:
                with anyio.fail_after(self.read_timeout):
                    head = await _read_head(stream)
            except TimeoutError:
                raise _HttpError(408, "timed out waiting for the request") from None
            if head is None:
                return  # connected and closed without a word (a port probe)
            response = await self._respond(_parse_head(head))
        except _HttpError as exc:
            headers = (("Allow", "GET"),) if exc.status == 405 else ()
            response = _Response.text(exc.status, exc.message, headers=headers)
        await self._send(stream, response)

    async def _respond(self, request: _Request) -> _Response:
        if request.path not in _PATHS:
            raise _HttpError(404, "not found; the paths are /metrics and /healthz")
        if request.method != "GET":
            raise _HttpError(405, f"method {request.method} not allowed; use GET")
        if request.path == "/metrics":
            return await self._metrics()
        return await self._health()

    async def _metrics(self) -> _Response:
        try:
            with anyio.fail_after(self.refresh_timeout):
                await self.metrics.refresh(self.queue)
        except Exception as exc:
            # A busy or broken database must not hide the other metrics: serve the queue
            # gauges as last read (the log says why they are stale).
            _log.warning("metrics.refresh_failed", error=str(exc) or type(exc).__name__)
        body = self.metrics.render().encode("utf-8")
        return _Response(200, body, content_type=CONTENT_TYPE)

    async def _health(self) -> _Response:
        try:
            with anyio.fail_after(self.health_timeout):
                ok, reason = await self.health()
        except TimeoutError:
            ok, reason = False, f"health check timed out after {self.health_timeout:g} s"
        except Exception as exc:
            ok, reason = False, f"health check failed: {str(exc) or type(exc).__name__}"
        if ok:
            return _Response.text(200, "ok")
        return _Response.text(503, reason or "unhealthy")

    async def _send(self, stream: anyio.abc.SocketStream, response: _Response) -> None:
        status = http.HTTPStatus(response.status)
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in response.headers),
        ]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + response.body
        with anyio.fail_after(self.write_timeout):
            await stream.send(data)
        # Lingering close: half-close, then drain what the client still sends (a body we never
        # read). Closing with unread data makes the kernel send a reset, which can destroy the
        # answer before the client has read it.
        with anyio.move_on_after(_LINGER_SECONDS):
            await stream.send_eof()
            try:
                while await stream.receive(65536):
                    pass
            except anyio.EndOfStream:
                pass
