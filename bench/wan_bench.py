#!/usr/bin/env python3
"""WAN benchmark (issue #14): many small files over a link with a real round-trip time.

The sandbox sits behind the in-tree proxy (``tests/support/faultproxy.py``) with ``set_latency``:
every byte is delivered RTT/2 after it arrived, each way, and a new connection's first bytes wait
one more RTT for the handshake, so a request and its answer cost one RTT as on a real link (no
netem, no root). Per RTT (default 40 ms and 10 ms), in the same round, through the same proxy:

* **loop**: an ``httpx.AsyncClient`` loop with 32 files in flight making the three calls of a
  small file (``POST /ingestion``, ``POST …/upload/server``, ``POST …/upload/complete``), in its
  own process (``bench/daemon_bench.py _loop``): the baseline of the ratio;
* **daemon**: ``inboxd run`` at default ``[upload]`` settings (``settle_seconds = 0.1``, JSON log
  at info to a file); the files are renamed into its inbox; time from the last rename to the
  last successful ``complete`` in the sandbox's request log, minus the settle time;
* **SDK**: the official ``marpledata`` SDK's ``push_file`` in a loop (``bench/_push_driver.py
  sdk-loop``, the SDK venv of ``bench/run.sh``) over the first ``--sdk-files`` files, for context.

Files: 2,000 of 16 KiB (``--files``, ``--file-kib``). Rounds are interleaved; ratios are taken per
round against the loop of the same round and RTT. CPU time (user+sys from /proc) per file is
reported for every client, and the load average around each run. The sandbox and the proxy
(the "network") are pinned to CPU 1, each client to CPU 0; ``--nice`` as in the other benches.

One command: ``bash bench/wan_run.sh`` (writes its section of ``docs/benchmarks.md`` between
``<!-- wan-bench:start -->`` and ``<!-- wan-bench:end -->``). ``--daemon LABEL=KEY=VALUE;…`` adds
daemon runs with other ``[upload]`` settings (e.g. ``--daemon 'w32=workers=32;small_files=0'``)
to compare candidates in the same run; ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import daemon_bench as db

REPO = db.REPO
PROXY = REPO / "tests" / "support" / "faultproxy.py"
DRIVER = REPO / "bench" / "_push_driver.py"
START = "<!-- wan-bench:start -->"
END = "<!-- wan-bench:end -->"
HEADING = "## WAN benchmark: small files over a link with latency (issue #14)"
KiB = 1024


def _say(text: str) -> None:
    print(text, flush=True)


def start_proxy(run: Path, sandbox_port: int, rtt_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    port_file = run / "proxy.port"
    proc = db.CTX.children.spawn(
        [
            db.PY,
            str(PROXY),
            "--target",
            f"127.0.0.1:{sandbox_port}",
            "--rtt-ms",
            str(rtt_ms),
            "--port-file",
            str(port_file),
        ],
        log=run / "proxy.log",
        cpu=db.CTX.server_cpu,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy exited ({proc.returncode}); see {run / 'proxy.log'}")
        return port_file.exists()

    db.wait_for(ready, 15, what="the latency proxy")
    return proc, int(port_file.read_text())


def _config(run: Path, url: str, inbox: Path, settle: float, upload: dict[str, str]) -> Path:
    """Defaults everywhere but the URL, token, folders, settle time and the given [upload] keys."""
    lines = "".join(f"{k} = {v}\n" for k, v in upload.items())
    path = run / "config.toml"
    path.write_text(
        f'[api]\nurl = "{url}"\ntoken = "{db.TOKEN}"\n\n'
        f"[upload]\nstream = 1\n{lines}\n"
        f'[inbox]\npath = "{inbox}"\nsettle_seconds = {settle}\n\n'
        f'[state]\npath = "{run / "state" / "state.db"}"\n\n'
        '[log]\nformat = "json"\nlevel = "info"\n'
    )
    return path


class Net:
    """A fresh sandbox and latency proxy for one run (nothing carries over between runs)."""

    def __init__(self, run: Path, rtt_ms: float) -> None:
        self.sb = db.SandboxProc.start(run / "sandbox")
        self.proxy, port = start_proxy(run, self.sb.port, rtt_ms)
        self.url = f"http://127.0.0.1:{port}/api/v1"

    def cpu(self) -> tuple[float, float]:
        return db.proc_cpu(self.sb.proc.pid), db.proc_cpu(self.proxy.pid)

    def stop(self) -> None:
        db.Children.stop(self.proxy)
        self.sb.stop()


def run_loop(a: argparse.Namespace, rtt: float, tag: str, netio: bool = False) -> dict[str, Any]:
    run = db._fresh(f"wan-loop{'-netio' if netio else ''}-{rtt:g}-{tag}")
    db.make_files(run / "files", a.files, a.file_kib * KiB)
    net = Net(run, rtt)
    out = run / "loop.json"
    load0 = db.loadavg()
    try:
        s0, p0 = net.cpu()
        proc = db.CTX.children.spawn(
            [
                db.PY,
                str(REPO / "bench" / "daemon_bench.py"),
                "_loop",
                "--url",
                net.url,
                "--token",
                db.TOKEN,
                "--dir",
                str(run / "files"),
                "--concurrency",
                str(a.loop_concurrency),
                "--out",
                str(out),
                *(["--netio"] if netio else []),
            ],
            log=run / "loop.log",
            cpu=db.CTX.client_cpu,
        )
        rc = proc.wait(900)
        s1, p1 = net.cpu()
        if rc != 0:
            raise RuntimeError(
                f"httpx loop failed ({rc}): {(run / 'loop.log').read_text()[-2000:]}"
            )
        res = json.loads(out.read_text())
        log = net.sb.log()
    finally:
        net.stop()
    completes = db._t_of(log, db.COMPLETE)
    elapsed = completes[a.files - 1] - res["t_begin"]
    wall = res["t_end"] - res["t_begin"]
    db._cleanup_run(run)
    return {
        "kind": "loop-netio" if netio else "loop",
        "rtt": rtt,
        "tag": tag,
        "rate": a.files / elapsed,
        "elapsed_s": elapsed,
        "cpu_ms": 1000 * res["cpu"] / a.files,
        "sandbox_util": (s1 - s0) / wall,
        "proxy_util": (p1 - p0) / wall,
        "routes": db.route_counts(log),
        "load": f"{load0} → {db.loadavg()}",
    }


def run_daemon(
    a: argparse.Namespace, rtt: float, label: str, upload: dict[str, str], tag: str
) -> dict[str, Any]:
    run = db._fresh(f"wan-daemon-{label}-{rtt:g}-{tag}")
    staging, inbox = run / "staging", run / "inbox"
    names = [p.name for p in db.make_files(staging, a.files, a.file_kib * KiB)]
    inbox.mkdir()
    net = Net(run, rtt)
    cfg = _config(run, net.url, inbox, a.settle, upload)
    dlog = run / "daemon.log"
    daemon = db.start_daemon(cfg, dlog)
    load0 = db.loadavg()
    try:
        db.wait_ready(daemon, dlog)
        time.sleep(0.5)
        d0 = db.proc_cpu(daemon.pid)
        s0, p0 = net.cpu()
        for name in names:
            os.rename(staging / name, inbox / name)
        t_in = time.time()
        db.wait_for(
            lambda: net.sb.stats()["completes"] >= a.files,
            900,
            step=0.1,
            what=f"{a.files} completes",
        )
        t_seen = time.time()
        d1 = db.proc_cpu(daemon.pid)
        s1, p1 = net.cpu()
        log = net.sb.log()
    finally:
        db.Children.stop(daemon)
        net.stop()
    completes = db._t_of(log, db.COMPLETE)
    elapsed = completes[a.files - 1] - t_in - a.settle
    counts = db.queue_counts(run / "state" / "state.db") or {}
    problems = [e for e in db.log_events(dlog) if e.get("level") in ("warning", "error")]
    if counts.get("failed") or db.job_total(counts) != a.files:
        db.CTX.notes.append(f"daemon {label} rtt {rtt:g} {tag}: queue counts {counts}")
    if problems:
        db.CTX.notes.append(
            f"daemon {label} rtt {rtt:g} {tag}: {len(problems)} warning(s), first "
            f"{problems[0].get('event')}"
        )
    db._cleanup_run(run)
    wall = t_seen - t_in
    return {
        "kind": "daemon",
        "label": label,
        "rtt": rtt,
        "tag": tag,
        "rate": a.files / elapsed,
        "elapsed_s": elapsed,
        "cpu_ms": 1000 * (d1 - d0) / a.files,
        "sandbox_util": (s1 - s0) / wall,
        "proxy_util": (p1 - p0) / wall,
        "routes": db.route_counts(log),
        "warnings": len(problems),
        "load": f"{load0} → {db.loadavg()}",
    }


def run_sdk(a: argparse.Namespace, rtt: float, tag: str) -> dict[str, Any] | None:
    if not a.sdk_python:
        return None
    run = db._fresh(f"wan-sdk-{rtt:g}-{tag}")
    db.make_files(run / "files", a.sdk_files, a.file_kib * KiB)
    net = Net(run, rtt)
    out = run / "sdk.json"
    load0 = db.loadavg()
    try:
        proc = db.CTX.children.spawn(
            [
                a.sdk_python,
                str(DRIVER),
                "sdk-loop",
                str(out),
                net.url,
                db.TOKEN,
                "1",
                str(run / "files"),
                str(a.sdk_files),
            ],
            log=run / "sdk.log",
            cpu=db.CTX.client_cpu,
            env={k: v for k, v in db.CTX.env.items() if k != "PYTHONPATH"},
        )
        rc = proc.wait(900)
        res = json.loads(out.read_text()) if out.exists() else {"ok": False}
    finally:
        net.stop()
    if rc != 0 or not res.get("ok"):
        db.CTX.notes.append(f"SDK rtt {rtt:g} {tag}: failed: {res.get('error')}")
        return None
    db._cleanup_run(run)
    return {
        "kind": "sdk",
        "rtt": rtt,
        "tag": tag,
        "rate": res["files"] / res["upload_s"],
        "cpu_ms": 1000 * res["cpu_s"] / res["files"],
        "files": res["files"],
        "version": res.get("sdk_version"),
        "load": f"{load0} → {db.loadavg()}",
    }


def bench(a: argparse.Namespace) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for rnd in range(1, a.rounds + 1):
        for rtt in a.rtt_ms:
            order: list[tuple[str, str]] = [("loop", "")]
            order += [("daemon", label) for label in a.daemons]
            if a.loop_netio:
                order.append(("loop-netio", ""))
            if rnd % 2 == 0:
                order.reverse()
            order.append(("sdk", ""))
            for kind, label in order:
                tag = f"r{rnd}"
                if kind in ("loop", "loop-netio"):
                    r = run_loop(a, rtt, tag, netio=kind == "loop-netio")
                elif kind == "daemon":
                    r = run_daemon(a, rtt, label, a.daemons[label], tag)
                else:
                    if rnd > 1:
                        continue  # context only: one run per RTT
                    r2 = run_sdk(a, rtt, tag)
                    if r2 is None:
                        continue
                    r = r2
                name = f"{kind} {label}".strip()
                _say(
                    f"  round {rnd} rtt {rtt:g} ms {name}: {r['rate']:.1f} files/s, "
                    f"client CPU {r['cpu_ms']:.2f} ms/file"
                    + (
                        f", sandbox CPU {r['sandbox_util']:.0%}, proxy CPU {r['proxy_util']:.0%}"
                        if "sandbox_util" in r
                        else ""
                    )
                    + f", load {r['load']}"
                )
                runs.append(r)
    return runs


def _med(vals: list[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def report(a: argparse.Namespace, runs: list[dict[str, Any]], facts: dict[str, str]) -> str:
    L = [
        f"Run {facts['date']}: {facts['nproc']} CPUs ({facts['cpu']}), Python {facts['python']}, "
        f"Linux {facts['kernel']}. Command: `{a.command}`.",
        "",
        f"{a.files:,} files of {a.file_kib} KiB per run; the sandbox behind "
        "`tests/support/faultproxy.py` with `set_latency(RTT)` (every byte delivered RTT/2 later "
        "each way, a new connection's first bytes one RTT later still: the TCP handshake). Loop: "
        f"`httpx.AsyncClient`, {a.loop_concurrency} files in flight, the three calls per file. "
        "Daemon: `inboxd run`, `[upload]` at its defaults unless the label says otherwise, "
        f"`settle_seconds = {a.settle}` "
        "(subtracted), log at info. SDK: `marpledata` `push_file` in a loop over "
        f"{a.sdk_files} files (context). Sandbox and proxy pinned to CPU 1, each client to CPU 0"
        + (f"; every process at nice {a.nice}" if a.nice else "")
        + f"; {a.rounds} interleaved round(s), medians; ratios per round against that "
        "round's loop.",
        "",
        "| RTT | client | files/s | x loop | vs target | client CPU ms/file | sandbox / proxy CPU "
        "| load (1/5/15 min, start → end) |",
        "|---|---|---:|---:|---|---:|---:|---|",
    ]
    for rtt in a.rtt_ms:
        loops = {r["tag"]: r for r in runs if r["kind"] == "loop" and r["rtt"] == rtt}
        if not loops:
            continue
        lr = list(loops.values())
        L.append(
            f"| {rtt:g} ms | httpx loop, {a.loop_concurrency} in flight | "
            f"{_med([r['rate'] for r in lr]):.1f} | 1.00 | baseline | "
            f"{_med([r['cpu_ms'] for r in lr]):.2f} | "
            f"{_med([r['sandbox_util'] for r in lr]):.0%} / "
            f"{_med([r['proxy_util'] for r in lr]):.0%}"
            f" | {lr[0]['load']} |"
        )
        fast = {r["tag"]: r for r in runs if r["kind"] == "loop-netio" and r["rtt"] == rtt}
        if fast:
            fr = list(fast.values())
            fratio = _med([r["rate"] / loops[r["tag"]]["rate"] for r in fr if r["tag"] in loops])
            L.append(
                f"| {rtt:g} ms | same loop on inboxd's socket layer (`daemon.net.backend`) | "
                f"{_med([r['rate'] for r in fr]):.1f} | {fratio:.2f} | context | "
                f"{_med([r['cpu_ms'] for r in fr]):.2f} | "
                f"{_med([r['sandbox_util'] for r in fr]):.0%} / "
                f"{_med([r['proxy_util'] for r in fr]):.0%} | {fr[0]['load']} |"
            )
        for i, label in enumerate(a.daemons):
            ds = [
                r for r in runs if r["kind"] == "daemon" and r["label"] == label and r["rtt"] == rtt
            ]
            if not ds:
                continue
            ratios = [r["rate"] / loops[r["tag"]]["rate"] for r in ds if r["tag"] in loops]
            ratio = _med(ratios)
            verdict = (
                ("met" if ratio >= 0.8 else "**MISSED**") + " (≥ 0.8x)" if i == 0 else "candidate"
            )
            vs_fast = [r["rate"] / fast[r["tag"]]["rate"] for r in ds if r["tag"] in fast]
            if vs_fast:
                verdict += f"; {_med(vs_fast):.2f}x the netio loop"
            name = "inboxd run, defaults" if label == "defaults" else f"inboxd run, {label}"
            L.append(
                f"| {rtt:g} ms | {name} | {_med([r['rate'] for r in ds]):.1f} | {ratio:.2f} | "
                f"{verdict} | {_med([r['cpu_ms'] for r in ds]):.2f} | "
                f"{_med([r['sandbox_util'] for r in ds]):.0%} / "
                f"{_med([r['proxy_util'] for r in ds]):.0%} | {ds[0]['load']} |"
            )
        for r in runs:
            if r["kind"] == "sdk" and r["rtt"] == rtt:
                loop_rate = loops.get(r["tag"], lr[0])["rate"]
                L.append(
                    f"| {rtt:g} ms | marpledata {r['version']} `push_file` loop "
                    f"({r['files']} files) | {r['rate']:.1f} | {r['rate'] / loop_rate:.2f} | "
                    f"context | {r['cpu_ms']:.2f} | "
                    f"— | {r['load']} |"
                )
    L.append("")
    L.append(
        "Why files in flight matter: a small file costs three round trips (create, upload, "
        "complete), so a client with N files in flight cannot exceed N / (3 x RTT) files/s "
        "(40 ms: 4 in flight → 33 files/s, 32 → 267) until the client's CPU or the server "
        "runs out (see the sandbox / proxy column: they share CPU 1). CPU time (user+sys from "
        "/proc) moves far less with other load than files/s."
    )
    for n in db.CTX.notes:
        L.append(f"- note: {n}")
    return "\n".join(L)


def _daemon_spec(text: str) -> tuple[str, dict[str, str]]:
    label, _, rest = text.partition("=")
    settings: dict[str, str] = {}
    for item in rest.split(";"):
        if item.strip():
            key, sep, value = item.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"--daemon {text!r}: want LABEL=KEY=VALUE;...")
            settings[key.strip()] = value.strip()
    return label.strip(), settings


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--file-kib", type=int, default=16)
    p.add_argument(
        "--rtt-ms", type=lambda t: [float(x) for x in t.split(",") if x], default=[40.0, 10.0]
    )
    p.add_argument("--loop-concurrency", type=int, default=32)
    p.add_argument(
        "--no-loop-netio",
        dest="loop_netio",
        action="store_false",
        help="leave out the context loop on daemon.net.backend",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settle", type=float, default=0.1)
    p.add_argument("--sdk-files", type=int, default=100)
    p.add_argument("--sdk-python", default=None, help="a python that can import marple")
    p.add_argument("--no-sdk", action="store_true")
    p.add_argument(
        "--daemon",
        action="append",
        default=[],
        type=_daemon_spec,
        metavar="LABEL=KEY=VALUE;...",
        help="an extra daemon run with these [upload] settings (TOML values)",
    )
    p.add_argument("--no-defaults", action="store_true", help="only the --daemon runs")
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--quick", action="store_true", help="300 files, one round, 20 SDK files")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json-out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.files, a.rounds, a.sdk_files = 300, 1, 20
    a.daemons = {} if a.no_defaults else {"defaults": {}}
    a.daemons.update(dict(a.daemon))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    args = sys.argv[1:] if argv is None else argv
    base = (
        "bash bench/wan_run.sh"
        if os.environ.get("WAN_BENCH_VIA_RUN_SH")
        else ".venv/bin/python bench/wan_bench.py"
    )
    a.command = base + (" " + shlex.join(args) if args else "")
    if not a.no_sdk and a.sdk_python is None:
        cand = os.environ.get("BENCH_SDK_PYTHON") or str(
            Path.home() / ".cache/inboxd-bench/sdk-venv/bin/python"
        )
        ok = (
            Path(cand).exists()
            and subprocess.run([cand, "-c", "import marple.db"], capture_output=True).returncode
            == 0
        )
        a.sdk_python = cand if ok else None
        if not ok:
            _say("no marpledata SDK found (run bench/run.sh once, or --sdk-python): SDK skipped")
    signal.signal(signal.SIGTERM, db._on_signal)
    signal.signal(signal.SIGINT, db._on_signal)
    work = Path(tempfile.mkdtemp(prefix="inboxd-wan-bench-", dir="/var/tmp"))
    ctx = db.CTX
    ctx.work, ctx.keep, ctx.nice = work, a.keep, a.nice
    ctx.pin = not a.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if not ctx.pin:
        ctx.client_cpu = ctx.server_cpu = None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env["PYTHONUNBUFFERED"] = "1"
    ctx.env, ctx.daemon_env = env, dict(env)
    warm = "import daemon.commands.cli, daemon.service.run, daemon.sandbox, httpx, uvicorn"
    subprocess.run([db.PY, "-c", warm], env=env, cwd=work, check=True)
    facts = db.machine()
    _say(
        f"work dir {work}; {facts['nproc']} CPUs, pinning {'on' if ctx.pin else 'off'}, "
        f"load {db.loadavg()}; RTTs {a.rtt_ms} ms, {a.files} x {a.file_kib} KiB, "
        f"daemons {list(a.daemons)}"
    )
    runs: list[dict[str, Any]] = []
    rc = 0
    try:
        runs = bench(a)
    except db.Stop as exc:
        print(f"stopped by {exc}", file=sys.stderr)
        rc = 130
    finally:
        ctx.children.stop_all()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.json_out:
        a.json_out.write_text(json.dumps({"facts": facts, "runs": runs}, indent=1))
    if not runs:
        return rc or 1
    text = report(a, runs, facts)
    _say("\n" + text)
    if rc == 0 and not a.no_write and not a.quick:
        db.write_doc(text, START, END, HEADING)
        _say(f"written to docs/benchmarks.md between {START} and {END}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
