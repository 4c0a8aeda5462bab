#!/usr/bin/env python3
"""Push throughput benchmark (issue #2): inboxd vs ``curl -T`` vs the marpledata SDK.

One file (default 2 GiB) is pushed through multipart with every storage URL pointing at an
nginx discard sink (``location / { return 200; }``), so the client is the bottleneck:

* nginx (the sink) and the sandbox API server (``inboxd sandbox --storage discard``) run pinned
  to the server core (``taskset -c 1``); the sandbox only hands out URLs, the bytes go to nginx;
* each client run is its own process pinned to the client core (``taskset -c 0``) and wrapped in
  ``/usr/bin/time`` for its peak RSS and CPU time:
  (a) ``curl -sS -T FILE URL -o /dev/null`` to the sink,
  (b) inboxd's product path, ``inboxd push FILE --no-wait --json --config CFG``,
  (c) the official SDK, ``DB(token, url).get_stream(1).push_file(FILE)``;
* the three are interleaved (a, b, c, a, b, c, ...) after one uncounted warm-up round, and
  medians and ratios come from the same run.

``--tls`` (issue #14) adds the same sink behind TLS (nginx with a private CA made by ``trustme``,
a second sandbox handing out its ``https://`` URLs) and two more clients, with the same number
of connections: (d) ``curl --parallel --parallel-max N`` (N = ``--concurrency``) PUTting the
same parts, split once into files on tmpfs (``/dev/shm``), one URL each; (e) ``inboxd push``
with ``[api] ca_file`` naming the private CA. Its table goes to its own section
(``## Push throughput over TLS (issue #14)``); the plain-HTTP and SDK rows stay in it.

Run it through ``bench/run.sh`` (installs nginx-light and the SDK when missing), e.g.
``bench/run.sh --size 256M`` for a quick check; the full run writes its table to
``docs/benchmarks.md`` under ``## Push throughput (issue #2)``.
Only 127.0.0.1 is used; nginx and the sandbox are stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "_push_driver.py"
SECTION = "## Push throughput (issue #2)"
TLS_SECTION = "## Push throughput over TLS (issue #14)"
MiB = 1024 * 1024
TOKEN = "bench-token"  # the sandbox's token for this run only
TIME_FORMAT = "%M %e %U %S"  # peak RSS KiB, wall s, user s, sys s
TOOLS = ("curl", "inboxd", "sdk", "curl-tls", "inboxd-tls")
DASH, TIMES = "\u2013", "\u00d7"  # en dash, multiplication sign (for the Markdown table)
LABELS = {
    "curl": "curl -T (baseline 1)",
    "inboxd": "inboxd push",
    "sdk": "marpledata SDK push_file (baseline 2)",
    "curl-tls": "TLS: curl --parallel (baseline 3)",
    "inboxd-tls": "TLS: inboxd push",
}


#: ``nice -n N`` in front of every process of the benchmark (``--nice``), or nothing.
NICE: list[str] = []


def boost(pid: int) -> None:
    """Give a new session the ``--nice`` value. With autogroup scheduling (the kernel's default
    for desktop-ish configs) each session is its own scheduling group and ``nice`` only ranks
    processes inside it, so the group's own nice value (/proc/PID/autogroup) has to be set."""
    if NICE:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/autogroup").write_text(NICE[-1])


class Stop(Exception):
    """SIGTERM, turned into an exception so cleanup runs."""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 2G, 1048576)")
    mult = {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB, "T": 1024**4}[m.group(2).upper()]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be > 0")
    return value


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n} GiB"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} at start:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Processes:
    """Background processes, each in its own session; all stopped by ``stop_all``."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], log: Path, **kw) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        boost(proc.pid)
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs.clear()


# ---- nginx sink ---------------------------------------------------------------------------

NGINX_CONF = """\
# Discard sink for the push benchmark: answers 200 to everything and throws the body away.
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    # $content_length is what the client declared; nginx reads and drops that many bytes
    # (it may answer before reading them all; $request_time ends when the body was drained).
    log_format bench '$msec $request_method $uri $status $content_length $request_time';
    access_log {d}/access.log bench;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 0;
    keepalive_requests 100000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200; }}
    }}
{tls}}}
"""

NGINX_TLS = """\
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pem};
        ssl_certificate_key {pem};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{ return 200; }}
    }}
