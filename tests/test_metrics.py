"""Tests for daemon.metrics: the text format, the daemon's metric set, and the HTTP endpoint.

The endpoint tests use real loopback sockets: the server runs on port 0, is scraped with httpx
(or a raw socket, for what httpx would never send) and the exposition is parsed with
``prometheus_client`` (a test-only dependency) as well as checked line by line here.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from daemon import __version__
from daemon.errors import ConfigError
from daemon.metrics import (
    CONTENT_TYPE,
    UPLOAD_DURATION_BUCKETS,
    Counter,
    Gauge,
    HealthCheck,
    Histogram,
    Metrics,
    MetricsServer,
    Registry,
    format_value,
    parse_listen,
)
from daemon.queue import FileIdentity, NewJob, Queue

# Every metric the daemon exposes, with its type and label names: the interface under test.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "inboxd_files_uploaded_total": ("counter", ()),
    "inboxd_bytes_uploaded_total": ("counter", ()),
    "inboxd_retries_total": ("counter", ("reason",)),
    "inboxd_failures_total": ("counter", ("reason",)),
    "inboxd_queue_jobs": ("gauge", ("state",)),
    "inboxd_oldest_queued_age_seconds": ("gauge", ()),
    "inboxd_upload_duration_seconds": ("histogram", ()),
    "inboxd_imports_total": ("counter", ("outcome",)),
    "inboxd_last_upload_success_timestamp_seconds": ("gauge", ()),
    "inboxd_paused": ("gauge", ()),
    "inboxd_upload_window_open": ("gauge", ()),
    "inboxd_inbox_free_bytes": ("gauge", ()),
    "inboxd_disk_low": ("gauge", ()),
    "inboxd_up": ("gauge", ()),
    "inboxd_build_info": ("gauge", ("version",)),
}

# ---------------------------------------------------------------------------------------------
# helpers

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_VALUE = r"(?:[+-]?Inf|NaN|[+-]?[0-9]+(?:\.[0-9]+)?(?:e[+-][0-9]+)?)"
_LABELS = r'\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\}'
_SAMPLE_LINE = re.compile(rf"({_NAME})(?:{_LABELS})? {_VALUE}\Z")
_HELP_LINE = re.compile(rf"# HELP ({_NAME}) (?:[^\\\n]|\\[\\n])*\Z")
_TYPE_LINE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)\Z")
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def check_exposition(text: str) -> None:
    """Stricter than prometheus_client's parser: the exact 0.0.4 grammar we promise."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    family, kind = "", ""
    for line in text[:-1].split("\n"):
        if m := _HELP_LINE.match(line):
            family, kind = m.group(1), ""
        elif m := _TYPE_LINE.match(line):
            assert m.group(1) == family, f"TYPE without HELP first: {line!r}"
            kind = m.group(2)
        else:
            m = _SAMPLE_LINE.match(line)
            assert m is not None, f"not a valid exposition line: {line!r}"
            assert kind, f"sample before its TYPE: {line!r}"
            assert m.group(1) in {family + s for s in _SUFFIXES[kind]}, line


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} as prometheus_client parses the exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def families(text: str) -> dict[str, str]:
    """{metric name as exposed: type}; the parser drops a counter's ``_total``, we put it back."""
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = fam.type
    return out


