"""``inboxd status``: a read-only view of the state database. Never touches the network.

The JSON form (``--json``) is a stable interface for scripts; README documents it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from daemon.queue import Job, JobState, Queue

#: how often the daemon writes its heartbeat (status calls it dead after a few missed ones)
HEARTBEAT_SECONDS = 2.0

#: public job states of ``status --json``
STATES = ("settling", "queued", "uploading", "importing", "done", "failed")
_ALIVE_AFTER = HEARTBEAT_SECONDS * 4


@dataclass(frozen=True)
class Snapshot:
    """Everything ``status`` shows, taken in one read."""

    daemon: dict[str, Any]
    counts: dict[str, int]
    jobs: list[dict[str, Any]]
    taken_at: float

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {"daemon": self.daemon, "counts": self.counts, "jobs": self.jobs}


async def snapshot(queue: Queue, *, limit: int = 50, now: float | None = None) -> Snapshot:
    """Read the daemon's liveness, the counts per state and the jobs worth showing."""
    now = time.time() if now is None else now
    info = await queue.daemon_info()
    daemon: dict[str, Any] = {"alive": False, "pid": None}
    if info is not None:
        alive = now - info.heartbeat_at < _ALIVE_AFTER and _pid_alive(info.pid)
        daemon = {
            "alive": alive,
            "pid": info.pid,
            "started_at": info.started_at,
            "heartbeat_at": info.heartbeat_at,
            "paused": info.info.get("paused"),
            "version": info.info.get("version"),
            "inbox": info.info.get("inbox"),
            "window": info.info.get("window"),
            "disk": info.info.get("disk"),
            "inbox_problem": info.info.get("inbox_problem"),
        }
    raw = await queue.counts()
    counts = {state: int(raw.get(state, 0)) for state in STATES}
    active = await queue.list_jobs([JobState.UPLOADING], limit=limit, order="oldest")
    importing = await queue.list_jobs([JobState.IMPORTING], limit=limit, order="oldest")
    queued = await queue.list_jobs([JobState.QUEUED], limit=limit, order="oldest")
    failed = await queue.recent_failures(limit)
    done = await queue.list_jobs([JobState.DONE], limit=limit, order="recent")
    jobs = [job_json(j, now) for j in (*active, *importing, *queued, *failed, *done)]
    settling = [
        {"path": _show(f.rel), "state": "settling", "size": f.size, "since": f.since}
        for f in await queue.list_settling(limit)
    ]
    jobs = settling + jobs
    return Snapshot(daemon, counts, jobs, now)


def job_json(job: Job, now: float) -> dict[str, Any]:
    """One job as ``status --json`` shows it."""
    ident = job.identity
    state = job.state.value
    pct = None
    rate = None
    eta = None
    if state == "uploading" and ident.size:
        pct = round(100.0 * min(job.bytes_sent, ident.size) / ident.size, 1)
        started = job.updated_at if job.started_at is None else job.started_at
        elapsed = max(now - started, 1e-3)
        if job.bytes_sent > 0:
            rate = job.bytes_sent / elapsed
            eta = max(ident.size - job.bytes_sent, 0) / rate
    return {
        "id": job.id,
        "path": _show(ident.rel),
        "state": state,
        "size": ident.size,
        # 0 in the queue: a route names its stream, looked up at the first upload attempt
        "stream_id": job.stream_id or None,
        "dataset_name": job.dataset_name,
        "dataset_id": job.dataset_id,
        "ingestion_id": job.ingestion_id,
        "mode": job.mode,
        "target": job.target,
        "target_refs": job.target_refs,
        "bytes_sent": job.bytes_sent,
        "percent": pct,
        "rate_bytes_per_s": round(rate, 1) if rate is not None else None,
        "eta_seconds": round(eta, 1) if eta is not None else None,
        "attempts": job.attempts,
        "next_attempt_at": job.next_attempt_at if state == "queued" else None,
        "import_status": job.import_status,
        "import_progress": job.import_progress,
        "import_message": job.import_message,
        "error": job.last_error if state in ("failed", "queued") else None,
        "error_kind": job.error_kind if state in ("failed", "queued") else None,
        # a renamed file recognised as delivered: where it was delivered from
        "note": job.last_error if job.error_kind == "renamed" else None,
        "fell_back_to_server": job.fell_back,
        "after_upload": job.after_upload,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
    }