"""


@dataclass
class Sink:
    url: str
    access_log: Path
    offset: int = 0
    #: the same sink behind TLS (``--tls``), and the private CA that signed its certificate
    tls_url: str | None = None
    ca_file: Path | None = None

    def take_requests(self) -> list[dict[str, object]]:
        """Access-log lines written since the last call."""
        with self.access_log.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        rows = []
        for line in data[:cut].decode().splitlines():
            parts = line.split()
            if len(parts) != 6:
                continue
            length = int(parts[4]) if parts[4].isdigit() else 0
            rows.append(
                {
                    "method": parts[1],
                    "uri": parts[2],
                    "status": int(parts[3]),
                    "length": length,
                    "time": float(parts[5]),
                }
            )
        return rows


def make_tls(d: Path) -> tuple[Path, Path]:
    """A private CA and a certificate for localhost/127.0.0.1 (``trustme``, a dev dependency):
    returns (the CA's PEM, the server's key + chain PEM)."""
    import trustme

    d.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_pem, server_pem = d / "ca.pem", d / "server.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    return ca_pem, server_pem


def start_nginx(procs: Processes, workdir: Path, server_cpu: int, tls: bool = False) -> Sink:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise RuntimeError("nginx not found: run bench/run.sh (it installs nginx-light)")
    d = workdir / "nginx"
    ca_pem, server_pem = make_tls(d / "tls") if tls else (None, None)
    last_error = ""
    for _ in range(3):  # a freshly picked free port can be taken in between: try again
        d.mkdir(exist_ok=True)
        port = free_port()
        tls_port = free_port() if tls else 0
        conf = d / "nginx.conf"
        tls_block = NGINX_TLS.format(port=tls_port, pem=server_pem) if tls else ""
        conf.write_text(NGINX_CONF.format(d=d, port=port, tls=tls_block))
        (d / "access.log").write_bytes(b"")
        log = d / "stdout.log"
        argv = [
            *NICE,
            "taskset",
            "-c",
            str(server_cpu),
            nginx,
            "-p",
            str(d),
            "-c",
            str(conf),
            "-e",
            str(d / "error.log"),
        ]
        proc = procs.start("nginx", argv, log)
        try:
            wait_port(port, proc, "nginx", d / "error.log")
        except RuntimeError as exc:
            last_error = str(exc)
            continue
        if tls:
            wait_port(tls_port, proc, "nginx (TLS)", d / "error.log")
        return Sink(
            f"http://127.0.0.1:{port}",
            d / "access.log",
            tls_url=f"https://localhost:{tls_port}" if tls else None,
            ca_file=ca_pem,
        )
    raise RuntimeError(f"nginx did not start: {last_error}")


# ---- sandbox ------------------------------------------------------------------------------


def start_sandbox(
    procs: Processes,
    workdir: Path,
    server_cpu: int,
    sink_url: str,
    part_size: int,
    single_max: int,
    name: str = "sandbox",
) -> str:
    d = workdir / name
    (d / "data").mkdir(parents=True, exist_ok=True)
    log = d / "sandbox.log"
    argv = [
        *NICE,
        "taskset",
        "-c",
        str(server_cpu),
        sys.executable,
        "-m",
        "daemon",
        "sandbox",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        str(d / "data"),
        "--token",
        TOKEN,
        "--storage",
        "discard",
        "--discard-url",
        sink_url,
        "--server-max-bytes",
        str(min(MiB, single_max)),
        "--single-max-bytes",
        str(single_max),
        "--part-size",
        str(part_size),
        "--import-seconds",
        "0.1",
    ]
    proc = procs.start("sandbox", argv, log, cwd=REPO)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the sandbox exited with {proc.returncode}:\n{tail(log)}")
        m = re.search(r'^url = "(http://127\.0\.0\.1:\d+/api/v1)"', log.read_text(), re.M)
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise RuntimeError(f"the sandbox did not print its URL in time:\n{tail(log)}")


# ---- test file ----------------------------------------------------------------------------


def make_file(path: Path, size: int) -> float:
    """Write ``size`` bytes of random data; returns the seconds taken."""
    t0 = time.perf_counter()
    block = os.urandom(16 * MiB)
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, len(block))
            fh.write(block[:n] if n < len(block) else block)
            left -= n
    return time.perf_counter() - t0


def warm_cache(path: Path) -> float:
    """Read the file once so every run reads it from the page cache; returns GB/s."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8 * MiB)
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)
    return path.stat().st_size / (time.perf_counter() - t0) / 1e9


# ---- other load on the machine ------------------------------------------------------------
#
# The machine may be shared (other test suites on the same two cores). Each run therefore
# measures the user-mode CPU time that *other* processes took on the client core and on the
# server core while it ran (per-core user time from /proc/stat minus our own processes' user
# time; kernel time is left out because loopback TCP work lands there as softirq). A run where
# that exceeds --max-foreign of its wall time is repeated, and rounds start only once both cores
# are quiet.

CLK = os.sysconf("SC_CLK_TCK")


def core_times() -> dict[int, tuple[float, float]]:
    """cpu -> (user seconds, busy seconds) since boot."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        f = [int(v) for v in vals[:8]]
        busy = sum(f) - f[3] - f[4]
        out[int(name[3:])] = ((f[0] + f[1]) / CLK, busy / CLK)
    return out


def proc_user_s(pid: int) -> float:
    """User seconds of a process (all its threads) and its reaped children."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    f = raw.rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[13])) / CLK  # utime + cutime


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


class Load:
    def __init__(self, client_cpu: int, server_cpu: int, procs: Processes) -> None:
        self.client_cpu, self.server_cpu, self.procs = client_cpu, server_cpu, procs

    def _ours_on_server(self) -> float:
        pids = [p.pid for _n, p in self.procs.procs]
        pids += [k for pid in list(pids) for k in children(pid)]
        return sum(proc_user_s(pid) for pid in pids) + os.times().user

    def begin(self) -> None:
        self._c = core_times()
        self._ours = self._ours_on_server()

    def end(self, client_user_s: float) -> tuple[float, float]:
        """(foreign user s on the client core, on the server core) since ``begin``."""
        c = core_times()
        on_client = c[self.client_cpu][0] - self._c[self.client_cpu][0] - client_user_s
        on_server = (
            c[self.server_cpu][0]
            - self._c[self.server_cpu][0]
            - (self._ours_on_server() - self._ours)
        )
        return max(0.0, on_client), max(0.0, on_server)

    def wait_quiet(self, threshold: float, max_wait: float) -> float:
        """Wait until both cores are below ``threshold`` busy over 0.5 s; returns the wait."""
        t0 = time.monotonic()
        cores = (self.client_cpu, self.server_cpu)
        while True:
            a = core_times()
            time.sleep(0.5)
            b = core_times()
            busy = max((b[c][1] - a[c][1]) / 0.5 for c in cores)
            waited = time.monotonic() - t0
            if busy <= threshold or waited >= max_wait:
                return waited