def L(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def new_job(rel: str, inode: int) -> NewJob:
    return NewJob(FileIdentity(rel, 10 * inode, inode, inode), 7, Path(rel).name, {})


async def healthy() -> tuple[bool, str]:
    return True, ""


@asynccontextmanager
async def serving(server: MetricsServer) -> AsyncIterator[MetricsServer]:
    """Run ``server`` in a task group for the body of the ``async with``, then cancel it."""
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def make_server(
    metrics: Metrics | None = None,
    *,
    queue: Queue,
    health: HealthCheck = healthy,
    listen: str = "127.0.0.1:0",
    **kwargs: Any,
) -> MetricsServer:
    return MetricsServer(listen, metrics or Metrics(), queue=queue, health=health, **kwargs)


async def raw_request(port: int, data: bytes, *, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` on a fresh connection and read the whole answer (the server closes)."""
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(data)
        return await read_all(stream)


async def read_all(stream: anyio.abc.ByteReceiveStream) -> bytes:
    answer = b""
    with anyio.fail_after(5):
        while True:
            try:
                answer += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return answer


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer[9:12])


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    async with await Queue.open(tmp_path / "state" / "state.db") as q:
        yield q


# ---------------------------------------------------------------------------------------------
# text format


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3.0, "3"),
        (-2.0, "-2"),
        (0.05, "0.05"),
        (-2.5, "-2.5"),
        (1e-07, "1e-07"),
        (1e20, "1e+20"),
        (2.0**53, "9007199254740992.0"),
        (12_345_678_901, "12345678901"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text
    if not math.isnan(value):
        assert float(text) == value


@given(st.floats(allow_nan=False))
def test_format_value_round_trips(value: float) -> None:
    text = format_value(value)
    assert re.fullmatch(_VALUE, text), text
    assert float(text.replace("Inf", "inf")) == value


def test_render_exact_text() -> None:
    r = Registry()
    c = r.counter("demo_events_total", "Events.\nSecond line with a \\ backslash.")
    g = r.gauge("demo_temperature", "Temperature.", ["room", "floor"])
    h = r.histogram("demo_seconds", "Durations.", [0.5, 1, 2.5], ["op"])
    c.inc()
    c.inc(2.5)
    g.set(-1.5, room='say "hi"\\ \nthere', floor="0")
    g.set(21, room="kitchen", floor="1")
    for value in (0.25, 0.5, 1.0000001, 3, 100):
        h.observe(value, op="put")
    assert r.render() == (
        "# HELP demo_events_total Events.\\nSecond line with a \\\\ backslash.\n"
        "# TYPE demo_events_total counter\n"
        "demo_events_total 3.5\n"
        "# HELP demo_temperature Temperature.\n"
        "# TYPE demo_temperature gauge\n"
        'demo_temperature{room="kitchen",floor="1"} 21\n'
        'demo_temperature{room="say \\"hi\\"\\\\ \\nthere",floor="0"} -1.5\n'
        "# HELP demo_seconds Durations.\n"
        "# TYPE demo_seconds histogram\n"
        'demo_seconds_bucket{op="put",le="0.5"} 2\n'
        'demo_seconds_bucket{op="put",le="1"} 2\n'
        'demo_seconds_bucket{op="put",le="2.5"} 3\n'
        'demo_seconds_bucket{op="put",le="+Inf"} 5\n'
        'demo_seconds_sum{op="put"} 104.7500001\n'
        'demo_seconds_count{op="put"} 5\n'
    )
    check_exposition(r.render())
    parsed = samples(r.render())
    assert parsed[("demo_temperature", L(room='say "hi"\\ \nthere', floor="0"))] == -1.5
    assert parsed[("demo_seconds_bucket", L(op="put", le="+Inf"))] == 5


def test_unlabelled_metrics_exist_from_the_start_labelled_ones_when_touched() -> None:
    r = Registry()
    r.counter("a_total", "A.")
    r.gauge("b", "B.", ["x"])
    r.histogram("c_seconds", "C.", [1])
    assert r.render() == (
        "# HELP a_total A.\n# TYPE a_total counter\na_total 0\n"
        "# HELP b B.\n# TYPE b gauge\n"
        "# HELP c_seconds C.\n# TYPE c_seconds histogram\n"
        'c_seconds_bucket{le="1"} 0\nc_seconds_bucket{le="+Inf"} 0\n'
        "c_seconds_sum 0\nc_seconds_count 0\n"
    )


def test_gauge_and_histogram_operations() -> None:
    g = Gauge("g", "G.", ["k"])
    g.inc(k="a")
    g.inc(4, k="a")
    g.dec(2, k="a")
    g.dec(k="b")
    assert (g.value(k="a"), g.value(k="b"), g.value(k="never")) == (3, -1, 0)
    h = Histogram("h", "H.", [1, 2, math.inf])
    assert h.buckets == (1.0, 2.0)  # +Inf is implicit
    h.observe(1)  # "le" is inclusive: 1 lands in the le="1" bucket
    h.observe(-5)
    h.observe(math.inf)
    assert (h.count(), h.sum()) == (3, math.inf)
    bucket = {s[1][-1][1]: s[2] for s in h.samples() if s[0] == "_bucket"}
    assert bucket == {"1": 2, "2": 2, "+Inf": 3}


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40))
@settings(max_examples=200)
def test_any_unicode_label_value_round_trips(value: str) -> None:
    g = Gauge("g", "G.", ["v"])
    g.set(1, v=value)
    text = _render_one(g)
    check_exposition(text)
    assert samples(text) == {("g", L(v=value)): 1.0}


def _render_one(metric: Gauge) -> str:
    r = Registry()
    r.register(metric)
    return r.render()


def test_undecodable_label_value_is_replaced_not_fatal() -> None:
    g = Gauge("g", "G.", ["v"])
    g.set(1, v="bad\udcffname")  # how os.fsdecode spells a byte that is not UTF-8
    text = _render_one(g)
    text.encode("utf-8")
    assert samples(text) == {("g", L(v="bad?name")): 1.0}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Counter("bad-name", "x"), "invalid metric name"),
        (lambda: Counter("", "x"), "invalid metric name"),
        (lambda: Counter("ok", "x", ["bad-label"]), "invalid label name"),
        (lambda: Counter("ok", "x", ["__reserved"]), "invalid label name"),
        (lambda: Counter("ok", "x", ["a", "a"]), "duplicate label"),
        (lambda: Histogram("ok", "x", [1], ["le"]), "reserved"),
        (lambda: Histogram("ok", "x", [2, 1]), "strictly increasing"),
        (lambda: Histogram("ok", "x", [1, 1]), "strictly increasing"),
        (lambda: Histogram("ok", "x", [1, math.nan]), "strictly increasing"),
        (lambda: Histogram("ok", "x", []), "at least one"),
    ],
)
def test_invalid_definitions_are_refused(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_invalid_updates_are_refused() -> None:
    c = Counter("c_total", "C.", ["reason"])
    with pytest.raises(ValueError, match="takes labels"):
        c.inc()
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(reason="x", extra="y")
    with pytest.raises(ValueError, match="cannot change"):
        c.inc(-1, reason="x")
    with pytest.raises(ValueError, match="cannot change"):
        c.inc(math.nan, reason="x")
    with pytest.raises(ValueError, match="NaN"):
        Histogram("h", "H.", [1]).observe(math.nan)
    r = Registry()
    r.counter("dup_total", "D.")
    with pytest.raises(ValueError, match="already registered"):
        r.gauge("dup_total", "D.")
    # The value is positional-only, so a label may even be called "amount" or "value".
    odd = Gauge("odd", "O.", ["value"])
    odd.set(2, value="v")
    assert odd.value(value="v") == 2


def test_reasons_stay_bounded() -> None:
    m = Metrics()
    m.retried("rate_limited")
    m.retried("rate_limited")
    m.failed("connection refused by /srv/inbox/secret.csv")  # a message, not a kind
    m.failed("")
    for i in range(100):
        m.failed(f"kind_{i}")
    assert m.retries.value(reason="rate_limited") == 2
    reasons = {labels[0][1] for _, labels, _ in m.failures.samples()}
    assert len(reasons) <= 65  # 64 kinds (one taken by rate_limited) + "other"
    assert m.failures.value(reason="other") == 2 + 100 - 63


# ---------------------------------------------------------------------------------------------
# the daemon's metric set, scraped over HTTP


async def test_scrape_every_metric(queue: Queue) -> None:
    ids = await queue.enqueue_many([new_job(f"in/{i}.csv", i + 1) for i in range(4)])
    await queue.claim("worker", lease_seconds=60)  # → uploading
    await queue.mark_failed(ids[3], error="boom", kind="server")  # never claimed: still allowed
    await queue.set_settling("in/growing.csv", 5, time.time())
    # 1000 s in the future: the oldest queued job is ~1000 s old without sleeping.
    metrics = Metrics(clock=lambda: time.time() + 1000, version="1.2.3-test")
    metrics.upload_succeeded(1000, 0.2)
    metrics.upload_succeeded(2**40, 7000.0)
    metrics.retried("network")
    metrics.retried("network")
    metrics.retried("rate_limited")
    metrics.failed("server")
    metrics.import_finished(True)
    metrics.import_finished(True)
    metrics.import_finished(False)
    metrics.set_paused(True)
    metrics.set_upload_window_open(False)
    metrics.set_disk(123_456_789, low=True)

    async with serving(make_server(metrics, queue=queue)) as server, httpx.AsyncClient() as http:
        assert server.port > 0
        response = await http.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE
    assert response.headers["connection"] == "close"
    text = response.text
    check_exposition(text)

    assert families(text) == {name: kind for name, (kind, _) in EXPECTED.items()}
    parsed = samples(text)
    for (name, labels), _ in parsed.items():
        family = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        if family not in EXPECTED:
            family = name
        expected_labels = set(EXPECTED[family][1]) | ({"le"} if name.endswith("_bucket") else set())
        assert {k for k, _ in labels} == expected_labels, name

    now = time.time() + 1000
    assert parsed[("inboxd_files_uploaded_total", L())] == 2
    assert parsed[("inboxd_bytes_uploaded_total", L())] == 1000 + 2**40
    assert parsed[("inboxd_retries_total", L(reason="network"))] == 2
    assert parsed[("inboxd_retries_total", L(reason="rate_limited"))] == 1
    assert parsed[("inboxd_failures_total", L(reason="server"))] == 1
    queue_jobs = {
        dict(labels)["state"]: value
        for (name, labels), value in parsed.items()
        if name == "inboxd_queue_jobs"
    }
    assert queue_jobs == {
        "settling": 1,
        "queued": 2,
        "uploading": 1,
        "importing": 0,
        "done": 0,
        "failed": 1,
        "superseded": 0,
    }
    assert 1000 <= parsed[("inboxd_oldest_queued_age_seconds", L())] < 1060
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in parsed.items()
        if name == "inboxd_upload_duration_seconds_bucket"
    }
    assert len(buckets) == len(UPLOAD_DURATION_BUCKETS) + 1
    assert buckets["0.1"] == 0 and buckets["0.25"] == 1
    assert buckets["3600"] == 1 and buckets["7200"] == 2 and buckets["+Inf"] == 2
    assert parsed[("inboxd_upload_duration_seconds_sum", L())] == pytest.approx(7000.2)
    assert parsed[("inboxd_upload_duration_seconds_count", L())] == 2
    assert parsed[("inboxd_imports_total", L(outcome="finished"))] == 2
    assert parsed[("inboxd_imports_total", L(outcome="failed"))] == 1
    assert now - 60 < parsed[("inboxd_last_upload_success_timestamp_seconds", L())] <= now
    assert parsed[("inboxd_paused", L())] == 1
    assert parsed[("inboxd_upload_window_open", L())] == 0
    assert parsed[("inboxd_inbox_free_bytes", L())] == 123_456_789
    assert parsed[("inboxd_disk_low", L())] == 1
    assert parsed[("inboxd_up", L())] == 1
    assert parsed[("inboxd_build_info", L(version="1.2.3-test"))] == 1


async def test_fresh_metrics_defaults_and_refresh(queue: Queue) -> None:
    metrics = Metrics()
    text = metrics.render()
    check_exposition(text)
    parsed = samples(text)
    assert parsed[("inboxd_last_upload_success_timestamp_seconds", L())] == 0
    assert parsed[("inboxd_imports_total", L(outcome="failed"))] == 0
    assert parsed[("inboxd_upload_window_open", L())] == 1
    assert parsed[("inboxd_paused", L())] == 0
    assert parsed[("inboxd_build_info", L(version=__version__))] == 1
    # Nothing queued → age 0; the gauges follow the queue at each refresh.
    await metrics.refresh(queue)
    assert metrics.oldest_queued_age.value() == 0
    assert metrics.queue_jobs.value(state="queued") == 0
    await queue.enqueue_many([new_job("a.csv", 1)])
    await metrics.refresh(queue)
    assert metrics.queue_jobs.value(state="queued") == 1
    assert 0 <= metrics.oldest_queued_age.value() < 60
    await queue.claim("w", lease_seconds=60)
    await metrics.refresh(queue)
    assert metrics.queue_jobs.value(state="queued") == 0
    assert metrics.queue_jobs.value(state="uploading") == 1
    assert metrics.oldest_queued_age.value() == 0
    metrics.set_paused(False)
    metrics.set_disk(-5, low=False)
    assert metrics.inbox_free_bytes.value() == 0


async def test_scrape_with_a_broken_queue_serves_the_rest(tmp_path: Path) -> None:
    broken = await Queue.open(tmp_path / "state.db")
    await broken.close()  # every read now raises QueueError
    metrics = Metrics()
    metrics.upload_succeeded(5, 0.1)
    async with serving(make_server(metrics, queue=broken)) as server, httpx.AsyncClient() as http:
        response = await http.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert samples(response.text)[("inboxd_files_uploaded_total", L())] == 1


# ---------------------------------------------------------------------------------------------
# /healthz


async def test_healthz_both_ways(queue: Queue) -> None:
    state: dict[str, object] = {"answer": (True, "")}

    async def health() -> tuple[bool, str]:
        answer = state["answer"]
        if isinstance(answer, BaseException):
            raise answer
        if answer == "hang":
            await anyio.sleep_forever()
        assert isinstance(answer, tuple)
        return answer

    server = make_server(queue=queue, health=health, health_timeout=0.2)
    async with serving(server), httpx.AsyncClient(base_url=server.url) as http:
        ok = await http.get("/healthz")
        assert (ok.status_code, ok.text) == (200, "ok\n")
        assert ok.headers["content-type"] == "text/plain; charset=utf-8"

        state["answer"] = (False, "API unreachable: connection refused (https://api.example)")
        down = await http.get("/healthz")
        assert down.status_code == 503
        assert down.text == "API unreachable: connection refused (https://api.example)\n"

        state["answer"] = RuntimeError("probe exploded")
        broken = await http.get("/healthz")
        assert (broken.status_code, broken.text) == (503, "health check failed: probe exploded\n")

        state["answer"] = "hang"
        slow = await http.get("/healthz")
        assert slow.status_code == 503 and "timed out" in slow.text


# ---------------------------------------------------------------------------------------------
# HTTP strictness and robustness


async def test_http_errors(queue: Queue) -> None:
    server = make_server(queue=queue)
    async with serving(server), httpx.AsyncClient(base_url=server.url) as http:
        missing = await http.get("/nope")
        assert missing.status_code == 404 and "/metrics" in missing.text
        assert (await http.get("/")).status_code == 404
        assert (await http.get("/metrics/")).status_code == 404
        assert (await http.get("/metrics?name[]=x")).status_code == 200

        post = await http.post("/metrics", content=b"x" * 200_000)  # drained, not reset
        assert post.status_code == 405 and post.headers["allow"] == "GET"
        assert (await http.head("/healthz")).status_code == 405
        assert (await http.delete("/healthz")).status_code == 405

        port = server.port
        cases = {
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n": 400,  # TLS-ish bytes
            b"GET /metrics\r\n\r\n": 400,  # HTTP/0.9
            b"GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n": 400,
            b"GET /metrics HTTP/1.1\r\n\r\n": 400,  # no Host
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n": 400,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n": 400,
            b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n": 400,
            b"GET /metrics HTTP/1.1\r\nHo st: x\r\n\r\n": 400,
            b"GET /metrics HTTP/1.1\r\nHost: x\x00y\r\n\r\n": 400,
            b"GET /m\xe9trics HTTP/1.1\r\nHost: x\r\n\r\n": 400,
            b"G(T /metrics HTTP/1.1\r\nHost: x\r\n\r\n": 400,
            b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n": 400,
            b"GET /metrics HTTP/1.x\r\nHost: x\r\n\r\n": 400,
            b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n": 505,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n": 431,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n": 400,  # ends (EOF below) before the head
            # What a strict server still has to accept:
            b"GET /metrics HTTP/1.0\r\n\r\n": 200,  # no Host needed in 1.0
            b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n": 200,  # a leading empty line
            b"GET /healthz HTTP/1.1\nHost: x\n\n": 200,  # bare LF line ends
            b"GET http://127.0.0.1/healthz?x HTTP/1.1\r\nHost: x\r\n\r\n": 200,  # absolute-form
            b"PUT /nope HTTP/1.1\r\nHost: x\r\n\r\n": 404,
        }
        for request, expected in cases.items():
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(request)
                await stream.send_eof()
                answer = await read_all(stream)
            assert status_of(answer) == expected, request[:60]
            assert b"\r\nConnection: close\r\n" in answer
        # ... and after all that it still serves.
        assert (await http.get("/metrics")).status_code == 200


async def test_misbehaving_clients_do_not_break_the_server(queue: Queue) -> None:
    server = make_server(queue=queue, read_timeout=0.5)
    async with serving(server), httpx.AsyncClient(base_url=server.url) as http:
        port = server.port
        # Connect and leave at once, send garbage and leave without reading, stall half-way.
        async with await anyio.connect_tcp("127.0.0.1", port):
            pass
        async with await anyio.connect_tcp("127.0.0.1", port) as rude:
            await rude.send(b"\x00\xff" * 5000)
        stalled = await anyio.connect_tcp("127.0.0.1", port)
        silent = await anyio.connect_tcp("127.0.0.1", port)
        async with stalled, silent:
            await stalled.send(b"GET /metr")
            # Served while those two hang, not after them.
            started = time.monotonic()
            assert (await http.get("/metrics")).status_code == 200
            assert time.monotonic() - started < 0.45
            # Each stalled client gets a 408 once the read timeout is up, then is closed.
            assert status_of(await read_all(stalled)) == 408
            assert status_of(await read_all(silent)) == 408
        # A client trickling a byte at a time is bounded by the same total timeout.
        async with await anyio.connect_tcp("127.0.0.1", port) as trickle:
            started = time.monotonic()
            with suppress(anyio.BrokenResourceError):
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
                    await trickle.send(bytes([byte]))
                    await anyio.sleep(0.02)
            assert status_of(await read_all(trickle)) == 408
            assert time.monotonic() - started < 2
        assert (await http.get("/healthz")).status_code == 200


async def test_connection_limit_queues_clients_instead_of_failing(queue: Queue) -> None:
    server = make_server(queue=queue, read_timeout=0.3, max_connections=1)
    async with (
        serving(server),
        httpx.AsyncClient(base_url=server.url, timeout=5) as http,
        await anyio.connect_tcp("127.0.0.1", server.port),
    ):
        # The one slot is taken by the idle client until its read timeout (and the lingering
        # close after the 408) frees it: the scrape waits, it does not fail.
        assert (await http.get("/metrics")).status_code == 200


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:9464", "192.168.1.10:9464", ":9464", "example.com:9464", "[::]:9464", "[fe80::1]:1"],
)
def test_non_loopback_listen_is_refused(listen: str) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        MetricsServer(listen, Metrics(), queue=None, health=healthy)  # type: ignore[arg-type]
    assert parse_listen(listen, allow_remote=True)[1] in (9464, 1)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (" 127.1.2.3:0 ", ("127.1.2.3", 0)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::ffff:127.0.0.1]:1", ("::ffff:127.0.0.1", 1)),
    ],
)
def test_loopback_listen_is_accepted(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen",
    [
        "9464",
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:99999",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "127.0.0.1:١٢",
        "::1:9464",
        "[::1]9464",
        "[::1",
        "[localhost]:1",
    ],
)
def test_malformed_listen_is_refused(listen: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"metrics listen = {listen!r}")):
        parse_listen(listen, allow_remote=True)


async def test_ipv6_loopback(queue: Queue) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = make_server(queue=queue, listen="[::1]:0")
    async with serving(server), httpx.AsyncClient() as http:
        assert server.url == f"http://[::1]:{server.port}"
        assert (await http.get(f"{server.url}/healthz")).status_code == 200


async def test_port_in_use_fails_before_started(queue: Queue) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = make_server(queue=queue, listen=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=r"cannot listen for metrics on 127\.0\.0\.1"):
            with anyio.fail_after(5):
                await server.run()


async def test_cancellation_closes_listener_and_connections(queue: Queue) -> None:
    async def hang() -> tuple[bool, str]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    server = make_server(queue=queue, health=hang, read_timeout=30, health_timeout=30)
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        port = server.port
        idle = await anyio.connect_tcp("127.0.0.1", port)
        waiting = await anyio.connect_tcp("127.0.0.1", port)
        await waiting.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await anyio.sleep(0.05)  # both are being served now
        started = time.monotonic()
        tg.cancel_scope.cancel()
    assert time.monotonic() - started < 0.5
    async with idle, waiting:
        # The server side is gone: both see the end of the stream (or a reset), not an answer.
        assert await read_all(idle) == b""
        assert await read_all(waiting) == b""
    with pytest.raises(OSError, match="connection attempts failed") as refused:
        await anyio.connect_tcp("127.0.0.1", port)
    assert isinstance(refused.value.__cause__, ConnectionRefusedError)
