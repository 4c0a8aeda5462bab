#!/usr/bin/env python3
"""Benchmarks of the ``inboxd run`` daemon: throughput, drop latency, start-up, RSS, status.

Five measurements, each against the target from the issue:

* **throughput**: 5,000 files of 4 KiB are written to a staging folder, then ``os.rename``-d
  into the inbox of an idle daemon (``settle_seconds = 0.1``). Measured from the last rename to
  the 5,000th successful ``POST /ingestion/{id}/upload/complete`` in the *sandbox's* request
  log, for the daemon at its defaults (``[upload] workers`` plus the small-file lane
  ``small_files``) and with ``workers`` = N and the lane off (N files in flight; ``--workers``).
  The baseline is a tight loop in its own process making the same three calls per file directly
  with httpx (POST /ingestion, POST .../upload/server multipart, POST .../upload/complete):
  sequentially with ``httpx.Client`` (the target's baseline), and with 4 concurrent tasks on
  ``httpx.AsyncClient`` (the sandbox's ceiling, for context). Rounds are interleaved; ratios
  come from the same round. Target: daemon >= 0.8x the sequential loop.
* **latency**: idle daemon with ``settle_seconds = 1.0``; files renamed in one by one, a second
  apart; per file ``(arrival of its POST /ingestion at the sandbox) - (rename time) - settle``.
  Target p50 <= 200 ms.
* **startup**: 50,000 files (50 folders x 1,000, mtimes two days old, ctimes older than
  ``settle_seconds``) already in the inbox; the API URL points at a closed port so nothing is
  uploaded. Time from ``Popen`` of ``inboxd run`` to all 50,000 jobs in the state database
  (polled read-only with ``Queue.open(readonly=True).counts()``). Target <= 10 s.
* **rss**: a state database with 100,000 jobs built through the ``Queue`` API (mixed states),
  an empty inbox, the API unreachable; VmRSS/VmHWM of the daemon process 10 s after start.
  Target <= 150 MiB.
* **status**: ``inboxd status --config`` and ``--json`` on that database (daemon stopped),
  median of 10 runs, process start included; plus in-process ``status.snapshot()``.
  Target <= 300 ms.

Processes: the sandbox (``daemon.sandbox`` served by uvicorn, plus a ``/__bench/`` side door for
its request log) runs in its own process pinned with ``taskset -c 1``; the daemon
(``python -m daemon run``) and the httpx loop run in their own processes pinned to CPU 0. Only
127.0.0.1 is used. Every child is started in its own session and stopped (SIGTERM, then SIGKILL)
on exit, error, Ctrl-C or SIGTERM. Bytecode goes to a private ``PYTHONPYCACHEPREFIX`` in the work
folder (warmed before timing), as an installed package would have compiled ``.pyc`` files.

Run ``bash bench/daemon_run.sh`` (or ``.venv/bin/python bench/daemon_bench.py``); ``--quick``
for a smoke run, ``--only latency,status`` for a subset, ``--no-write`` to leave the docs alone.
The table is written to ``docs/benchmarks.md`` between ``<!-- daemon-bench:start -->`` and
``<!-- daemon-bench:end -->``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_VENV_PY = REPO / ".venv" / "bin" / "python"
PY = str(_VENV_PY) if _VENV_PY.exists() else sys.executable
INBOXD = REPO / ".venv" / "bin" / "inboxd"
TOKEN = "bench-token"  # the sandbox's token for this run only
KiB = 1024
MiB = 1024 * KiB
DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## Daemon benchmarks (inboxd run)"
START = "<!-- daemon-bench:start -->"
END = "<!-- daemon-bench:end -->"
COMPLETE = "POST /ingestion/{id}/upload/complete"
CREATE = "POST /ingestion"
UPLOAD = "POST /ingestion/{id}/upload/server"
_ROUTES = (
    (re.compile(r"^/api/v1/ingestion$"), "/ingestion"),
    (re.compile(r"^/api/v1/ingestion/\d+/upload/server$"), "/ingestion/{id}/upload/server"),
    (re.compile(r"^/api/v1/ingestion/\d+/upload/complete$"), "/ingestion/{id}/upload/complete"),
)


class Stop(Exception):
    """SIGTERM/SIGINT turned into an exception, so every ``finally`` runs."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise Stop(signal.Signals(signum).name)


# =============================================================================================
# Child processes


class Children:
    """Every process we start; ``stop_all`` ends them (each by its own id, never by name)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        cmd: list[str],
        *,
        log: Path,
        cpu: int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> subprocess.Popen[bytes]:
        if cpu is not None and CTX.pin:
            cmd = ["taskset", "-c", str(cpu), *cmd]  # taskset execs: the pid is the command's
        if CTX.nice:
            cmd = ["nice", "-n", str(CTX.nice), *cmd]  # nice execs too
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env or CTX.env,
                start_new_session=True,  # our Ctrl-C is not theirs; we stop them ourselves
            )
        if CTX.nice:
            # With autogroup scheduling each session is its own group and nice ranks only
            # inside it: the group's own nice value has to be set too.
            with contextlib.suppress(OSError):
                Path(f"/proc/{proc.pid}/autogroup").write_text(str(CTX.nice))
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5.0)
        self.procs.clear()


def proc_cpu(pid: int) -> float:
    """user + system CPU seconds of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon of a live process, in KiB."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, step: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


# =============================================================================================
# The sandbox in its own process (internal command ``_sandbox``)


