"""The metrics endpoint as Prometheus and a person see it: scraped over loopback HTTP.

Every test here talks to a real server on port 0 (httpx, or a raw socket for what httpx would
never send) and reads the exposition with ``prometheus_client``'s parser. The registry and the
text format are prometheus_client's own; what is ours and tested is the metric set (names,
types, labels, values), the queue reading at scrape time, ``/healthz``, the listen address
rules, and the bounds: slow clients, a busy port, stopping.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon import __version__
from daemon.errors import ConfigError
from daemon.net.addresses import parse_listen
from daemon.sandbox import Sandbox
from daemon.service.metrics import UPLOAD_DURATION_BUCKETS, HealthCheck, Metrics, MetricsServer
from daemon.state import FileIdentity, NewJob, Queue
from tests.support.runner import running_service, start_daemon, stop_daemon, write_config

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
STATES = ("settling", "queued", "uploading", "importing", "done", "failed", "superseded")

# ---------------------------------------------------------------------------------------------
# helpers


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


def of(
    parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, label: str
) -> dict[str, float]:
    """{value of ``label``: sample value} for the samples called ``name``."""
    return {dict(labels)[label]: v for (n, labels), v in parsed.items() if n == name}


def new_job(rel: str, inode: int) -> NewJob:
    return NewJob(FileIdentity(rel, 10 * inode, inode, inode), 7, Path(rel).name, {})


async def healthy() -> tuple[bool, str]:
    return True, ""


@asynccontextmanager
async def serving(
    metrics: Metrics | None = None,
    *,
    queue: Queue,
    health: HealthCheck = healthy,
    listen: str = "127.0.0.1:0",
    **kwargs: Any,
) -> AsyncIterator[MetricsServer]:
    """A server running in a task group for the body of the ``async with``, then cancelled."""
    server = MetricsServer(listen, metrics or Metrics(), queue=queue, health=health, **kwargs)
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


async def read_all(stream: anyio.abc.ByteReceiveStream, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    answer = b""
    with anyio.fail_after(timeout):
        while True:
            try:
                answer += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return answer


def status_of(answer: bytes) -> int:
    assert re.match(rb"HTTP/1\.[01] [0-9]{3} ", answer), answer[:80]
    return int(answer[9:12])


def metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "inboxd-metrics"]


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    async with await Queue.open(tmp_path / "state" / "state.db") as q:
        yield q


# ---------------------------------------------------------------------------------------------
# the daemon's metric set, scraped over HTTP


async def test_scrape_every_metric(queue: Queue) -> None:
    ids = await queue.enqueue_many([new_job(f"in/{i}.csv", i + 1) for i in range(4)])
    await queue.claim("worker", lease_seconds=60)  # → uploading
    await queue.mark_failed(ids[3], error="boom", kind="server")  # never claimed: still allowed
    await queue.apply_settling({"in/growing.csv": (5, time.time())})
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

    async with serving(metrics, queue=queue) as server, httpx.AsyncClient() as http:
        assert server.port > 0
        response = await http.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.text

    assert families(text) == {name: kind for name, (kind, _) in EXPECTED.items()}
    parsed = samples(text)
    for name, labels in parsed:
        family = re.sub(r"_(bucket|sum|count)\Z", "", name)
        if family not in EXPECTED:
            family = name
        expected_labels = set(EXPECTED[family][1]) | ({"le"} if name.endswith("_bucket") else set())
        assert {k for k, _ in labels} == expected_labels, name
    assert "_created" not in text  # prometheus_client's extra series are switched off

    now = time.time() + 1000
    assert parsed[("inboxd_files_uploaded_total", L())] == 2
    assert parsed[("inboxd_bytes_uploaded_total", L())] == 1000 + 2**40
    assert of(parsed, "inboxd_retries_total", "reason") == {"network": 2, "rate_limited": 1}
    assert of(parsed, "inboxd_failures_total", "reason") == {"server": 1}
    assert of(parsed, "inboxd_queue_jobs", "state") == {
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
        float(le): v for le, v in of(parsed, "inboxd_upload_duration_seconds_bucket", "le").items()
    }
    assert sorted(buckets) == [*UPLOAD_DURATION_BUCKETS, float("inf")]
    assert buckets[0.1] == 0 and buckets[0.25] == 1
    assert buckets[3600] == 1 and buckets[7200] == 2 and buckets[float("inf")] == 2
    assert parsed[("inboxd_upload_duration_seconds_sum", L())] == pytest.approx(7000.2)
    assert parsed[("inboxd_upload_duration_seconds_count", L())] == 2
    assert of(parsed, "inboxd_imports_total", "outcome") == {"finished": 2, "failed": 1}
    assert now - 60 < parsed[("inboxd_last_upload_success_timestamp_seconds", L())] <= now
    assert parsed[("inboxd_paused", L())] == 1
    assert parsed[("inboxd_upload_window_open", L())] == 0
    assert parsed[("inboxd_inbox_free_bytes", L())] == 123_456_789
    assert parsed[("inboxd_disk_low", L())] == 1
    assert parsed[("inboxd_up", L())] == 1
    assert of(parsed, "inboxd_build_info", "version") == {"1.2.3-test": 1}


async def test_defaults_and_the_queue_read_at_each_scrape(queue: Queue) -> None:
    metrics = Metrics()
    metrics.set_disk(-5, low=False)  # a nonsensical reading is shown as 0, not negative
    async with serving(metrics, queue=queue) as server, httpx.AsyncClient() as http:

        async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            return samples((await http.get(f"{server.url}/metrics")).text)

        fresh = await scrape()
        assert fresh[("inboxd_last_upload_success_timestamp_seconds", L())] == 0
        assert of(fresh, "inboxd_imports_total", "outcome") == {"finished": 0, "failed": 0}
        assert of(fresh, "inboxd_retries_total", "reason") == {}  # appear when first counted
        assert fresh[("inboxd_upload_window_open", L())] == 1
        assert fresh[("inboxd_paused", L())] == 0
        assert fresh[("inboxd_inbox_free_bytes", L())] == 0
        assert of(fresh, "inboxd_build_info", "version") == {__version__: 1}
        assert of(fresh, "inboxd_queue_jobs", "state") == dict.fromkeys(STATES, 0)
        assert fresh[("inboxd_oldest_queued_age_seconds", L())] == 0

        await queue.enqueue_many([new_job("a.csv", 1)])
        queued = await scrape()
        assert of(queued, "inboxd_queue_jobs", "state")["queued"] == 1
        assert 0 <= queued[("inboxd_oldest_queued_age_seconds", L())] < 60

        await queue.claim("w", lease_seconds=60)
        claimed = await scrape()
        assert of(claimed, "inboxd_queue_jobs", "state")["queued"] == 0
        assert of(claimed, "inboxd_queue_jobs", "state")["uploading"] == 1
        assert claimed[("inboxd_oldest_queued_age_seconds", L())] == 0


async def test_scrape_with_a_broken_queue_serves_the_rest(tmp_path: Path) -> None:
    good = await Queue.open(tmp_path / "state.db")
    metrics = Metrics()
    metrics.upload_succeeded(5, 0.1)
    async with serving(metrics, queue=good) as server, httpx.AsyncClient() as http:
        await good.enqueue_many([new_job("a.csv", 1)])
        assert (await http.get(f"{server.url}/metrics")).status_code == 200
        await good.close()  # every read now raises QueueError
        response = await http.get(f"{server.url}/metrics")
    assert response.status_code == 200
    parsed = samples(response.text)
    assert parsed[("inboxd_files_uploaded_total", L())] == 1
    # The queue gauges as last read, not gone.
    assert of(parsed, "inboxd_queue_jobs", "state")["queued"] == 1


def test_reasons_stay_bounded() -> None:
    m = Metrics()
    m.retried("rate_limited")
    m.retried("rate_limited")
    m.failed("connection refused by /srv/inbox/secret.csv")  # a message, not a kind
    m.failed("")
    for i in range(100):
        m.failed(f"kind_{i}")
    parsed = samples(generate_latest(m.registry).decode())
    assert of(parsed, "inboxd_retries_total", "reason") == {"rate_limited": 2}
    failures = of(parsed, "inboxd_failures_total", "reason")
    assert len(failures) == 64  # 63 kinds (one taken by rate_limited) + "other"
    assert failures["other"] == 2 + 100 - 63
    assert "secret" not in generate_latest(m.registry).decode()


def test_each_daemon_has_its_own_registry() -> None:
    # Several daemons run in one test process: neither may see the other's counts, and none
    # may land in prometheus_client's process-wide default registry.
    first, second = Metrics(), Metrics()
    first.upload_succeeded(10, 1.0)
    assert (
        samples(generate_latest(first.registry).decode())[("inboxd_files_uploaded_total", L())] == 1
    )
    assert (
        samples(generate_latest(second.registry).decode())[("inboxd_files_uploaded_total", L())]
        == 0
    )
    assert "inboxd_" not in generate_latest(REGISTRY).decode()


# ---------------------------------------------------------------------------------------------
# /healthz and the paths


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

    async with (
        serving(queue=queue, health=health, health_timeout=0.3) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
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
        assert slow.status_code == 503 and "timed out after 0.3 s" in slow.text

        # ... and a hung check held nothing: the next answers come at once.
        state["answer"] = (True, "")
        assert (await http.get("/healthz")).status_code == 200


async def test_paths_methods_and_garbage(queue: Queue) -> None:
    async with serving(queue=queue) as server, httpx.AsyncClient(base_url=server.url) as http:
        missing = await http.get("/nope")
        assert missing.status_code == 404 and "/metrics" in missing.text
        assert (await http.get("/")).status_code == 404
        assert (await http.get("/metrics/")).status_code == 404

        post = await http.post("/metrics", content=b"x" * 60_000)  # read, not reset
        assert post.status_code == 405 and post.headers["allow"] == "GET"
        assert (await http.head("/healthz")).status_code == 405
        assert (await http.delete("/healthz")).status_code == 405

        # prometheus_client's own features come along: a selection of metrics, and gzip.
        chosen = await http.get("/metrics", params={"name[]": "inboxd_up"})
        assert families(chosen.text) == {"inboxd_up": "gauge"}
        assert chosen.headers["content-encoding"] == "gzip"  # httpx asks for it by default

        port = server.port
        garbage = {
            b"G(T /metrics HTTP/1.1\r\nHost: x\r\n\r\n": 405,  # not a method we know
            b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n": 431,  # too many headers
            b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n": 414,
            b"GET /metrics HTTP/1.0\r\n\r\n": 200,  # what a plain 1.0 client sends
        }
        for request, expected in garbage.items():
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(request)
                answer = await read_all(stream)
            assert status_of(answer) == expected, request[:60]
        # ... and after all that it still serves.
        assert (await http.get("/metrics")).status_code == 200


# ---------------------------------------------------------------------------------------------
# bounds: slow clients, the connection cap, the address, stopping


async def test_slow_clients_are_cut_off_and_do_not_hold_up_others(queue: Queue) -> None:
    async with (
        serving(queue=queue, read_timeout=0.5) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        port = server.port
        # Connect and leave at once; send garbage and leave without reading.
        async with await anyio.connect_tcp("127.0.0.1", port):
            pass
        async with await anyio.connect_tcp("127.0.0.1", port) as rude:
            await rude.send(b"\x00\xff" * 5000)
        stalled = await anyio.connect_tcp("127.0.0.1", port)
        silent = await anyio.connect_tcp("127.0.0.1", port)
        async with stalled, silent:
            await stalled.send(b"GET /metr")
            # Served while those two hang, not after them.
            assert (await http.get("/metrics")).status_code == 200
            # Each is cut off once its head is overdue: the connection ends, no answer.
            started = time.monotonic()
            assert await read_all(stalled) == b""
            assert await read_all(silent) == b""
            assert time.monotonic() - started < 5
        # A client trickling a byte at a time gets no longer: the deadline is for the head.
        async with await anyio.connect_tcp("127.0.0.1", port) as trickle:
            started = time.monotonic()
            try:
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 200:
                    await trickle.send(bytes([byte]))
                    await anyio.sleep(0.02)
            except (anyio.BrokenResourceError, ConnectionResetError, BrokenPipeError):
                pass  # cut off while still sending
            assert await read_all(trickle) == b""
            assert time.monotonic() - started < 5
        assert (await http.get("/healthz")).status_code == 200


async def test_connection_cap_queues_clients_instead_of_failing(queue: Queue) -> None:
    async with (
        serving(queue=queue, read_timeout=0.5, max_connections=1) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
        await anyio.connect_tcp("127.0.0.1", server.port),
    ):
        # The one slot is taken by the idle client until its head is overdue: the scrape
        # waits (in the kernel's backlog), it does not fail.
        started = time.monotonic()
        assert (await http.get("/metrics")).status_code == 200
        assert time.monotonic() - started >= 0.3


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:9464", "192.168.1.10:9464", ":9464", "example.com:9464", "[::]:9464", "[fe80::1]:1"],
)
def test_non_loopback_listen_is_refused(listen: str, queue: Queue) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        MetricsServer(listen, Metrics(), queue=queue, health=healthy)
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


async def test_ipv6_loopback_and_localhost(queue: Queue) -> None:
    async with serving(queue=queue, listen="localhost:0") as server, httpx.AsyncClient() as http:
        assert server.url == f"http://localhost:{server.port}"
        assert (await http.get(f"http://127.0.0.1:{server.port}/healthz")).status_code == 200
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with serving(queue=queue, listen="[::1]:0") as server, httpx.AsyncClient() as http:
        assert server.url == f"http://[::1]:{server.port}"
        assert (await http.get(f"{server.url}/healthz")).status_code == 200


async def test_port_in_use_is_a_configuration_error_before_started(queue: Queue) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(f"127.0.0.1:{port}", Metrics(), queue=queue, health=healthy)
        with pytest.raises(ConfigError) as refused, anyio.fail_after(10):
            await server.run()
    (line,) = refused.value.problems
    assert f"cannot listen for metrics on 127.0.0.1:{port} (in use by another program)" in line
    assert "\n" not in line and "[metrics] listen" in line
    assert refused.value.exit_status == 78
    assert server.thread is None and not metrics_threads()


async def test_cancelling_stops_the_thread_and_cuts_connections(queue: Queue) -> None:
    async def hang() -> tuple[bool, str]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    server = MetricsServer(
        "127.0.0.1:0",
        Metrics(),
        queue=queue,
        health=hang,
        read_timeout=30,
        health_timeout=30,
    )
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        port = server.port
        assert server.thread is not None and server.thread.is_alive()
        idle = await anyio.connect_tcp("127.0.0.1", port)
        waiting = await anyio.connect_tcp("127.0.0.1", port)
        await waiting.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await anyio.sleep(0.2)  # both are being served now: one reading, one in the check
        started = time.monotonic()
        tg.cancel_scope.cancel()
    assert time.monotonic() - started < 2
    assert not server.thread.is_alive()
    async with idle, waiting:
        assert await read_all(idle) == b""  # cut off, no answer
        answer = await read_all(waiting)
        # The request that waited on the stopping loop ends now: a 503 if it could still be
        # written, else nothing; never a hang.
        assert answer == b"" or status_of(answer) == 503
    with pytest.raises(OSError, match="connection attempts failed") as refused:
        await anyio.connect_tcp("127.0.0.1", port)
    assert isinstance(refused.value.__cause__, ConnectionRefusedError)


async def test_a_stopping_service_stops_its_metrics_server(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path, sandbox, metrics={"listen": "127.0.0.1:0"})
    async with running_service(config) as svc, httpx.AsyncClient() as http:
        assert svc.metrics_server is not None
        server = svc.metrics_server
        assert (await http.get(f"{server.url}/healthz")).status_code == 200
        assert server.thread is not None and server.thread.is_alive()
    assert not server.thread.is_alive()
    with pytest.raises(OSError, match="connection attempts failed"):
        await anyio.connect_tcp("127.0.0.1", server.port)


def test_sigterm_stops_a_daemon_serving_metrics(sandbox: Sandbox, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, sandbox, metrics={"listen": f"127.0.0.1:{port}"})
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the metrics endpoint never answered"
            time.sleep(0.1)
        # A client holding a connection open must not hold up the stop.
        with socket.create_connection(("127.0.0.1", port)):
            started = time.monotonic()
            assert stop_daemon(proc) == 0
            assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