def prepare_variants(specs: list[str], workdir: Path) -> dict[str, Path]:
    """``LABEL=DIR`` (DIR/daemon is a package) or ``LABEL=FILE.patch`` (applied with
    ``patch -p1`` to a copy of this repo's ``daemon`` package in the work dir)."""
    out: dict[str, Path] = {}
    for spec in specs:
        label, sep, where = spec.partition("=")
        src = Path(where)
        if not sep or not label or ":" in label:
            raise SystemExit(f"--variant {spec!r}: want LABEL=DIR or LABEL=FILE.patch")
        if src.is_file():
            dest = workdir / "variants" / label
            dest.mkdir(parents=True)
            shutil.copytree(
                REPO / "daemon", dest / "daemon", ignore=shutil.ignore_patterns("__pycache__")
            )
            with src.open("rb") as fh:
                res = subprocess.run(
                    ["patch", "-s", "-p1", "-d", str(dest)],
                    stdin=fh,
                    capture_output=True,
                    text=True,
                )
            if res.returncode != 0:
                raise SystemExit(
                    f"--variant {spec!r}: the patch does not apply to daemon/: "
                    f"{res.stdout}{res.stderr}"
                )
            out[label] = dest
        elif (src / "daemon").is_dir():
            out[label] = src.resolve()
        else:
            raise SystemExit(f"--variant {spec!r}: {src} is neither a patch nor a dir with daemon/")
    return out


def prime_bytecode(ctx: Ctx) -> None:
    """Fill the runs' private pycache (see ``client_env``) before anything is timed."""
    jobs = [
        (
            sys.executable,
            None,
            "import httpcore, daemon.commands.cli, daemon.sandbox, "
            "daemon.delivery.marple_db.upload",
        )
    ]
    jobs += [
        (sys.executable, str(path), "import httpcore, daemon.commands.cli, daemon.sandbox")
        for path in ctx.variants.values()
    ]
    if ctx.sdk_python:
        jobs.append((ctx.sdk_python, None, "import marple, marple.db, requests"))
    for python, pythonpath, code in jobs:
        subprocess.run(
            [python, "-c", code],
            env=client_env(ctx, pythonpath),
            cwd=ctx.workdir,
            check=True,
            stdout=subprocess.DEVNULL,
        )


# ---- one client run -----------------------------------------------------------------------