def cmd_sandbox(ns: argparse.Namespace) -> int:
    """Serve a sandbox on 127.0.0.1 with a ``/__bench/`` side door; write the port to a file."""
    import uvicorn

    from daemon.sandbox import Faults, Sandbox, SandboxConfig

    config = SandboxConfig(
        data_dir=Path(ns.data_dir),
        token=TOKEN,
        host="127.0.0.1",
        port=0,
        import_seconds=ns.import_seconds,
        faults=Faults(api_503_rate=ns.api_503_rate),
    )
    sandbox = Sandbox(config)
    sandbox.prepare()
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto
    # says TCP, and without it every response (headers, then body) waits ~40 ms for a delayed ACK
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = int(sock.getsockname()[1])
    sandbox.bound("127.0.0.1", port)
    app = _BenchDoor(sandbox)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="off",
            ws="none",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            # uvicorn closes a kept-alive connection after 5 s idle by default; behind the WAN
            # bench's delay line its FIN reaches a client RTT/2 late, which then sends on a
            # closed connection ("Server disconnected"). Load balancers keep 60 s and more.
            timeout_keep_alive=120,
        )
    )
    tmp = Path(ns.port_file + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(ns.port_file)  # the socket listens already: connections wait in its backlog
    server.run(sockets=[sock])
    return 0


class _BenchDoor:
    """ASGI wrapper: counts successful completes (with their response time) and serves
    ``GET /__bench/stats`` (cheap, polled) and ``GET /__bench/log`` (the request log)."""

    def __init__(self, sandbox: Any) -> None:
        self.sb = sandbox
        self.completes = 0
        self.creates = 0
        self.complete_done: list[float] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.sb(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/__bench/"):
            await self._door(path, send)
            return
        is_complete = scope["method"] == "POST" and path.endswith("/upload/complete")
        is_create = scope["method"] == "POST" and path == "/api/v1/ingestion"
        status = 0

        async def watched(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                if status == 200 and is_complete:
                    self.completes += 1
                    self.complete_done.append(time.time())
                elif status == 200 and is_create:
                    self.creates += 1

        await self.sb(scope, receive, watched)

    async def _door(self, path: str, send: Any) -> None:
        if path == "/__bench/stats":
            body: Any = {
                "completes": self.completes,
                "creates": self.creates,
                "requests": len(self.sb.requests),
            }
        else:
            states: dict[str, int] = {}
            for ing in list(self.sb.ingestions.values()):
                states[ing.state] = states.get(ing.state, 0) + 1
            body = {
                "requests": [
                    [r.time, r.method, r.route, r.status, r.path] for r in list(self.sb.requests)
                ],
                "complete_done": self.complete_done,
                "ingestions": states,
                "datasets": [[d.path, d.created_at] for d in list(self.sb.datasets.values())],
            }
        raw = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": raw})


@dataclass
class SandboxProc:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    @classmethod
    def start(cls, data_dir: Path, *, api_503_rate: float = 0.0) -> SandboxProc:
        data_dir.mkdir(parents=True, exist_ok=True)
        port_file = data_dir.parent / "sandbox.port"
        proc = CTX.children.spawn(
            [
                PY,
                str(Path(__file__).resolve()),
                "_sandbox",
                "--data-dir",
                str(data_dir),
                "--port-file",
                str(port_file),
                "--api-503-rate",
                str(api_503_rate),
            ],
            log=data_dir.parent / "sandbox.log",
            cpu=CTX.server_cpu,
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"sandbox exited ({proc.returncode}); see its log")
            return port_file.exists()

        wait_for(ready, 30, what="the sandbox to listen")
        sb = cls(proc, int(port_file.read_text()))
        wait_for(lambda: sb._try_stats() is not None, 15, what="the sandbox to answer")
        return sb

    def _get(self, path: str, timeout: float = 30.0) -> Any:
        import httpx

        r = httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=timeout)
        r.raise_for_status()
        return r.json()

    def _try_stats(self) -> dict[str, Any] | None:
        try:
            return self.stats()
        except Exception:
            return None

    def stats(self) -> dict[str, Any]:
        return dict(self._get("/__bench/stats"))

    def log(self) -> dict[str, Any]:
        return dict(self._get("/__bench/log", timeout=120))

    def stop(self) -> None:
        Children.stop(self.proc)


def route_counts(log: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _t, method, route, status, _p in log["requests"]:
        key = f"{route or method} {status}"
        out[key] = out.get(key, 0) + 1
    return out


def _t_of(log: dict[str, Any], route: str, *, ok: bool = True) -> list[float]:
    """Arrival times (sandbox log) of requests on ``route``, sorted."""
    return sorted(t for t, _m, r, s, _p in log["requests"] if r == route and (not ok or s == 200))


# =============================================================================================
# The tight httpx loop in its own process (internal command ``_loop``)


def cmd_loop(ns: argparse.Namespace) -> int:
    """Same three API calls per file, directly with httpx; results as JSON in ``--out``."""
    import resource

    files = sorted(Path(ns.dir).iterdir())
    headers = {"Authorization": f"Bearer {ns.token}"}

    def rusage() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def create_body(path: Path, size: int) -> dict[str, Any]:
        return {
            "stream_id": 1,
            "dataset_name": path.name,
            "file_size": size,
            "metadata": {},
            "overwrite": False,
        }

    if ns.concurrency <= 1:
        import httpx

        with httpx.Client(base_url=ns.url, headers=headers, timeout=30.0) as client:
            cpu0, t0 = rusage(), time.time()
            for path in files:
                data = path.read_bytes()
                r = client.post("/ingestion", json=create_body(path, len(data)))
                r.raise_for_status()
                ing = r.json()
                if ing["mode"] != "server":
                    raise SystemExit(f"expected mode 'server', got {ing['mode']!r}")
                iid = ing["ingestion_id"]
                r = client.post(
                    f"/ingestion/{iid}/upload/server",
                    files={"file": (path.name, data, "application/octet-stream")},
                )
                r.raise_for_status()
                client.post(f"/ingestion/{iid}/upload/complete").raise_for_status()
            t1, cpu1 = time.time(), rusage()
    else:
        import anyio
        import httpx

        async def run() -> tuple[float, float, float, float]:
            # One kept-alive connection per file in flight: httpx keeps 20 by default, and
            # every connection beyond that would be closed and opened again (a handshake each).
            limits = httpx.Limits(
                max_connections=ns.concurrency, max_keepalive_connections=ns.concurrency
            )
            async with httpx.AsyncClient(
                base_url=ns.url, headers=headers, timeout=30.0, limits=limits
            ) as client:
                if ns.netio:
                    # inboxd's socket layer under the same loop (context: what httpx costs
                    # without anyio's per-call overhead; see daemon/net/backend.py)
                    from daemon.net import backend

                    backend.adopt(client)
                todo = iter(files)

                async def worker() -> None:
                    for path in todo:
                        data = await anyio.Path(path).read_bytes()
                        r = await client.post("/ingestion", json=create_body(path, len(data)))
                        r.raise_for_status()
                        iid = r.json()["ingestion_id"]
                        r = await client.post(
                            f"/ingestion/{iid}/upload/server",
                            files={"file": (path.name, data, "application/octet-stream")},
                        )
                        r.raise_for_status()
                        r = await client.post(f"/ingestion/{iid}/upload/complete")
                        r.raise_for_status()

                c0, s0 = rusage(), time.time()
                async with anyio.create_task_group() as tg:
                    for _ in range(ns.concurrency):
                        tg.start_soon(worker)
                return s0, time.time(), c0, rusage()

        t0, t1, cpu0, cpu1 = anyio.run(run)
    Path(ns.out).write_text(
        json.dumps({"t_begin": t0, "t_end": t1, "cpu": cpu1 - cpu0, "files": len(files)})
    )
    return 0


# =============================================================================================
# The daemon


def write_config(
    path: Path,
    *,
    url: str,
    inbox: Path,
    state: Path,
    settle: float,
    workers: int | None = None,
    small_files: int | None = None,
    timeout: float | None = None,
) -> Path:
    """A minimal config: everything not named here keeps its default."""
    upload = "stream = 1\n" + (f"workers = {workers}\n" if workers is not None else "")
    upload += f"small_files = {small_files}\n" if small_files is not None else ""
    api = f'url = "{url}"\ntoken = "{TOKEN}"\n' + (
        f"timeout = {timeout}\n" if timeout is not None else ""
    )
    path.write_text(
        f"[api]\n{api}\n"
        f"[upload]\n{upload}\n"
        f'[inbox]\npath = "{inbox}"\nsettle_seconds = {settle}\n\n'
        f'[state]\npath = "{state}"\n\n'
        '[log]\nformat = "json"\nlevel = "info"\n'
    )
    return path


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    # cwd = the run folder: `python -m` puts the cwd first on sys.path, and the repository's
    # own daemon/ must not shadow a --daemon-path tree
    return CTX.children.spawn(
        [PY, "-m", "daemon", "run", "--config", str(config), "--grace", "3"],
        log=log,
        cpu=CTX.client_cpu,
        env=CTX.daemon_env,
        cwd=config.parent,
    )


def log_events(log: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


def event_time(ev: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(ev["timestamp"]).timestamp()


def wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> float:
    """Wait for the daemon's ``daemon.ready`` log line; return its time."""

    def ready() -> float | None:
        if proc.poll() is not None:
            raise RuntimeError(f"inboxd run exited ({proc.returncode}); see {log}")
        for ev in log_events(log):
            if ev.get("event") == "daemon.ready":
                return event_time(ev)
        return None

    return float(wait_for(ready, timeout, step=0.05, what="daemon.ready"))


def make_files(folder: Path, n: int, size: int, *, prefix: str = "f") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:05d}.bin"
        with p.open("wb") as fh:
            fh.write(os.urandom(size))
        paths.append(p)
    return paths


def queue_counts(db: Path) -> dict[str, int] | None:
    import anyio

    from daemon.state import Queue, QueueError

    async def read() -> dict[str, int] | None:
        try:
            q = await Queue.open(db, readonly=True)
        except QueueError:
            return None
        try:
            return await q.counts()
        finally:
            await q.close()

    return anyio.run(read)


def job_total(counts: dict[str, int] | None) -> int:
    return sum(v for k, v in (counts or {}).items() if k != "settling")


# =============================================================================================
# Benchmarks


@dataclass
class Ctx:
    work: Path = Path()
    env: dict[str, str] = field(default_factory=dict)
    daemon_env: dict[str, str] = field(default_factory=dict)
    children: Children = field(default_factory=Children)
    pin: bool = True
    #: nice value of every process the benchmark starts (--nice); 0 = as inherited
    nice: int = 0
    client_cpu: int | None = 0
    server_cpu: int | None = 1
    load: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    py_spy: str | None = None
    profile_workers: str = "default"
    keep: bool = False
    t0: float = 0.0
    last_round_s: float = 0.0


CTX = Ctx()


def _default_small_files() -> int:
    """``[upload] small_files`` when the config does not set it."""
    from daemon.config import UploadSettings

    return int(UploadSettings.model_fields["small_files"].default)


def _default_workers() -> int:
    """``[upload] workers`` when the config does not set it (read from the settings model)."""
    from daemon.config import UploadSettings

    return int(UploadSettings.model_fields["workers"].default)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def note_load(what: str) -> None:
    CTX.load.append((what, loadavg()))


def say(text: str) -> None:
    print(text, flush=True)


def _fresh(name: str) -> Path:
    run = CTX.work / name
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    return run


def _cleanup_run(run: Path) -> None:
    if not CTX.keep:
        shutil.rmtree(run, ignore_errors=True)


def throughput_daemon(workers: str, n: int, size: int, settle: float, tag: str) -> dict[str, Any]:
    """One daemon run; ``workers``: "default" (the config leaves [upload] alone) or N (that
    many workers and no small-file lane: N files in flight)."""
    run = _fresh(f"tp-daemon-w{workers}-{tag}")
    fixed = None if workers == "default" else int(workers)
    staging, inbox = run / "staging", run / "inbox"
    names = [p.name for p in make_files(staging, n, size)]
    inbox.mkdir()
    sb = SandboxProc.start(run / "sandbox")
    cfg = write_config(
        run / "config.toml",
        url=sb.url,
        inbox=inbox,
        state=run / "state" / "state.db",
        settle=settle,
        workers=fixed,
        small_files=None if fixed is None else 0,
    )
    dlog = run / "daemon.log"
    daemon = start_daemon(cfg, dlog)
    spy: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(daemon, dlog)
        time.sleep(0.5)  # idle: heartbeat written, workers asleep
        if CTX.py_spy and workers == CTX.profile_workers and tag == "r1":
            spy = _spy(
                daemon.pid, CTX.work / f"profile-throughput-w{workers}.txt", run / "py-spy.log"
            )
            time.sleep(1.0)
        cpu_d0, cpu_s0 = proc_cpu(daemon.pid), proc_cpu(sb.proc.pid)
        t_first = time.time()
        for name in names:
            os.rename(staging / name, inbox / name)
        t_in = time.time()
        wait_for(lambda: sb.stats()["completes"] >= n, 240, step=0.1, what=f"{n} completes")
        t_seen = time.time()
        cpu_d1, cpu_s1 = proc_cpu(daemon.pid), proc_cpu(sb.proc.pid)
        _spy_stop(spy)
        log = sb.log()
    finally:
        rc = Children.stop(daemon)
        sb.stop()
    if CTX.keep:
        (run / "sandbox-requests.json").write_text(json.dumps(log))
    completes = _t_of(log, COMPLETE)
    t_end = completes[n - 1]
    creates = _t_of(log, CREATE)
    counts = queue_counts(run / "state" / "state.db") or {}
    events = log_events(dlog)
    problems = [e for e in events if e.get("level") in ("warning", "error")]
    elapsed = t_end - t_in
    res = {
        "kind": "daemon",
        "workers": workers,
        "tag": tag,
        "files": n,
        "rename_s": t_in - t_first,
        "elapsed_s": elapsed,
        "rate": n / elapsed,
        "rate_minus_settle": n / (elapsed - settle),
        "first_create_after_in_s": creates[0] - t_in if creates else None,
        "steady_rate": _steady_rate(completes[:n]),
        "cpu_per_file_ms": 1000 * (cpu_d1 - cpu_d0) / n,
        "client_cpu_util": (cpu_d1 - cpu_d0) / (t_seen - t_in),
        "sandbox_cpu_util": (cpu_s1 - cpu_s0) / (t_seen - t_in),
        "routes": route_counts(log),
        "ingestions": log["ingestions"],
        "queue": counts,
        "daemon_rc": rc,
        "warnings": len(problems),
        "load": loadavg(),
    }
    if counts.get("failed") or job_total(counts) != n:
        CTX.notes.append(f"throughput w={workers} {tag}: unexpected queue counts {counts}")
    _cleanup_run(run)
    return res


def _spy(pid: int, out: Path, log: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` (raw collapsed stacks, for flame graphs or grep) until stopped."""
    assert CTX.py_spy is not None
    cmd = [CTX.py_spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(out)]
    # default: sample without stopping the process (less overhead, some torn stacks);
    # e.g. DAEMON_BENCH_PY_SPY_ARGS="--rate 100 --gil" for consistent stacks of GIL holders
    extra = os.environ.get("DAEMON_BENCH_PY_SPY_ARGS", "--rate 200 --nonblocking").split()
    return CTX.children.spawn([*cmd, *extra], log=log)


def _spy_stop(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None and spy.poll() is None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(30)


def throughput_loop(concurrency: int, n: int, size: int, tag: str) -> dict[str, Any]:
    run = _fresh(f"tp-loop-c{concurrency}-{tag}")
    make_files(run / "files", n, size)
    sb = SandboxProc.start(run / "sandbox")
    out = run / "loop.json"
    try:
        cpu_s0 = proc_cpu(sb.proc.pid)
        p = CTX.children.spawn(
            [
                PY,
                str(Path(__file__).resolve()),
                "_loop",
                "--url",
                sb.url,
                "--token",
                TOKEN,
                "--dir",
                str(run / "files"),
                "--concurrency",
                str(concurrency),
                "--out",
                str(out),
            ],
            log=run / "loop.log",
            cpu=CTX.client_cpu,
        )
        rc = p.wait(600)
        cpu_s1 = proc_cpu(sb.proc.pid)
        if rc != 0:
            tail = (run / "loop.log").read_text()[-2000:]
            raise RuntimeError(f"httpx loop failed ({rc}): {tail}")
        res_loop = json.loads(out.read_text())
        log = sb.log()
    finally:
        sb.stop()
    completes = _t_of(log, COMPLETE)
    t_end = completes[n - 1]
    elapsed = t_end - res_loop["t_begin"]
    res = {
        "kind": "loop",
        "concurrency": concurrency,
        "tag": tag,
        "files": n,
        "elapsed_s": elapsed,
        "rate": n / elapsed,
        "steady_rate": _steady_rate(completes[:n]),
        "cpu_per_file_ms": 1000 * res_loop["cpu"] / n,
        "client_cpu_util": res_loop["cpu"] / (res_loop["t_end"] - res_loop["t_begin"]),
        "sandbox_cpu_util": (cpu_s1 - cpu_s0) / (res_loop["t_end"] - res_loop["t_begin"]),
        "routes": route_counts(log),
        "ingestions": log["ingestions"],
        "load": loadavg(),
    }
    _cleanup_run(run)
    return res


def _steady_rate(times: list[float]) -> float | None:
    """Completes per second between the 10th and the 90th percentile complete."""
    if len(times) < 20:
        return None
    a, b = times[len(times) // 10], times[(len(times) * 9) // 10]
    return (len(times) * 8 // 10) / (b - a) if b > a else None


def bench_throughput(a: argparse.Namespace) -> dict[str, Any]:
    say(
        f"\n== throughput: {a.files} files x {a.file_kib} KiB, settle {a.tp_settle} s, "
        f"daemon workers {a.workers}, loop concurrency {a.loop_concurrency}, {a.rounds} round(s)"
    )
    note_load("throughput start")
    runs: list[dict[str, Any]] = []
    done_rounds = 0
    for rnd in range(1, a.rounds + 1):
        t_round = time.monotonic()
        if rnd > 1:
            # the suite must stay bounded: skip a round that would overrun --budget
            last = CTX.last_round_s
            if time.monotonic() - CTX.t0 + last > a.budget:
                say(f"  round {rnd} skipped: it would end after the {a.budget:.0f} s budget")
                CTX.notes.append(f"throughput: only {done_rounds} round(s) fit the budget")
                break
        order: list[tuple[str, int]] = [("loop", c) for c in a.loop_concurrency[:1]]
        order += [("daemon", w) for w in a.workers]
        if rnd == 1:  # the context loops (other concurrency) once
            order += [("loop", c) for c in a.loop_concurrency[1:]]
        if rnd % 2 == 0:
            order.reverse()
        for kind, k in order:
            tag = f"r{rnd}"
            if (
                kind == "loop"
                and k != a.loop_concurrency[0]
                and time.monotonic() - CTX.t0 > a.budget
            ):
                say(f"  loop c={k} skipped: past the {a.budget:.0f} s budget")
                continue
            if kind == "loop":
                r = throughput_loop(k, a.files, a.file_kib * KiB, tag)
                say(
                    f"  round {rnd} loop c={k}: {r['rate']:.0f} files/s "
                    f"({r['elapsed_s']:.2f} s, client CPU {r['client_cpu_util']:.0%}, "
                    f"sandbox CPU {r['sandbox_cpu_util']:.0%}, load {r['load']})"
                )
            else:
                r = throughput_daemon(k, a.files, a.file_kib * KiB, a.tp_settle, tag)
                say(
                    f"  round {rnd} daemon w={k}: {r['rate']:.0f} files/s "
                    f"({r['elapsed_s']:.2f} s, first POST +{r['first_create_after_in_s']:.2f} s, "
                    f"daemon CPU {r['client_cpu_util']:.0%} = {r['cpu_per_file_ms']:.2f} ms/file, "
                    f"sandbox CPU {r['sandbox_cpu_util']:.0%}, load {r['load']})"
                )
            runs.append(r)
        done_rounds += 1
        CTX.last_round_s = time.monotonic() - t_round
    note_load("throughput end")
    return {
        "runs": runs,
        "settle": a.tp_settle,
        "files": a.files,
        "kib": a.file_kib,
        "workers": a.workers,
        "loops": a.loop_concurrency,
        "rounds": done_rounds,
    }


def bench_latency(a: argparse.Namespace) -> dict[str, Any]:
    settle = a.lat_settle
    say(f"\n== latency: {a.lat_files} files, one every {a.lat_interval} s, settle {settle} s")
    note_load("latency start")
    run = _fresh("latency")
    staging, inbox = run / "staging", run / "inbox"
    staging.mkdir()
    inbox.mkdir()
    sb = SandboxProc.start(run / "sandbox")
    cfg = write_config(
        run / "config.toml",
        url=sb.url,
        inbox=inbox,
        state=run / "state" / "state.db",
        settle=settle,
    )
    dlog = run / "daemon.log"
    daemon = start_daemon(cfg, dlog)
    renamed: dict[str, float] = {}
    try:
        wait_ready(daemon, dlog)
        time.sleep(1.5)  # idle
        t0 = time.time() + 0.2
        for i in range(a.lat_files):
            name = f"drop{i:03d}.bin"
            with (staging / name).open("wb") as fh:
                fh.write(os.urandom(4 * KiB))
            delay = t0 + i * a.lat_interval - time.time()
            if delay > 0:
                time.sleep(delay)
            t = time.time()
            os.rename(staging / name, inbox / name)
            renamed[name] = t
        wait_for(
            lambda: sb.stats()["completes"] >= a.lat_files,
            60,
            step=0.1,
            what="the dropped files' completes",
        )
        log = sb.log()
    finally:
        rc = Children.stop(daemon)
        sb.stop()
    creates = _t_of(log, CREATE, ok=False)
    created_at = {path: t for path, t in log["datasets"]}
    events = log_events(dlog)
    ready_at: dict[str, float] = {}
    for ev in events:
        if ev.get("event") == "watcher.ready" and ev.get("count") == 1:
            ready_at.setdefault(ev["first"], event_time(ev))
    rows = []
    for name, t_ren in renamed.items():
        made = created_at.get(name)
        if made is None:
            continue
        # the POST /ingestion that made this dataset: the last one to arrive before it existed
        t_req = max((t for t in creates if t <= made + 1e-6), default=made)
        rows.append(
            {
                "file": name,
                "beyond_settle_ms": 1000 * (t_req - t_ren - settle),
                "watcher_ms": 1000 * (ready_at[name] - t_ren - settle)
                if name in ready_at
                else None,
                "queue_to_post_ms": 1000 * (t_req - ready_at[name]) if name in ready_at else None,
            }
        )
    _cleanup_run(run)
    note_load("latency end")
    vals = sorted(r["beyond_settle_ms"] for r in rows)
    res = {
        "settle": settle,
        "files": a.lat_files,
        "measured": len(rows),
        "daemon_rc": rc,
        "p50": _pct(vals, 50),
        "p90": _pct(vals, 90),
        "max": max(vals) if vals else None,
        "min": min(vals) if vals else None,
        "watcher_p50": _pct(
            sorted(r["watcher_ms"] for r in rows if r["watcher_ms"] is not None), 50
        ),
        "queue_to_post_p50": _pct(
            sorted(r["queue_to_post_ms"] for r in rows if r["queue_to_post_ms"] is not None), 50
        ),
        "rows": rows,
    }
    say(
        f"  beyond settle: p50 {res['p50']:.0f} ms, p90 {res['p90']:.0f} ms, "
        f"max {res['max']:.0f} ms ({len(rows)}/{a.lat_files} files); of which watcher "
        f"(rename→watcher.ready - settle) p50 {res['watcher_p50']:.0f} ms, "
        f"watcher.ready→POST p50 {res['queue_to_post_p50']:.0f} ms"
    )
    return res


def _pct(vals: list[float], p: float) -> float | None:
    if not vals:
        return None
    k = (len(vals) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def bench_startup(a: argparse.Namespace) -> dict[str, Any]:
    n, per = a.startup_files, a.startup_per_dir
    settle = 5.0  # the default
    say(
        f"\n== startup: {n} files ({per} per folder) in the inbox, settle {settle} s (default), "
        f"API: {', '.join(a.startup_api)}"
    )
    run = _fresh("startup")
    inbox = run / "inbox"
    old = time.time() - 2 * 86400
    t_make = time.time()
    for i in range(n):
        d = inbox / f"day{i // per:03d}"
        if i % per == 0:
            d.mkdir(parents=True)
        p = d / f"log{i:06d}.bin"
        with p.open("wb") as fh:
            fh.write(b"x" * KiB)
        os.utime(p, (old, old))
    t_made = time.time()
    say(f"  made {n} files in {t_made - t_make:.1f} s")
    # ctime is the time of our utime(); the watcher waits until ctime + settle has passed, so
    # make every file "old" before the start (a restart with a backlog, not files being written)
    wait = t_made + settle + 0.5 - time.time()
    if wait > 0:
        time.sleep(wait)
    os.sync()
    variants = {}
    for api in a.startup_api:
        variants[api] = _startup_run(run, inbox, api, n, settle, a.startup_timeout)
    _cleanup_run(run)
    return {"files": n, "per_dir": per, "settle": settle, "variants": variants}


def _startup_run(
    run: Path, inbox: Path, api: str, n: int, settle: float, timeout: float
) -> dict[str, Any]:
    """One daemon start on the prepared inbox. ``api``: "closed" = nothing listens (workers
    fail fast and put jobs back, over and over); "blackhole" = a socket that accepts (kernel
    backlog) but never answers, so each worker hangs in its first request for [api] timeout."""
    sub = run / api
    sub.mkdir()
    hole: socket.socket | None = None
    if api == "blackhole":
        hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        hole.bind(("127.0.0.1", 0))
        hole.listen(4096)
        port = int(hole.getsockname()[1])
    else:
        port = closed_port()
    db = sub / "state" / "state.db"
    cfg = write_config(
        sub / "config.toml",
        url=f"http://127.0.0.1:{port}/api/v1",
        inbox=inbox,
        state=db,
        settle=settle,
    )
    dlog = sub / "daemon.log"
    note_load(f"startup ({api}) start")
    t0 = time.time()
    daemon = start_daemon(cfg, dlog)
    samples: list[tuple[float, int]] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        if CTX.py_spy:  # attach once the interpreter is up (the first log line is written)
            wait_for(lambda: dlog.exists() and dlog.stat().st_size > 0, 30, step=0.02)
            spy = _spy(daemon.pid, CTX.work / f"profile-startup-{api}.txt", sub / "py-spy.log")

        def all_queued() -> bool:
            c = queue_counts(db) if db.exists() else None
            total = job_total(c)
            if not samples or samples[-1][1] != total:
                samples.append((time.time() - t0, total))
            if daemon.poll() is not None:
                raise RuntimeError(f"inboxd run exited ({daemon.returncode}); see {dlog}")
            return total >= n

        try:
            wait_for(all_queued, timeout, step=0.1, what=f"{n} jobs queued")
            t_all: float | None = time.time()
        except TimeoutError:
            t_all = None  # reported as "> timeout", with how many were queued by then
        cpu = proc_cpu(daemon.pid)
        _spy_stop(spy)
        ready = wait_ready(daemon, dlog, timeout=30) if t_all is not None else float("nan")
        mem = proc_mem(daemon.pid)
        counts = queue_counts(db)
    finally:
        rc = Children.stop(daemon)
        if hole is not None:
            hole.close()
    events = log_events(dlog)
    first_event = min((event_time(e) for e in events if "timestamp" in e), default=None)
    started = next((e for e in events if e.get("event") == "watcher.started"), {})
    backoffs = sum(1 for e in events if e.get("event") == "job.backoff")
    note_load(f"startup ({api}) end")
    res = {
        "api": api,
        "all_queued_s": t_all - t0 if t_all is not None else None,
        "timeout_s": timeout,
        "queued_at_timeout": None if t_all is not None else job_total(counts),
        "cpu_s": cpu,
        "ready_s": ready - t0,
        "first_log_s": first_event - t0 if first_event else None,
        "watcher_scan_s": started.get("seconds"),
        "rss_kib": mem.get("VmRSS"),
        "hwm_kib": mem.get("VmHWM"),
        "counts": counts,
        "samples": samples[-8:],
        "backoffs": backoffs,
        "daemon_rc": rc,
    }
    if t_all is None:
        say(f"  API {api}: only {res['queued_at_timeout']} of {n} queued after {timeout:.0f} s")
        return res
    say(
        f"  API {api}: all {n} queued after {res['all_queued_s']:.2f} s (first log line "
        f"{res['first_log_s']:.2f} s = interpreter+imports+config, daemon.ready "
        f"{res['ready_s']:.2f} s, watcher start-up {res['watcher_scan_s']} s); "
        f"{backoffs} job.backoff lines meanwhile; daemon CPU {cpu:.1f} s; RSS then "
        f"{mem.get('VmRSS', 0) / 1024:.0f} MiB"
    )
    return res


async def _build_db(db: Path, n: int, mix: dict[str, int]) -> dict[str, Any]:
    """``n`` jobs through ``enqueue_many``, then transitions through the Queue API."""
    import anyio

    from daemon.state import FileIdentity, NewJob, Queue, Stage

    t = time.perf_counter()
    q = await Queue.open(db)
    try:
        base = 1_760_000_000_000_000_000
        batch = 5000
        for start in range(0, n, batch):
            items = []
            for i in range(start, min(n, start + batch)):
                rel = f"vehicle{i % 7}/day{i // 1000:03d}/run{i:06d}.mf4"
                items.append(
                    NewJob(
                        FileIdentity(rel, 4 * MiB + i, base + i * 1000, 5_000_000 + i),
                        1,
                        rel,
                        {"vehicle": f"vehicle{i % 7}"},
                    )
                )
            await q.enqueue_many(items)
        t_enq = time.perf_counter() - t
        owner = "bench-builder"
        for _ in range(mix["done"] + mix["importing"]):
            job = await q.claim(owner, 60)
            assert job is not None
            await q.save_progress(
                job.id,
                stage=Stage.COMPLETED,
                ingestion_id=job.id,
                remote_id=job.id,
                mode="multipart",
                part_size=5 * MiB,
                bytes_sent=job.identity.size,
            )
            await q.mark_uploaded(job.id)
            if mix["done"]:
                mix = {**mix, "done": mix["done"] - 1}
                await q.record_import(
                    job.id,
                    status="FINISHED",
                    progress=100.0,
                    message=None,
                    terminal=True,
                    failed=False,
                )
                await q.set_after_upload(job.id, "kept")
            else:
                await q.record_import(
                    job.id,
                    status="IMPORTING",
                    progress=40.0,
                    message=None,
                    terminal=False,
                    failed=False,
                )
        for _ in range(mix["failed"]):
            job = await q.claim(owner, 60)
            assert job is not None
            await q.mark_failed(
                job.id,
                error="the server refused to complete the upload: size mismatch",
                kind="size_mismatch",
            )
        for _ in range(mix["retrying"]):
            job = await q.claim(owner, 60)
            assert job is not None
            await q.retry_later(
                job.id, error="POST /ingestion: HTTP 503", kind="server", delay=3600.0
            )
        counts = await q.counts()
    finally:
        await q.close()
    size = await anyio.Path(db).stat()
    return {
        "enqueue_s": t_enq,
        "total_s": time.perf_counter() - t,
        "counts": counts,
        "db_mib": size.st_size / MiB,
    }


def bench_rss_status(a: argparse.Namespace, do_rss: bool, do_status: bool) -> dict[str, Any]:
    import anyio

    n = a.rss_jobs
    mix = {
        "done": a.rss_done,
        "importing": a.rss_importing,
        "failed": a.rss_failed,
        "retrying": a.rss_retrying,
    }
    run = _fresh("rss")
    db = run / "state" / "state.db"
    say(
        f"\n== building a state database with {n} jobs through the Queue API "
        f"(transitions: {mix}; the rest stay queued)"
    )
    built = anyio.run(_build_db, db, n, mix)
    say(
        f"  built in {built['total_s']:.1f} s (enqueue_many {built['enqueue_s']:.1f} s), "
        f"{built['db_mib']:.0f} MiB: {built['counts']}"
    )
    inbox = run / "inbox"
    inbox.mkdir()
    cfg = write_config(
        run / "config.toml",
        url=f"http://127.0.0.1:{closed_port()}/api/v1",
        inbox=inbox,
        state=db,
        settle=5.0,
    )
    res: dict[str, Any] = {"jobs": n, "build": built}
    if do_rss:
        say(
            f"\n== rss: daemon on the {n}-job database, empty inbox, API = closed port, "
            f"{a.rss_seconds:.0f} s"
        )
        note_load("rss start")
        res["rss"] = _rss_run(cfg, run / "daemon.log", a.rss_seconds)
        # the same daemon on an empty database: what the interpreter and imports cost alone
        empty = run / "empty"
        empty.mkdir()
        cfg0 = write_config(
            empty / "config.toml",
            url=f"http://127.0.0.1:{closed_port()}/api/v1",
            inbox=inbox,
            state=empty / "state.db",
            settle=5.0,
        )
        res["rss_empty"] = _rss_run(cfg0, empty / "daemon.log", a.rss_seconds)
        r, r0 = res["rss"], res["rss_empty"]
        say(
            f"  100k jobs: VmRSS {r['rss_kib'] / 1024:.1f} MiB, VmHWM {r['hwm_kib'] / 1024:.1f} "
            f"MiB (max sampled {r['max_rss_kib'] / 1024:.1f} MiB); empty DB: VmRSS "
            f"{r0['rss_kib'] / 1024:.1f} MiB, VmHWM {r0['hwm_kib'] / 1024:.1f} MiB"
        )
        note_load("rss end")
    if do_status:
        res["status"] = _status_runs(cfg, db, a.status_runs)
    _cleanup_run(run)
    return res


def _rss_run(cfg: Path, dlog: Path, seconds: float) -> dict[str, Any]:
    t0 = time.time()
    daemon = start_daemon(cfg, dlog)
    samples: list[tuple[float, dict[str, int]]] = []
    try:
        ready = wait_ready(daemon, dlog)
        while time.time() - t0 < seconds:
            samples.append((time.time() - t0, proc_mem(daemon.pid)))
            time.sleep(0.25)
        mem = proc_mem(daemon.pid)
        cpu = proc_cpu(daemon.pid)
    finally:
        rc = Children.stop(daemon)
    events = log_events(dlog)
    kinds: dict[str, int] = {}
    for ev in events:
        kinds[ev.get("event", "?")] = kinds.get(ev.get("event", "?"), 0) + 1
    return {
        "seconds": seconds,
        "ready_s": ready - t0,
        "rss_kib": mem.get("VmRSS", 0),
        "hwm_kib": mem.get("VmHWM", 0),
        "anon_kib": mem.get("RssAnon", 0),
        "max_rss_kib": max((m.get("VmRSS", 0) for _, m in samples), default=0),
        "cpu_s": cpu,
        "daemon_rc": rc,
        "events": dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:6]),
    }


def _status_runs(cfg: Path, db: Path, runs: int) -> dict[str, Any]:
    import anyio

    from daemon.commands import status
    from daemon.state import Queue

    say(
        f"\n== status: `inboxd status --config` and `--json` on the database, daemon stopped, "
        f"median of {runs} runs (process start included)"
    )
    note_load("status start")
    exe = [str(INBOXD)] if INBOXD.exists() else [PY, "-m", "daemon"]
    denv = CTX.daemon_env
    cold_env = {k: v for k, v in denv.items() if k != "PYTHONPYCACHEPREFIX"}
    cold_env["PYTHONDONTWRITEBYTECODE"] = "1"
    out: dict[str, Any] = {"exe": exe, "runs": runs}
    for label, extra, env in (
        ("status", [], denv),
        ("status --json", ["--json"], denv),
        ("status (no bytecode cache)", [], cold_env),
        ("python -m daemon --version", None, denv),
        ("python -c pass", "pass", denv),
    ):
        if extra is None:
            cmd = [PY, "-m", "daemon", "--version"]
        elif extra == "pass":
            cmd = [PY, "-c", "pass"]
        else:
            cmd = [*exe, "status", "--config", str(cfg), *extra]
        subprocess.run(cmd, env=env, cwd=CTX.work, capture_output=True, check=False)  # warm
        times, cpus = [], []
        rc = 0
        for _ in range(runs):
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            p = subprocess.run(cmd, env=env, cwd=CTX.work, capture_output=True, check=False)
            times.append(time.perf_counter() - t)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            rc = rc or p.returncode
        out[label] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "cpu_s": statistics.median(cpus),
            "rc": rc,
        }
        say(
            f"  {label}: median {1000 * statistics.median(times):.0f} ms "
            f"(min {1000 * min(times):.0f}, max {1000 * max(times):.0f}; CPU "
            f"{1000 * statistics.median(cpus):.0f} ms), exit {rc}"
        )

    async def in_process() -> dict[str, float]:
        q = await Queue.open(db, readonly=True)
        try:
            snaps, renders = [], []
            for _ in range(runs):
                t = time.perf_counter()
                snap = await status.snapshot(q)
                snaps.append(time.perf_counter() - t)
                t = time.perf_counter()
                status.render(snap)
                status.to_json(snap)
                renders.append(time.perf_counter() - t)
            t = time.perf_counter()
            await q.counts()
            counts_t = time.perf_counter() - t
        finally:
            await q.close()
        return {
            "snapshot_s": statistics.median(snaps),
            "render_s": statistics.median(renders),
            "counts_s": counts_t,
        }

    out["in_process"] = anyio.run(in_process)
    ip = out["in_process"]
    say(
        f"  in-process status.snapshot(): median {1000 * ip['snapshot_s']:.1f} ms "
        f"(render+to_json {1000 * ip['render_s']:.1f} ms, counts() {1000 * ip['counts_s']:.1f} ms)"
    )
    # import cost of the status command's modules, in a fresh interpreter
    probe = (
        "import time; t=time.perf_counter(); import daemon.commands.cli; a=time.perf_counter(); "
        "from daemon.commands import status; b=time.perf_counter(); "
        "print(round(a-t,3), round(b-a,3))"
    )
    p = subprocess.run([PY, "-c", probe], env=denv, cwd=CTX.work, capture_output=True, text=True)
    with contextlib.suppress(ValueError):
        cli_s, status_s = (float(x) for x in p.stdout.split())
        out["import_cli_s"], out["import_status_s"] = cli_s, status_s
        say(
            f"  imports in a fresh interpreter: daemon.commands.cli {1000 * cli_s:.0f} ms, then "
            f"daemon.commands.status (→ daemon.service.run) {1000 * status_s:.0f} ms"
        )
    note_load("status end")
    return out


# =============================================================================================
# Report


def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    py = subprocess.run(
        [PY, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": py or platform.python_version(),
        "kernel": platform.release(),
    }


def _ok(flag: bool) -> str:
    return "met" if flag else "**MISSED**"


def _med(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def report(results: dict[str, Any], facts: dict[str, str], command: str) -> str:
    L: list[str] = []
    L.append(
        f"Run {facts['date']}: {facts['nproc']} CPUs ({facts['cpu']}), Python "
        f"{facts['python']}, Linux {facts['kernel']}. Command: `{command}`."
    )
    pin = (
        "sandbox pinned to CPU 1, daemon / httpx loop to CPU 0 (`taskset`)"
        if CTX.pin
        else "no CPU pinning"
    )
    L.append(
        f"Processes: sandbox, daemon (`python -m daemon run`) and httpx loop each in their "
        f"own process; {pin}; 127.0.0.1 only; bytecode cache warm (private "
        "`PYTHONPYCACHEPREFIX`). Load average (1/5/15 min) during the run: "
        + "; ".join(f"{w}: {v}" for w, v in CTX.load)
        + ". Wall-clock figures move with other load on the host; CPU time (user+sys from "
        "/proc, per file or per command) does not, and is the figure to compare across runs."
    )
    L.append("")
    rows: list[tuple[str, str, str, str]] = []
    tp = results.get("throughput")
    if tp:
        runs = tp["runs"]
        loops = {
            c: [r for r in runs if r["kind"] == "loop" and r["concurrency"] == c]
            for c in tp["loops"]
        }
        base = tp["loops"][0]
        for c, rs in loops.items():
            if not rs:
                continue
            desc = "sequential `httpx.Client`" if c <= 1 else f"`httpx.AsyncClient`, {c} concurrent"
            rows.append(
                (
                    f"httpx loop, {desc}: files/s",
                    f"{_med([r['rate'] for r in rs]):.0f}",
                    "baseline" if c == base else "context",
                    _detail_tp(rs),
                )
            )
        for w in tp["workers"]:
            rs = [r for r in runs if r["kind"] == "daemon" and r["workers"] == w]
            if not rs:
                continue
            ratios = []
            for r in rs:
                same = [x for x in loops[base] if x["tag"] == r["tag"]]
                if same:
                    ratios.append(r["rate"] / same[0]["rate"])
            ratio = _med(ratios)
            first = _med([r["first_create_after_in_s"] for r in rs])
            cpu = _med([r["cpu_per_file_ms"] for r in rs])
            if w == "default":
                name = (
                    f"daemon at defaults ({_default_workers()} workers + "
                    f"{_default_small_files()} small-file slots)"
                )
                verdict = (
                    f"{ratio:.2f}x loop → {_ok(ratio >= 1.0)} (≥ 1.0x); {cpu:.2f} ms CPU/file "
                    f"→ {_ok(cpu <= 1.5)} (≤ 1.5 ms)"
                )
            else:
                name = f"daemon, workers = {w}, small_files = 0"
                verdict = f"{ratio:.2f}x loop (context)"
            rows.append(
                (
                    f"{name}: files/s (raw / minus settle)",
                    f"{_med([r['rate'] for r in rs]):.0f} / "
                    f"{_med([r['rate_minus_settle'] for r in rs]):.0f}",
                    verdict,
                    _detail_tp(rs)
                    + f"; first POST /ingestion {1000 * first:.0f} ms after the last rename",
                )
            )
    lat = results.get("latency")
    if lat:
        rows.append(
            (
                f"drop → first request, beyond settle ({lat['measured']} files, settle "
                f"{lat['settle']:g} s): p50 / p90 / max",
                f"{lat['p50']:.0f} / {lat['p90']:.0f} / {lat['max']:.0f} ms",
                f"{_ok(lat['p50'] <= 200)} (p50 ≤ 200 ms)",
                f"rename → `watcher.ready` - settle p50 {lat['watcher_p50']:.0f} ms; "
                f"`watcher.ready` → POST p50 {lat['queue_to_post_p50']:.0f} ms",
            )
        )
    st = results.get("startup")
    if st:
        for api, v in st["variants"].items():
            how = {
                "closed": "API = closed port (workers fail fast and re-queue, "
                f"{v['backoffs']:,} `job.backoff` lines meanwhile)",
                "blackhole": "API = a port that accepts but never answers (workers parked)",
            }[api]
            if v["all_queued_s"] is None:
                rows.append(
                    (
                        f"start-up with {st['files']:,} files in the inbox → all queued; {how}",
                        f"> {v['timeout_s']:.0f} s",
                        f"{_ok(False)} (≤ 10 s)",
                        f"only {v['queued_at_timeout']:,} queued when the benchmark gave up; "
                        f"daemon CPU {v['cpu_s']:.1f} s by then",
                    )
                )
                continue
            rows.append(
                (
                    f"start-up with {st['files']:,} files in the inbox → all queued; {how}",
                    f"{v['all_queued_s']:.1f} s",
                    f"{_ok(v['all_queued_s'] <= 10)} (≤ 10 s)",
                    f"process start → first log line {v['first_log_s']:.2f} s, → "
                    f"`daemon.ready` {v['ready_s']:.2f} s (watcher start-up "
                    f"{v['watcher_scan_s']} s); daemon CPU {v['cpu_s']:.1f} s; "
                    f"{st['files'] // st['per_dir']} folders x {st['per_dir']}",
                )
            )
    rs = results.get("rss_status") or {}
    if "rss" in rs:
        r, r0 = rs["rss"], rs["rss_empty"]
        rows.append(
            (
                f"RSS with {rs['jobs']:,} jobs in the database ({r['seconds']:.0f} s after start)",
                f"{r['rss_kib'] / 1024:.0f} MiB (VmHWM {r['hwm_kib'] / 1024:.0f})",
                f"{_ok(max(r['rss_kib'], r['hwm_kib']) <= 150 * 1024)} (≤ 150 MiB)",
                f"same daemon on an empty database: {r0['rss_kib'] / 1024:.0f} MiB "
                f"(VmHWM {r0['hwm_kib'] / 1024:.0f}); API = closed port, empty inbox",
            )
        )
    if "status" in rs:
        s = rs["status"]
        for label in ("status", "status --json"):
            v = s[label]["median_s"] * 1000
            rows.append(
                (
                    f"`inboxd {label}` on {rs['jobs']:,} jobs (median of {s['runs']}, process "
                    "start included)",
                    f"{v:.0f} ms",
                    f"{_ok(v <= 300)} (≤ 300 ms)",
                    f"min {1000 * s[label]['min_s']:.0f} ms, max "
                    f"{1000 * s[label]['max_s']:.0f} ms; CPU time (user+sys) "
                    f"{1000 * s[label]['cpu_s']:.0f} ms",
                )
            )
        ip = s["in_process"]
        cold = s["status (no bytecode cache)"]["median_s"] * 1000
        rows.append(
            (
                f"in-process `status.snapshot()` (median of {s['runs']})",
                f"{1000 * ip['snapshot_s']:.1f} ms",
                "—",
                f"`python -c pass` {1000 * s['python -c pass']['median_s']:.0f} ms; "
                f"`python -m daemon --version` "
                f"{1000 * s['python -m daemon --version']['median_s']:.0f} ms; status "
                f"without bytecode cache (this environment's PYTHONDONTWRITEBYTECODE=1) "
                f"{cold:.0f} ms",
            )
        )
    L.append("| measurement | result | vs target | details |")
    L.append("|---|---|---|---|")
    for a, b, c, d in rows:
        L.append(f"| {a} | {b} | {c} | {d} |")
    L.append("")
    if tp:
        L.append(
            f"Throughput: {tp['files']:,} files of {tp['kib']} KiB renamed from a staging "
            f"folder into the inbox; `settle_seconds = {tp['settle']:g}`, other settings at "
            "their defaults (log level info, JSON to a file). Time from the last rename to "
            "the arrival of the last successful `POST …/upload/complete` in the sandbox's "
            'request log (the loop: from its first request); "minus settle" subtracts '
            f"{tp['settle']:g} s. Median of {tp['rounds']} interleaved round(s); the ratio "
            "is taken per round against the sequential loop of the same round. Defaults: "
            f"`[upload] workers = {_default_workers()}`, `small_files = "
            f"{_default_small_files()}` (files of at most 1 MiB)."
        )
    if st:
        L.append(
            f"Start-up: files with mtimes two days old and ctimes older than "
            f"`settle_seconds` ({st['settle']:g} s, the default) before the daemon starts; "
            "the API is unreachable so the workers cannot drain the queue (every job state "
            "counts as queued). Polled with `Queue.open(db, readonly=True).counts()` every "
            "0.1 s; time from `Popen` of `inboxd run`."
        )
    if "rss" in rs:
        b = rs["build"]
        L.append(
            f"RSS: database built with `Queue.enqueue_many` and transitions through the "
            f"Queue API (claim, save_progress, mark_uploaded, record_import, "
            f"set_after_upload, mark_failed, retry_later): {b['counts']}, "
            f"{b['db_mib']:.0f} MiB. VmRSS/VmHWM from /proc/PID/status."
        )
    for n in CTX.notes:
        L.append(f"Note: {n}")
    return "\n".join(L) + "\n"


def _detail_tp(rs: list[dict[str, Any]]) -> str:
    if not rs:
        return ""
    rates = ", ".join(f"{r['rate']:.0f}" for r in rs)
    return (
        f"runs {rates}; sandbox CPU {_med([r['sandbox_cpu_util'] for r in rs]):.0%}, "
        f"client CPU {_med([r['client_cpu_util'] for r in rs]):.0%} = "
        f"{_med([r['cpu_per_file_ms'] for r in rs]):.2f} ms/file"
    )


def write_doc(section: str, start: str = START, end: str = END, heading: str = HEADING) -> None:
    """Replace only the text between our markers (re-read right before writing); also the
    writer of ``bench/wan_bench.py``'s section, with its own markers."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    body = f"{start}\n{section.rstrip()}\n{end}"
    s, e = text.find(start), text.find(end)
    if s != -1 and e != -1 and e > s:
        new = text[:s] + body + text[e + len(end) :]
    else:
        # A "## " heading before our start marker: a writer that replaces "its heading up to
        # the next ## heading" then stops before our markers instead of eating them.
        new = text.rstrip("\n") + f"\n\n{heading}\n\n{body}\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(new)


# =============================================================================================
# Main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="internal")
    s = sub.add_parser("_sandbox", help=argparse.SUPPRESS)
    s.add_argument("--data-dir", required=True)
    s.add_argument("--port-file", required=True)
    s.add_argument("--api-503-rate", type=float, default=0.0)
    s.add_argument("--import-seconds", type=float, default=0.5)
    lp = sub.add_parser("_loop", help=argparse.SUPPRESS)
    lp.add_argument("--url", required=True)
    lp.add_argument("--token", required=True)
    lp.add_argument("--dir", required=True)
    lp.add_argument("--concurrency", type=int, default=1)
    lp.add_argument("--netio", action="store_true", help="use daemon.net.backend under httpx")
    lp.add_argument("--out", required=True)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    p.add_argument(
        "--only",
        default="throughput,latency,startup,rss,status",
        help="comma-separated subset (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one round (smoke run)")
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--file-kib", type=int, default=4)
    p.add_argument("--tp-settle", type=float, default=0.1)
    p.add_argument(
        "--workers",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=["default", "1", "4"],
        help="daemon runs: 'default' (config as shipped) or N (N workers, no small-file lane)",
    )
    p.add_argument(
        "--loop-concurrency",
        type=ints,
        default=[1, 4],
        help="the first one is the baseline of the ratio",
    )
    p.add_argument("--rounds", type=int, default=2, help="throughput rounds (see --budget)")
    p.add_argument(
        "--budget",
        type=float,
        default=560.0,
        help="seconds; throughput rounds after the first are skipped past this (default 560)",
    )
    p.add_argument("--lat-files", type=int, default=30)
    p.add_argument("--lat-interval", type=float, default=1.0)
    p.add_argument("--lat-settle", type=float, default=1.0)
    p.add_argument("--startup-files", type=int, default=50_000)
    p.add_argument("--startup-per-dir", type=int, default=1000)
    p.add_argument("--startup-timeout", type=float, default=60)
    p.add_argument(
        "--startup-api",
        type=lambda t: [x for x in t.split(",") if x],
        default=["closed", "blackhole"],
        help="closed (nothing listens) and/or blackhole (accepts, never answers)",
    )
    p.add_argument("--rss-jobs", type=int, default=100_000)
    p.add_argument("--rss-done", type=int, default=20_000)
    p.add_argument("--rss-importing", type=int, default=2_000)
    p.add_argument("--rss-failed", type=int, default=2_000)
    p.add_argument("--rss-retrying", type=int, default=1_000)
    p.add_argument("--rss-seconds", type=float, default=10.0)
    p.add_argument("--status-runs", type=int, default=10)
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value of every process started (e.g. -10 as root on a shared machine; the "
        "same for the daemon, the loop and the sandbox, so ratios stay fair)",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="default: a fresh temp dir")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, databases)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    p.add_argument("--json-out", type=Path, default=None, help="also dump raw results here")
    p.add_argument("--py-spy", default=None, help="py-spy binary: profile one throughput run")
    p.add_argument("--profile-workers", default="default")
    p.add_argument(
        "--daemon-path",
        default=None,
        metavar="DIR[:DIR]",
        help="import the daemon from here first (A/B runs on a scratch copy)",
    )
    p.add_argument("--label", default="", help="a note printed with the results (A/B runs)")
    a = p.parse_args(argv)
    if a.quick:
        a.files, a.rounds, a.lat_files = 500, 1, 8
        a.startup_files, a.startup_per_dir, a.rss_jobs = 5000, 500, 10_000
        a.rss_done, a.rss_importing, a.rss_failed, a.rss_retrying = 1000, 200, 200, 100
        a.rss_seconds, a.status_runs = 5.0, 3
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.internal == "_sandbox":
        return cmd_sandbox(a)
    if a.internal == "_loop":
        return cmd_loop(a)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    unknown = only - {"throughput", "latency", "startup", "rss", "status"}
    if unknown:
        print(f"unknown --only: {sorted(unknown)}", file=sys.stderr)
        return 2
    made_work = a.work_dir is None
    work = (
        Path(tempfile.mkdtemp(prefix="inboxd-daemon-bench-", dir="/var/tmp"))
        if made_work
        else a.work_dir
    )
    work.mkdir(parents=True, exist_ok=True)
    CTX.work = work
    CTX.keep = a.keep
    CTX.profile_workers = a.profile_workers
    CTX.py_spy = a.py_spy
    CTX.nice = a.nice
    CTX.pin = not a.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if not CTX.pin:
        CTX.client_cpu = CTX.server_cpu = None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env["PYTHONUNBUFFERED"] = "1"
    CTX.env = env
    CTX.daemon_env = dict(env)
    if a.daemon_path:
        # A/B runs: the daemon (and `inboxd status`) import from these folders first, e.g. a
        # scratch copy of the repository with a fix applied; the sandbox and loop stay as they are
        CTX.daemon_env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(x).resolve()) for x in a.daemon_path.split(os.pathsep)]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
    args = sys.argv[1:] if argv is None else argv
    base = (
        "bash bench/daemon_run.sh"
        if os.environ.get("DAEMON_BENCH_VIA_RUN_SH")
        else ".venv/bin/python bench/daemon_bench.py"
    )
    command = base + (" " + shlex.join(args) if args else "")
    facts = machine()
    say(
        f"work dir {work}; {facts['nproc']} CPUs ({facts['cpu']}), Python {facts['python']}; "
        f"pinning {'on' if CTX.pin else 'off'}; load {loadavg()}"
    )
    # warm the private bytecode cache (an installed package ships compiled .pyc files)
    warm = (
        "import daemon.commands.cli, daemon.service.run, daemon.commands.status, daemon.sandbox, "
        "httpx, uvicorn"
    )
    for e in (env, CTX.daemon_env):
        subprocess.run([PY, "-c", warm], env=e, cwd=work, check=True)
    if a.daemon_path or a.label:
        CTX.notes.append(f"A/B run {a.label!r}: daemon imported from {a.daemon_path or 'repo'}")
    results: dict[str, Any] = {}
    t_start = CTX.t0 = time.monotonic()
    rc = 0
    try:
        # throughput last: its repeat rounds are what gets cut to fit --budget
        if "latency" in only:
            results["latency"] = bench_latency(a)
        if "startup" in only:
            results["startup"] = bench_startup(a)
        if "rss" in only or "status" in only:
            results["rss_status"] = bench_rss_status(a, "rss" in only, "status" in only)
        if "throughput" in only:
            results["throughput"] = bench_throughput(a)
    except Stop as exc:
        print(f"stopped by {exc}", file=sys.stderr)
        rc = 130
    except Exception:
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        CTX.children.stop_all()
        if made_work and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    say(f"\ntotal {time.monotonic() - t_start:.0f} s")
    if a.json_out:
        a.json_out.write_text(
            json.dumps(
                {"facts": facts, "results": results, "load": CTX.load}, indent=1, default=str
            )
        )
    if not results:
        return rc or 1
    text = report(results, facts, command)
    say("\n" + text)
    if rc == 0 and not a.no_write and not a.quick:
        write_doc(text)
        say(f"written to {DOC.relative_to(REPO)} between {START} and {END}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
