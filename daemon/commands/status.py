"""``inboxd status``: a read-only view of the state database. Never touches the network.

The JSON form (``--json``) is a stable interface for scripts; README documents it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.outcomes import change_note, what_to_do, where_delivered
from daemon.state import HEARTBEAT_SECONDS, Job, JobState, Queue

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
    #: failed jobs whose file was taken again since (each with ``superseded_by``)
    superseded: list[dict[str, Any]] = field(default_factory=list)
    filters: Filters | None = None
    #: how many failed jobs are superseded in all (``superseded`` lists the newest)
    failed_superseded: int = 0

    def as_json(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {
            "daemon": self.daemon,
            "counts": self.counts,
            "jobs": self.jobs,
            "failed_superseded": self.failed_superseded,
            "superseded_failures": self.superseded,
        }


@dataclass(frozen=True)
class Filters:
    """What ``status`` narrows its job list to (counts always cover everything)."""

    failed_only: bool = False
    #: a glob on the inbox-relative path
    path_glob: str | None = None
    #: Unix time: only jobs updated since
    since: float | None = None

    @property
    def active(self) -> bool:
        """Whether any filter is set."""
        return self.failed_only or self.path_glob is not None or self.since is not None


async def snapshot(
    queue: Queue, *, limit: int = 50, now: float | None = None, filters: Filters | None = None
) -> Snapshot:
    """Read the daemon's liveness, the counts per state and the jobs worth showing.

    Jobs are listed one per file: the newest job of each path. A failure whose file was
    taken again since (fixed, replaced) is not among the failures; it is listed under
    ``superseded`` with the job that replaced it, and ``counts.failed`` leaves it out.
    """
    now = time.time() if now is None else now
    f = filters or Filters()
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
    old_failures = await queue.count_superseded_failures()
    counts["failed"] = max(counts["failed"] - old_failures, 0)

    async def latest(state: JobState, order: Literal["recent", "oldest"]) -> list[Job]:
        return await queue.latest_jobs(
            state, limit=limit, order=order, since=f.since, rel_glob=f.path_glob
        )

    listed: list[Job] = []
    if not f.failed_only:
        listed += await latest(JobState.UPLOADING, "oldest")
        listed += await latest(JobState.IMPORTING, "oldest")
        listed += await latest(JobState.QUEUED, "oldest")
    listed += await latest(JobState.FAILED, "recent")
    if not f.failed_only:
        listed += await latest(JobState.DONE, "recent")
    jobs = [job_json(j, now) for j in listed]
    settling: list[dict[str, Any]] = []
    if not f.active:
        settling = [
            {"path": _show(s.rel), "state": "settling", "size": s.size, "since": s.since}
            for s in await queue.list_settling(limit)
        ]
    superseded = []
    if not f.active or f.failed_only:
        for job, newer in await queue.superseded_failures(min(limit, 20)):
            row = job_json(job, now)
            row["superseded_by"] = newer
            superseded.append(row)
    return Snapshot(daemon, counts, settling + jobs, now, superseded, f, old_failures)


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
        # The JSON keeps its names from before schema v5 (scripts read them): the queue's
        # target-neutral remote_name/remote_id are shown as dataset_name/dataset_id here, the
        # one place that maps them.
        "dataset_name": job.remote_name,
        "dataset_id": job.remote_id,
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
        "fell_back_to_server": job.fell_back,
        "after_upload": job.after_upload,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
        # added in 0.2: what a person should do about a failure, and the newer job of this
        # file that made the failure history (see Snapshot.superseded)
        "what_to_do": what_to_do(job.error_kind or "", job.id) if state == "failed" else None,
        "superseded_by": None,
        # what this version was to the file's last delivery (Job.change), and in words; for
        # a renamed file recognised as delivered, where it was delivered from
        "change": job.change,
        "note": job.last_error
        if job.error_kind == "renamed"
        else change_note(job.change, job.target, job.target_refs, job.remote_id),
    }


def render(snap: Snapshot) -> str:
    """The human view: one screen, most urgent first; every job with its id."""
    lines = _header(snap)
    if snap.filters is not None and snap.filters.active:
        return "\n".join(lines + _table(snap))
    groups: dict[str, list[dict[str, Any]]] = {}
    for job in snap.jobs:
        groups.setdefault(job["state"], []).append(job)
    for job in groups.get("uploading", []):
        extra = ""
        if job["rate_bytes_per_s"]:
            extra = f"  {_human(job['rate_bytes_per_s'])}/s  ETA {_duration(job['eta_seconds'])}"
        pct = job["percent"] if job["percent"] is not None else 0.0
        lines.append(
            f"  ↑ {_id(job)} {job['path']}  {pct:.0f}% of {_human(job['size'])}"
            f"  [{job['mode']}]{extra}"
        )
    for job in groups.get("importing", []):
        prog = job["import_progress"]
        p = f" {prog:.0f}%" if isinstance(prog, int | float) else ""
        note = f"  — {job['note']}" if job.get("note") else ""
        lines.append(
            f"  ⋯ {_id(job)} {job['path']}  import {job['import_status'] or 'pending'}{p}{note}"
        )
    for job in groups.get("settling", [])[:10]:
        lines.append(f"  ~ {'':>5} {job['path']}  settling ({_human(job['size'])})")
    waiting = [j for j in groups.get("queued", []) if j["error"]]
    for job in waiting[:10]:
        when = max(0.0, (job["next_attempt_at"] or snap.taken_at) - snap.taken_at)
        lines.append(
            f"  ↻ {_id(job)} {job['path']}  retry in {_duration(when)}: {short_reason(job)}"
        )
    for job in groups.get("done", [])[:5]:
        lines.append(f"  ✓ {_id(job)} {job['path']}  {_delivered(job)}")
    failed = groups.get("failed", [])
    if failed:
        lines.append("failed — fix the cause, then `inboxd retry ID` (or `--all-failed`):")
        for job in failed[:10]:
            lines.append(f"  ✗ {_id(job)} {job['path']}  {short_reason(job)}")
        if len(failed) > 10 or snap.counts["failed"] > 10:
            lines.append(f"  … {snap.counts['failed']} in all: `inboxd status --failed`")
    if snap.superseded:
        lines.append("fixed since (failed earlier; a newer version of the file took over):")
        for job in snap.superseded[:5]:
            lines.append(f"  ⤳ {_id(job)} {job['path']}  superseded by #{job['superseded_by']}")
    return "\n".join(lines)


def _header(snap: Snapshot) -> list[str]:
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
    return lines


def _table(snap: Snapshot) -> list[str]:
    """The filtered view: one line per file, its newest job and outcome."""
    rows = [j for j in snap.jobs if j["state"] != "settling"]
    rows += snap.superseded
    if not rows:
        return ["(no file matches)"]
    width = max(len(j["path"]) for j in rows)
    width = min(max(width, 4), 60)
    out = [f"{'ID':>6}  {'STATE':<10} {'PATH':<{width}}  OUTCOME"]
    for job in rows:
        state = "superseded" if job.get("superseded_by") else job["state"]
        out.append(f"{job['id']:>6}  {state:<10} {job['path']:<{width}}  {_outcome(job)}")
    return out


def _outcome(job: dict[str, Any]) -> str:
    if job.get("superseded_by"):
        return f"failed earlier, fixed: job {job['superseded_by']} took over"
    state = job["state"]
    if state == "done":
        return _delivered(job)
    if state == "failed":
        return short_reason(job)
    if state == "uploading":
        return f"{job['percent'] or 0:.0f}% of {_human(job['size'])}"
    if state == "importing":
        return f"import {job['import_status'] or 'pending'}"
    if state == "queued" and job["error"]:
        return f"waiting to retry: {short_reason(job)}"
    return "waiting"


def _id(job: dict[str, Any]) -> str:
    return f"#{job['id']:<4}"


#: How long a reason may be on the one-screen view (the full text is in --json and the log).
_SHORT = 110


def short_reason(job: dict[str, Any]) -> str:
    """A job's error without the advice part and the path it repeats, cut to one line."""
    text = str(job.get("error") or "")
    text = text.split(" — ", 1)[0]
    path = str(job.get("path") or "")
    for prefix in (f"{path}: ", f"{path.rsplit('/', 1)[-1]}: "):
        text = text.removeprefix(prefix)
    text = " ".join(text.split())
    return text if len(text) <= _SHORT else text[: _SHORT - 1] + "…"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: "90s", "15m", "2h", "3d", "1w" ago, or a local date/time
    ("2026-11-20", "2026-11-20 14:30"). Returns Unix time; ValueError with an example."""
    now = time.time() if now is None else now
    value = text.strip()
    if value and value[-1].lower() in _UNITS and value[:-1].replace(".", "", 1).isdigit():
        return now - float(value[:-1]) * _UNITS[value[-1].lower()]
    from daemon.compat import fromisoformat

    try:
        return fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a time ago such as 30m, 2h or 3d, or a date such as "
            "2026-11-20 or '2026-11-20 14:30'"
        ) from None


def _delivered(job: dict[str, Any]) -> str:
    """Where a done job's file went and its import status, or how it was delivered."""
    status = f" ({job['import_status']})" if job.get("import_status") else ""
    return f"{job.get('note') or where_delivered(job)}{status}"


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