@dataclass
class Run:
    tool: str
    round: int
    ok: bool
    transfer_s: float  # what the throughput is computed from (see module doc)
    process_s: float  # the whole process, interpreter start and imports included
    rss_kib: int
    cpu_s: float
    error: str | None = None
    user_s: float = 0.0
    foreign_client_s: float = 0.0
    foreign_server_s: float = 0.0
    requests: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def timed(
    argv: list[str],
    client_cpu: int,
    workdir: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[bytes], float, dict[str, float]]:
    tf = workdir / "time.out"
    tf.unlink(missing_ok=True)
    full = [
        *NICE,
        "taskset",
        "-c",
        str(client_cpu),
        "/usr/bin/time",
        "-f",
        TIME_FORMAT,
        "-o",
        str(tf),
        *argv,
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        full,
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    boost(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    wall = time.perf_counter() - t0
    res = subprocess.CompletedProcess(full, proc.returncode, out, err)
    fields = tf.read_text().split()[-4:] if tf.exists() else []
    if len(fields) != 4:
        raise RuntimeError(f"/usr/bin/time gave no numbers for {argv[0]}: {err[-500:]!r}")
    rss, e, u, s = (float(x) for x in fields)
    return res, wall, {"rss_kib": rss, "elapsed": e, "cpu": u + s, "user": u}


def run_curl(ctx: Ctx, rnd: int) -> Run:
    url = f"{ctx.sink.url}/curl/{rnd}"
    argv = [
        "curl",
        "-sS",
        "-T",
        str(ctx.file),
        url,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_upload} %{time_total}",
    ]
    res, wall, t = timed(argv, ctx.args.client_cpu, ctx.workdir, ctx.timeout)
    parts = res.stdout.decode().split()
    ok = (
        res.returncode == 0
        and len(parts) == 3
        and parts[0] == "200"
        and int(float(parts[1])) == ctx.size
    )
    err = None if ok else f"rc={res.returncode} out={res.stdout!r} err={res.stderr[-300:]!r}"
    # curl's own total time: transfer only (a few ms of process start are not counted)
    transfer = float(parts[2]) if len(parts) == 3 else wall
    return Run("curl", rnd, ok, transfer, wall, int(t["rss_kib"]), t["cpu"], err, user_s=t["user"])


def dataset_name(ctx: Ctx, tool: str, rnd: int) -> str:
    ctx.stats.names += 1
    return f"bench-{tool.replace(':', '-')}-{rnd}-{ctx.stats.names}"


def run_curl_parallel(ctx: Ctx, rnd: int) -> Run:
    """``curl --parallel`` PUTting every part to the TLS sink, as many at once as inboxd."""
    assert ctx.sink.tls_url is not None and ctx.sink.ca_file is not None
    cfg = ctx.workdir / "curl-parts.cfg"
    lines = []
    for n, part in enumerate(ctx.part_files, 1):
        lines += [
            f'upload-file = "{part}"',
            f'url = "{ctx.sink.tls_url}/curl-tls/{rnd}/part-{n:05d}"',
            'output = "/dev/null"',
        ]
    cfg.write_text("\n".join(lines) + "\n")
    argv = [
        "curl",
        "-sS",
        "--parallel",
        "--parallel-max",
        str(ctx.args.concurrency),
        "--cacert",
        str(ctx.sink.ca_file),
        "-w",
        "%{http_code} %{size_upload}\\n",
        "-K",
        str(cfg),
    ]
    res, wall, t = timed(argv, ctx.args.client_cpu, ctx.workdir, ctx.timeout)
    rows = [line.split() for line in res.stdout.decode().splitlines() if line.strip()]
    sent = sum(int(float(r[1])) for r in rows if len(r) == 2)
    ok = res.returncode == 0 and len(rows) == ctx.parts and all(r[0] == "200" for r in rows)
    ok = ok and sent == ctx.size
    err = None if ok else f"rc={res.returncode} sent={sent} err={res.stderr[-300:]!r}"
    # No per-run transfer time from curl for a batch: the process's wall time (a few ms more)
    return Run("curl-tls", rnd, ok, wall, wall, int(t["rss_kib"]), t["cpu"], err, user_s=t["user"])


def split_parts(ctx: Ctx) -> list[Path]:
    """The file cut into ``--part-size`` pieces on tmpfs (memory, like the page-cached file)."""
    d = Path(tempfile.mkdtemp(prefix="inboxd-bench-parts-", dir="/dev/shm"))
    out = []
    with ctx.file.open("rb") as src:
        for n in range(1, ctx.parts + 1):
            part = d / f"part-{n:05d}"
            with part.open("wb") as dst:
                left = min(ctx.args.part_size, ctx.size - (n - 1) * ctx.args.part_size)
                while left:
                    chunk = src.read(min(left, 16 * MiB))
                    dst.write(chunk)
                    left -= len(chunk)
            out.append(part)
    return out


def inboxd_argv(ctx: Ctx, result: Path, name: str, config: Path | None = None) -> list[str]:
    return [
        sys.executable,
        str(DRIVER),
        "inboxd",
        str(result),
        "--",
        "push",
        str(ctx.file),
        "--no-wait",
        "--json",
        "--config",
        str(config or ctx.inboxd_config),
        "--name",
        name,
    ]


def client_env(ctx: Ctx, pythonpath: str | None = None) -> dict[str, str]:
    """The environment of a Python client run.

    Bytecode goes to a private PYTHONPYCACHEPREFIX (compiled before the runs), as an installed
    package has its .pyc files: a PYTHONDONTWRITEBYTECODE in the caller's environment would
    otherwise make every run compile the daemon package again and time the compiler.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(ctx.workdir / "pycache")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return env


def is_tls(ctx: Ctx, tool: str) -> bool:
    """Whether a run goes to the TLS sink (with ``--tls``, variants do too)."""
    return tool.endswith("-tls") or (tool.startswith("inboxd:") and bool(ctx.args.tls))


def run_inboxd(ctx: Ctx, rnd: int, tool: str = "inboxd", pythonpath: str | None = None) -> Run:
    result = ctx.workdir / "result.json"
    result.unlink(missing_ok=True)
    config = ctx.tls_config if is_tls(ctx, tool) else None
    argv = inboxd_argv(ctx, result, dataset_name(ctx, tool, rnd), config)
    return _driver_run(tool, ctx, rnd, argv, result, client_env(ctx, pythonpath))


def run_sdk(ctx: Ctx, rnd: int) -> Run:
    result = ctx.workdir / "result.json"
    result.unlink(missing_ok=True)
    argv = [
        ctx.sdk_python,
        str(DRIVER),
        "sdk",
        str(result),
        ctx.api_url,
        TOKEN,
        "1",
        str(ctx.file),
        dataset_name(ctx, "sdk", rnd),
        str(ctx.args.concurrency),
    ]
    return _driver_run("sdk", ctx, rnd, argv, result, client_env(ctx))


def _driver_run(
    tool: str, ctx: Ctx, rnd: int, argv: list[str], result: Path, env: dict[str, str] | None = None
) -> Run:
    res, wall, t = timed(argv, ctx.args.client_cpu, ctx.workdir, ctx.timeout, env)
    try:
        data = json.loads(result.read_text())
    except (OSError, ValueError):
        data = {
            "ok": False,
            "error": f"no result (rc={res.returncode}): "
            f"{res.stderr.decode(errors='replace')[-600:]}",
            "upload_s": wall,
            "import_s": 0.0,
        }
    ok = bool(data.get("ok")) and res.returncode == 0
    err = None if ok else str(data.get("error") or res.stderr.decode(errors="replace")[-600:])
    return Run(
        tool,
        rnd,
        ok,
        float(data["upload_s"]),
        wall,
        int(t["rss_kib"]),
        t["cpu"],
        err,
        user_s=t["user"],
        extra={
            k: v for k, v in data.items() if k in ("import_s", "mode", "sdk_version", "daemon_from")
        },
    )


def check_sink(ctx: Ctx, run: Run) -> None:
    """What reached nginx during this run must add up to the file, all answered 200.

    nginx may answer before it has drained a body and logs the request only once it has, so
    the log can lag the client's exit: wait (briefly) for the lines a good run must leave.
    """
    want = 1 if run.tool == "curl" else ctx.parts
    rows: list[dict[str, object]] = []
    deadline = time.monotonic() + (10 if run.ok else 1)
    while True:
        rows += [r for r in ctx.sink.take_requests() if r["method"] == "PUT"]
        if len(rows) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    run.requests = len(rows)
    if not run.ok:
        return
    total = sum(int(r["length"]) for r in rows)  # type: ignore[arg-type]
    bad = [r for r in rows if r["status"] != 200]
    if total != ctx.size or bad:
        run.ok = False
        run.error = f"sink saw {len(rows)} PUT(s), {total} bytes declared, non-200: {bad[:3]}"
    elif run.tool != "curl" and len(rows) != ctx.parts:
        run.ok = False
        run.error = f"expected {ctx.parts} part PUTs, sink saw {len(rows)}"


def find_py_spy(explicit: str | None) -> str:
    for c in (
        explicit,
        shutil.which("py-spy"),
        str(Path(sys.executable).parent / "py-spy"),
        str(Path.home() / ".cache/inboxd-bench/sdk-venv/bin/py-spy"),
    ):
        if c and Path(c).exists():
            return c
    raise SystemExit("--profile needs py-spy (pip install py-spy), or pass --py-spy PATH")


def profile_inboxd(ctx: Ctx, out: Path, py_spy: str | None) -> None:
    """One more inboxd run (over TLS with ``--tls``), sampled by py-spy (on the server core)."""
    exe = find_py_spy(py_spy)
    out.mkdir(parents=True, exist_ok=True)
    result = ctx.workdir / "result.json"
    result.unlink(missing_ok=True)
    raw = out / "inboxd.txt"
    argv = [
        "taskset",
        "-c",
        str(ctx.args.server_cpu),
        exe,
        "record",
        "--rate",
        "1000",
        "--format",
        "raw",
        "--threads",
        "--subprocesses",
        "--output",
        str(raw),
        "--",
        "taskset",
        "-c",
        str(ctx.args.client_cpu),
        *inboxd_argv(ctx, result, "bench-profile", ctx.tls_config),
    ]
    subprocess.run(argv, cwd=ctx.workdir, check=True, capture_output=True, timeout=ctx.timeout)
    ctx.sink.take_requests()
    text = summarize_profile(raw)
    (out / "summary.txt").write_text(text)
    print(f"\npy-spy profile of one inboxd run: {raw}\n{text}")


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Self time per function, and inclusive time of the upload's main steps."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    per_thread: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        per_thread[frames[0].split(" ")[0] if frames[0].startswith("thread") else frames[0]] = (
            per_thread.get(frames[0], 0) + n
        )
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
        seen = set()
        for f in frames:
            key = (
                f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")" if " (" in f else f
            )
            if key not in seen:
                seen.add(key)
                incl[key] = incl.get(key, 0) + n
    if not total:
        return "(no samples)"
    lines = [f"{total} samples (1 kHz, non-idle threads)", "", "self time, top functions:"]
    for f, n in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}%  {f}")
    lines += ["", "inclusive time, top functions:"]
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[: top * 2]:
        lines.append(f"  {100 * n / total:5.1f}%  {f}")
    return "\n".join(lines)


# ---- context, report ----------------------------------------------------------------------


@dataclass
class Stats:
    repeated: int = 0  # contended runs done again
    waited_s: float = 0.0  # waiting for quiet cores
    names: int = 0
    load_before: str = ""
    load_after: str = ""


@dataclass
class Ctx:
    args: argparse.Namespace
    workdir: Path
    file: Path
    size: int
    parts: int
    sink: Sink
    api_url: str
    inboxd_config: Path
    sdk_python: str | None
    timeout: float
    variants: dict[str, Path] = field(default_factory=dict)
    stats: Stats = field(default_factory=lambda: Stats())
    #: --tls: inboxd's config for the TLS sandbox, and the parts for curl --parallel
    tls_config: Path | None = None
    part_files: list[Path] = field(default_factory=list)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def contention(run: Run) -> float:
    """Share of the run's wall time that other processes used on the client or server core.

    With ``--nice`` the benchmark's sessions outrank the others, which then only get the
    server core's idle time (the sink is idle whenever the client is the bottleneck): that
    does not slow the run, so only the client core counts.
    """
    if NICE:
        return run.foreign_client_s / run.process_s
    return max(run.foreign_client_s, run.foreign_server_s) / run.process_s


def summarize(runs: list[Run], size: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for tool in dict.fromkeys(r.tool for r in runs):
        mine = [r for r in runs if r.tool == tool and r.ok]
        if not mine:
            continue
        rates = [size / r.transfer_s / 1e9 for r in mine]
        out[tool] = {
            "n": len(mine),
            "failed": len([r for r in runs if r.tool == tool and not r.ok]),
            "transfer_s": statistics.median(r.transfer_s for r in mine),
            "gbps": statistics.median(rates),
            "gbps_min": min(rates),
            "gbps_max": max(rates),
            "process_s": statistics.median(r.process_s for r in mine),
            "e2e_gbps": statistics.median(size / r.process_s / 1e9 for r in mine),
            "rss_mib": max(r.rss_kib for r in mine) / 1024,
            "cpu_s": statistics.median(r.cpu_s for r in mine),
            "requests": statistics.median(r.requests for r in mine),
            "other": statistics.median(contention(r) for r in mine),
        }
    return out


def variant_label(specs: list[str], label: str) -> str:
    src = next((v.partition("=")[2] for v in specs if v.partition("=")[0] == label), "")
    what = f"`{Path(src).name}`" if src.endswith(".patch") else "a scratch copy"
    return f"inboxd + {label}: {what} (not in the repo)"


def render(
    ctx: Ctx,
    runs: list[Run],
    summary: dict[str, dict[str, float]],
    facts: dict[str, str],
    command: str,
) -> str:
    L: list[str] = []
    a = ctx.args
    L.append(TLS_SECTION if a.tls else SECTION)
    L.append("")
    L.append(
        f"Run {facts['date']} on `{facts['host']}`: {facts['nproc']} CPUs "
        f"({facts['cpu']}), Python {facts['python']}, {facts['nginx']}, {facts['curl']}, "
        f"marpledata {facts['sdk']}."
    )
    L.append("")
    L.append("```sh")
    L.append(command)
    L.append("```")
    L.append("")
    L.append(
        f"File: {human(ctx.size)} ({ctx.size} bytes) of random data on disk, read once before the "
        "runs so every run reads it from the page cache (this measures the upload path, not the "
        f"disk). Sandbox (`inboxd sandbox --storage discard`): multipart above "
        f"{human(a.single_max)}, part size {human(a.part_size)} → {ctx.parts} parts "
        f"(hosted Marple DB sends files over 128 MiB multipart; 64 MiB parts are a common S3 "
        f"choice). Part concurrency {a.concurrency} for both inboxd and the SDK. Every storage "
        "URL points at an nginx discard sink (`location / { return 200; }`, 1 worker). "
        f"nginx and the sandbox pinned to core {a.server_cpu}, each client run its own process "
        f"pinned to core {a.client_cpu} (`taskset`). Runs interleaved curl, inboxd, SDK; "
        f"{a.warmup} uncounted warm-up round(s), then {a.reps} counted rounds; medians."
        + (
            f" All benchmark processes ran at nice {a.nice} (and their sessions' autogroup "
            "nice) because other work shared the machine; the same for every client."
            if a.nice
            else ""
        )
    )
    L.append("")
    L.append(
        f"| client | median GB/s | min{DASH}max GB/s | {TIMES} curl | median transfer s "
        "| process s (incl. start) | peak RSS MiB | CPU s | CPU s/GiB | PUTs | other load |"
    )
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    curl = summary.get("curl", {}).get("gbps")
    for tool in dict.fromkeys(r.tool for r in runs):
        s = summary.get(tool)
        label = LABELS.get(tool) or variant_label(a.variant, tool.split(":", 1)[1])
        if s is None:
            L.append(f"| {label} | failed | | | | | | | | | |")
            continue
        # TLS rows are compared with the TLS curl (same connections), the others with curl -T
        base = summary.get("curl-tls", {}).get("gbps") if is_tls(ctx, tool) else curl
        ratio = f"{s['gbps'] / base:.2f}" if base else DASH
        L.append(
            f"| {label} | {s['gbps']:.2f} | {s['gbps_min']:.2f}{DASH}{s['gbps_max']:.2f} | "
            f"{ratio} | {s['transfer_s']:.3f} | {s['process_s']:.3f} | {s['rss_mib']:.1f} | "
            f"{s['cpu_s']:.2f} | {s['cpu_s'] * 2**30 / ctx.size:.2f} | {s['requests']:g} | "
            f"{s['other']:.0%} |"
        )
    L.append("")
    ib, sdk = summary.get("inboxd"), summary.get("sdk")
    checks = []
    if ib and curl:
        r = ib["gbps"] / curl
        checks.append(
            f"inboxd / curl = **{r:.2f}{TIMES}** (target ≥ 0.9{TIMES}: "
            f"{'met' if r >= 0.9 else 'MISSED'})"
        )
    if ib and sdk:
        r = ib["gbps"] / sdk["gbps"]
        checks.append(
            f"inboxd / SDK = **{r:.2f}{TIMES}** (target ≥ 1.0{TIMES}: "
            f"{'met' if r >= 1.0 else 'MISSED'})"
        )
    if ib:
        checks.append(
            f"inboxd peak RSS = **{ib['rss_mib']:.1f} MiB** (target ≤ 100 MiB: "
            f"{'met' if ib['rss_mib'] <= 100 else 'MISSED'})"
        )
    ib_tls, curl_tls = summary.get("inboxd-tls"), summary.get("curl-tls")
    if ib_tls and curl_tls:
        r = ib_tls["gbps"] / curl_tls["gbps"]
        checks.append(
            f"TLS: inboxd / curl --parallel = **{r:.2f}{TIMES}** (target ≥ 0.95{TIMES}: "
            f"{'met' if r >= 0.95 else 'MISSED'})"
        )
        c = ib_tls["cpu_s"] / curl_tls["cpu_s"]
        per_gib = [x["cpu_s"] * 2**30 / ctx.size for x in (ib_tls, curl_tls)]
        verdict = "met" if c <= 1.2 else "MISSED"
        checks.append(
            f"TLS: client CPU per GiB, inboxd / curl = **{c:.2f}{TIMES}** ({per_gib[0]:.2f} vs "
            f"{per_gib[1]:.2f} s/GiB; target ≤ 1.2{TIMES}: {verdict})"
        )
        checks.append(
            f"TLS: inboxd peak RSS = **{ib_tls['rss_mib']:.1f} MiB** (target ≤ 64 MiB: "
            f"{'met' if ib_tls['rss_mib'] <= 64 else 'MISSED'})"
        )
    for c in checks:
        L.append(f"- {c}")
    failed = [r for r in runs if not r.ok]
    for r in failed:
        L.append(f"- FAILED run: {r.tool} round {r.round}: {r.error}")
    st = ctx.stats
    kept = [r for r in runs if contention(r) > a.max_foreign]
    L.append(
        f"- Other load on the machine: load average {st.load_before} before, {st.load_after} "
        f"after; {st.repeated} run(s) repeated because other processes took more than "
        f"{a.max_foreign:.0%} of a core during them (up to {a.retries} repeats, the least "
        f"disturbed attempt counts); {len(kept)} of {len(runs)} counted run(s) still above "
        f"that; {st.waited_s:.0f} s spent waiting for quiet cores. Column 'other load' = "
        "median share of a run's wall time that other processes took on the "
        + (
            "client core (with --nice they only get the sink's idle time on the server core)."
            if NICE
            else "busier of the two cores."
        )
    )
    if any(":" in t for t in summary):
        L.append(
            "- Rows 'inboxd + ...' run a copy of the `daemon` package with a candidate change "
            "applied (`--variant LABEL=PATCH`, patches in `bench/variants/`), measured in the "
            "same run; the repo's code is the 'inboxd push' row (with --tls they go to the TLS "
            "sink)."
        )
    if a.tls:
        L.append(
            "- TLS rows: the same nginx sink on a second port with TLS (a certificate for "
            "localhost from a private CA made by `trustme`; TLS 1.2/1.3, nginx's and OpenSSL's "
            "default ciphers), and a second sandbox handing out its `https://` URLs. curl "
            f"PUTs the same {ctx.parts} parts (split once into files on tmpfs) with "
            f"`--parallel --parallel-max {a.concurrency} --cacert CA`, the same number of "
            "connections as inboxd's part concurrency; its transfer time is its process's "
            "wall time. inboxd trusts the CA through `[api] ca_file`; the ratio of a TLS row is "
            "against the TLS curl."
        )
    L.append("")
    L.append(
        "How to read it: GB/s = 10⁹ bytes / transfer time. Transfer time is curl's own "
        "`time_total`; for inboxd and the SDK it is measured inside their process from the "
        "first API call to the return of the push (connection check, `POST /ingestion`, part "
        "URLs, all part PUTs, `complete`), leaving out interpreter start-up and imports "
        "(~0.5 s each, shown in 'process s', the whole process as a user would time it). "
        "Peak RSS is `/usr/bin/time`'s maximum resident set size of the client process (max "
        "over the counted runs); CPU s is its user+sys time (median). PUTs = requests that "
        "reached the sink per run; the sink's log was checked to add up to the file size."
    )
    L.append("")
    return "\n".join(L)


def write_doc(path: Path, section: str, heading: str = SECTION) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        # up to the next section, or the next marker comment another writer owns
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "<!--"))),
            len(lines),
        )
        tail_text = "".join(lines[end:])
        new = (
            "".join(lines[:start])
            + section.rstrip("\n")
            + "\n"
            + ("\n" + tail_text if tail_text else "")
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def find_sdk_python(explicit: str | None) -> str | None:
    cands = [
        explicit,
        os.environ.get("BENCH_SDK_PYTHON"),
        sys.executable,
        str(Path.home() / ".cache/inboxd-bench/sdk-venv/bin/python"),
    ]
    for c in cands:
        if not c or not Path(c).exists():
            continue
        ok = subprocess.run([c, "-c", "import marple.db"], capture_output=True).returncode == 0
        if ok:
            return c
        if c == explicit:
            raise SystemExit(f"--sdk-python {c}: cannot import marple (pip install marpledata)")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("2G"),
        help="test file size, e.g. 256M, 2G (default 2G = 2 GiB)",
    )
    p.add_argument(
        "--part-size",
        type=parse_size,
        default=parse_size("64M"),
        help="multipart part size the sandbox hands out (default 64M)",
    )
    p.add_argument(
        "--single-max",
        type=parse_size,
        default=parse_size("8M"),
        help="largest file the sandbox sends as one PUT (default 8M)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="part concurrency of inboxd and the SDK (default 4, both defaults)",
    )
    p.add_argument("--reps", type=int, default=4, help="counted rounds (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (default 1)")
    p.add_argument("--client-cpu", type=int, default=0)
    p.add_argument("--server-cpu", type=int, default=1)
    p.add_argument("--sdk-python", help="a python that can import marple (default: auto)")
    p.add_argument(
        "--skip", action="append", default=[], choices=TOOLS, help="leave a client out (repeatable)"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the file goes (default: a temp dir under /var/tmp, removed afterwards)",
    )
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs alone")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, file)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=PATCH|DIR",
        help="also run inboxd from a copy of daemon/ with PATCH applied (e.g. "
        "bench/variants/fixed.patch), or from DIR/daemon, interleaved like the others: "
        "measures a candidate change in the same run without touching daemon/",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the rounds, run inboxd once more under py-spy (on the server "
        "core) and write DIR/inboxd.txt (collapsed stacks) and a summary",
    )
    p.add_argument("--py-spy", default=None, help="py-spy executable (default: auto)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="also the sink behind TLS: curl --parallel and inboxd over the same parts with "
        "the same number of connections (writes its own section)",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.05,
        help="repeat a run when other processes took more than this share of its "
        "wall time on the client or server core (default 0.05)",
    )
    p.add_argument("--retries", type=int, default=3, help="repeats of a contended run")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run nginx, the sandbox and every client with this nice value (e.g. -10 as root "
        "on a shared machine: the same for all clients, so ratios stay fair)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=1800,
        help="seconds after which no more waiting or repeats happen (default 1800)",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=0.15,
        help="start a round once both cores are below this busy share (0.15)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=300,
        help="seconds to wait for quiet cores before a round anyway (300)",
    )
    args = p.parse_args(argv)
    if args.nice:
        NICE[:] = ["nice", "-n", str(args.nice)]

    cpus = os.sched_getaffinity(0)
    if args.client_cpu == args.server_cpu or not {args.client_cpu, args.server_cpu} <= cpus:
        raise SystemExit(f"need two different usable CPUs for client/server, have {sorted(cpus)}")
    if shutil.which("curl") is None or not Path("/usr/bin/time").exists():
        raise SystemExit("needs curl and /usr/bin/time (apt-get install -y curl time)")
    if args.reps < 1:
        raise SystemExit("--reps must be >= 1")
    if args.size <= args.single_max:
        raise SystemExit(f"--size must be above --single-max ({args.single_max}) to go multipart")
    sdk_python = None if "sdk" in args.skip else find_sdk_python(args.sdk_python)
    if sdk_python is None and "sdk" not in args.skip:
        raise SystemExit(
            "the marpledata SDK is not installed: run bench/run.sh, or pass "
            "--sdk-python, or --skip sdk"
        )
    command = os.environ.get("BENCH_COMMAND") or shlex.join(
        [
            os.path.relpath(sys.executable, REPO)
            if sys.executable.startswith(str(REPO))
            else sys.executable,
            "bench/push_throughput.py",
            *(argv or sys.argv[1:]),
        ]
    )

    def on_term(signum: int, frame: object) -> None:
        raise Stop(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    base = Path(os.environ.get("TMPDIR", "/var/tmp"))
    own_dir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="inboxd-bench-", dir=base)) if own_dir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Processes()
    try:
        return _bench(args, workdir, procs, sdk_python, command)
    except (KeyboardInterrupt, Stop) as exc:
        print(f"\ninterrupted ({exc or 'Ctrl-C'}): stopping nginx and the sandbox", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if own_dir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            print(f"kept {workdir}", file=sys.stderr)


def _bench(
    args: argparse.Namespace, workdir: Path, procs: Processes, sdk_python: str | None, command: str
) -> int:
    size = args.size
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if size > avail * 0.8:
        print(
            f"warning: {human(size)} file vs {human(avail)} free memory: the page cache may "
            "not hold it, and the disk would then be measured too",
            file=sys.stderr,
        )
    variants = prepare_variants(args.variant, workdir)  # fail early on a bad patch
    sink = start_nginx(procs, workdir, args.server_cpu, tls=args.tls)
    api_url = start_sandbox(
        procs, workdir, args.server_cpu, sink.url, args.part_size, args.single_max
    )
    tls_api_url = None
    if sink.tls_url is not None:
        tls_api_url = start_sandbox(
            procs,
            workdir,
            args.server_cpu,
            sink.tls_url,
            args.part_size,
            args.single_max,
            name="sandbox-tls",
        )
    # This process only waits; keep it off the client's core.
    os.sched_setaffinity(0, {args.server_cpu})
    print(
        f"nginx discard sink {sink.url} and sandbox {api_url}, pinned to core "
        f"{args.server_cpu}; clients pinned to core {args.client_cpu}"
    )

    cfg = workdir / "inboxd.toml"
    cfg.write_text(
        "[api]\n"
        f'url = "{api_url}"\n'
        f'token = "{TOKEN}"\n'
        "\n[upload]\n"
        "stream = 1\n"
        f"part_concurrency = {args.concurrency}\n"
        "\n[state]\n"
        f'path = "{workdir / "state.db"}"\n'
    )

    file = workdir / f"bench-{size}.bin"
    secs = make_file(file, size)
    print(f"wrote {human(size)} test file in {secs:.1f} s: {file}")
    rate = warm_cache(file)
    print(
        f"read it once to warm the page cache ({rate:.1f} GB/s): the benchmark measures "
        "the upload path, not the disk"
    )

    parts = -(-size // args.part_size)
    # generous per-run limit: 50 MB/s would be absurdly slow on loopback
    timeout = 60 + size / 50e6
    ctx = Ctx(args, workdir, file, size, parts, sink, api_url, cfg, sdk_python, timeout)
    ctx.variants = variants
    if tls_api_url is not None:
        assert sink.ca_file is not None
        ctx.tls_config = workdir / "inboxd-tls.toml"
        ctx.tls_config.write_text(
            cfg.read_text()
            .replace(api_url, tls_api_url)
            .replace("[api]\n", f'[api]\nca_file = "{sink.ca_file}"\n', 1)
        )
        ctx.part_files = split_parts(ctx)
        print(f"split into {parts} part files on tmpfs for curl --parallel")
    try:
        return _rounds(ctx, sink, procs, command)
    finally:
        if ctx.part_files:
            shutil.rmtree(ctx.part_files[0].parent, ignore_errors=True)


def _rounds(ctx: Ctx, sink: Sink, procs: Processes, command: str) -> int:
    args, size = ctx.args, ctx.size
    prime_bytecode(ctx)
    runners = {
        "curl": run_curl,
        "inboxd": run_inboxd,
        "sdk": run_sdk,
        "curl-tls": run_curl_parallel,
        "inboxd-tls": functools.partial(run_inboxd, tool="inboxd-tls"),
    }
    tools = [t for t in TOOLS if t not in args.skip and (args.tls or not t.endswith("-tls"))]
    for label, path in ctx.variants.items():
        name = f"inboxd:{label}"
        runners[name] = functools.partial(run_inboxd, tool=name, pythonpath=str(path))
        tools.insert(tools.index("inboxd") + 1 if "inboxd" in tools else len(tools), name)
    runs: list[Run] = []
    sink.take_requests()
    load = Load(args.client_cpu, args.server_cpu, procs)
    ctx.stats.load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    width = max(len(t) for t in tools)
    deadline = time.monotonic() + args.budget

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    for rnd in range(-args.warmup + 1, args.reps + 1):
        waited = load.wait_quiet(args.quiet, min(args.max_wait, left()))
        if waited >= 1:
            print(f"  (waited {waited:.0f} s for the cores to be quiet)", flush=True)
            ctx.stats.waited_s += waited
        for tool in tools:
            kept: Run | None = None
            for attempt in range(1, args.retries + 2):
                load.begin()
                run = runners[tool](ctx, rnd)
                run.foreign_client_s, run.foreign_server_s = load.end(run.user_s)
                check_sink(ctx, run)
                contended = contention(run) > args.max_foreign
                tag = "warm-up" if rnd <= 0 else f"round {rnd}/{args.reps}"
                status = "ok" if run.ok else f"FAILED: {run.error}"
                print(
                    f"  {tag:<12} {tool:<{width}} {size / run.transfer_s / 1e9:6.2f} GB/s  "
                    f"transfer {run.transfer_s:6.3f} s  process {run.process_s:6.3f} s  "
                    f"RSS {run.rss_kib / 1024:6.1f} MiB  CPU {run.cpu_s:5.2f} s  "
                    f"PUTs {run.requests:3d}  other load {run.foreign_client_s:4.2f}/"
                    f"{run.foreign_server_s:4.2f} s  {status}"
                    f"{'  CONTENDED' if contended else ''}",
                    flush=True,
                )
                # Of repeated attempts keep the least disturbed one (chosen by the other
                # processes' CPU time, never by speed).
                if kept is None or not run.ok or contention(run) < contention(kept):
                    kept = run
                if not contended or not run.ok:
                    break
                if attempt <= args.retries and left() > 0:
                    ctx.stats.repeated += 1
                    load.wait_quiet(args.quiet, min(30.0, left()))
                else:
                    break
            assert kept is not None
            if rnd > 0:
                runs.append(kept)
    ctx.stats.load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())

    if args.profile is not None:
        profile_inboxd(ctx, args.profile, args.py_spy)

    summary = summarize(runs, size)
    facts = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "nginx": tool_version(["nginx", "-v"]).replace("nginx version: ", ""),
        "curl": " ".join(tool_version(["curl", "--version"]).split()[:2]),
        "sdk": next(
            (str(r.extra.get("sdk_version")) for r in runs if r.extra.get("sdk_version")),
            "(not run)",
        ),
    }
    section = render(ctx, runs, summary, facts, command)
    print()
    print(section)
    heading = TLS_SECTION if args.tls else SECTION
    if not args.no_write:
        write_doc(args.out, section, heading)
        print(f"written to {os.path.relpath(args.out, Path.cwd())} under {heading!r}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