def render(snap: Snapshot) -> str:
    """The human view: one screen, most urgent first."""
    lines = []
    d = snap.daemon
    if d.get("alive"):
        up = _duration(snap.taken_at - d["started_at"])
        lines.append(f"daemon: running (pid {d['pid']}, up {up}, inboxd {d.get('version')})")
    elif d.get("pid"):
        ago = _duration(snap.taken_at - d["heartbeat_at"])
        lines.append(f"daemon: NOT RUNNING (last seen {ago} ago, pid {d['pid']})")
    else:
        lines.append("daemon: never ran with this state database")
    if d.get("paused"):
        lines.append(f"uploads PAUSED: {d['paused']}")
    window = d.get("window") or {}
    if window.get("waiting_until"):
        opens = time.strftime("%a %H:%M", time.localtime(window["waiting_until"]))
        spec = ", ".join(window.get("windows") or [])
        lines.append(f"uploads wait for the upload window ({spec}): opens {opens}")
    problem = d.get("inbox_problem") or {}
    if problem.get("problem") and d.get("alive"):
        since = time.strftime("%a %H:%M:%S", time.localtime(problem["since"]))
        lines.append(f"INBOX MISSING since {since}: {problem['problem']}; uploads wait for it")
    disk = d.get("disk") or {}
    if disk.get("low"):
        lines.append(
            f"DISK LOW: {_human(disk['free_bytes'])} free ({disk['free_percent']}%) "
            "on the inbox's filesystem"
        )
    c = snap.counts
    lines.append("  ".join(f"{k} {c[k]}" for k in STATES))
    groups: dict[str, list[dict[str, Any]]] = {}
    for job in snap.jobs:
        groups.setdefault(job["state"], []).append(job)
    for job in groups.get("uploading", []):
        extra = ""
        if job["rate_bytes_per_s"]:
            extra = f"  {_human(job['rate_bytes_per_s'])}/s  ETA {_duration(job['eta_seconds'])}"
        pct = job["percent"] if job["percent"] is not None else 0.0
        lines.append(
            f"  ↑ {job['path']}  {pct:.0f}% of {_human(job['size'])}  [{job['mode']}]{extra}"
        )
    for job in groups.get("importing", []):
        prog = job["import_progress"]
        p = f" {prog:.0f}%" if isinstance(prog, int | float) else ""
        lines.append(f"  ⋯ {job['path']}  import {job['import_status'] or 'pending'}{p}")
    for job in groups.get("settling", [])[:10]:
        lines.append(f"  ~ {job['path']}  settling ({_human(job['size'])})")
    waiting = [j for j in groups.get("queued", []) if j["error"]]
    for job in waiting[:10]:
        when = max(0.0, (job["next_attempt_at"] or snap.taken_at) - snap.taken_at)
        lines.append(f"  ↻ {job['path']}  retry in {_duration(when)}: {job['error']}")
    for job in groups.get("done", [])[:5]:
        note = f"  {job['note']}" if job.get("note") else ""
        lines.append(f"  ✓ {job['path']}  {_where(job)} ({job['import_status']}){note}")
    failed = groups.get("failed", [])
    if failed:
        lines.append("recent failures:")
        for job in failed[:10]:
            lines.append(f"  ✗ {job['path']}  {job['error']}")
    return "\n".join(lines)


def _where(job: dict[str, Any]) -> str:
    """Where a delivered file went, in the target's own terms."""
    refs = job.get("target_refs") or {}
    if job.get("target") == "marple":
        link = f", {refs['share_link']}" if refs.get("share_link") else ""
        return f"source {job['dataset_id']}{link}"
    if job.get("target") == "data-service" and refs.get("data_source"):
        return f"data source {refs['data_source']}"
    return f"dataset {job['dataset_id']}"


def to_json(snap: Snapshot) -> str:
    """``status --json``: strict JSON, a NaN or infinity (from a server) shows as null."""
    return json.dumps(_finite(snap.as_json()), indent=2, ensure_ascii=False, allow_nan=False)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _show(rel: str) -> str:
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
