"""``inboxd push``: upload files once, without the daemon, and wait for their import.

Files go through the configured target (``[api] kind``: Marple DB, the older Marple API or
the data service), exactly as the daemon delivers them, with ``[upload] on_name_clash``
(``--overwrite`` forces ``overwrite``). Nothing is queued: a file that cannot be delivered
now is reported, with what to do, and the command exits 1.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import anyio

from daemon.config import Settings
from daemon.delivery import Delivered, ImportUpdate, Target, Work
from daemon.delivery.factory import open_target
from daemon.delivery.files import FileRef
from daemon.delivery.flow import MemoryJournal, Resume, UploadOptions
from daemon.errors import (
    AuthError,
    FileChangedError,
    FileProblem,
    InboxdError,
    NotFoundError,
    UploadFailed,
)
from daemon.retry import RetryPolicy
from daemon.state import FileIdentity, Job, JobState, Stage


@dataclass(frozen=True)
class PushRequest:
    """What ``inboxd push`` was asked to do."""

    files: list[Path]
    #: dataset (or source) name; one file only
    name: str | None = None
    #: where ``--stream`` came from, for messages ("--stream" or "[upload] stream")
    stream_from: str = "[upload] stream"
    metadata: dict[str, str] | None = None
    wait: bool = True
    wait_timeout: float = 3600.0
    quiet: bool = False


def push(settings: Settings, request: PushRequest) -> list[dict[str, Any]]:
    """Deliver ``request.files``; one result row per file (``error`` set when it failed)."""
    return anyio.run(_push, settings, request)


async def _push(settings: Settings, request: PushRequest) -> list[dict[str, Any]]:
    options = UploadOptions(
        policy=RetryPolicy.from_settings(settings.retry),
        part_concurrency=settings.upload.part_concurrency,
        abort_on_give_up=True,
        abort_on_cancel=True,
        # A push uploads what it is told to, even a file the service already holds.
        recognise_delivered=False,
    )
    results: list[dict[str, Any]] = []
    async with open_target(settings, options) as target:
        try:
            stream_id = await target.resolve_destination(settings.upload.stream)
        except NotFoundError as exc:
            # The message names the streams this token sees; the fix is where the stream came
            # from (a flag or the config), not always the config.
            raise NotFoundError(
                exc.detail,
                endpoint=exc.endpoint,
                advice=f"give an existing stream id or name with {request.stream_from}",
            ) from None
        jobs: list[Job] = []
        for n, path in enumerate(request.files, start=1):
            row, job = await _push_one(target, settings, request, n, path, stream_id)
            results.append(row)
            if job is not None:
                jobs.append(job)
        if request.wait and jobs:
            await _wait_imports(target, jobs, results, request)
    return results


def _job(n: int, ref: FileRef, name: str, stream_id: int, kind: str, meta: dict[str, Any]) -> Job:
    """An in-memory job: the targets deliver jobs, and push has no queue."""
    now = time.time()
    return Job(
        id=n,
        identity=FileIdentity(name, ref.size, ref.mtime_ns, ref.inode),
        state=JobState.UPLOADING,
        stage=Stage.NEW,
        stream_id=stream_id,
        remote_name=name,
        metadata=meta,
        upload_key=uuid.uuid4().hex,
        ingestion_id=None,
        remote_id=None,
        mode=None,
        part_size=None,
        bytes_sent=0,
        attempts=0,
        next_attempt_at=now,
        last_error=None,
        error_kind=None,
        import_status=None,
        import_progress=None,
        import_message=None,
        fell_back=False,
        after_upload=None,
        created_at=now,
        updated_at=now,
        started_at=now,
        uploaded_at=None,
        finished_at=None,
        lease_owner=None,
        lease_expires_at=None,
        target=kind,
        same_path_jobs=0,
    )


async def _push_one(
    target: Target,
    settings: Settings,
    request: PushRequest,
    n: int,
    path: Path,
    stream_id: int,
) -> tuple[dict[str, Any], Job | None]:
    name = request.name or path.name
    row: dict[str, Any] = {
        "file": str(path),
        "dataset_name": name,
        "dataset_id": None,
        "mode": None,
        "import_status": None,
        "import_message": None,
        "error": None,
    }
    try:
        ref = FileRef.stat(path)
        meta = {**settings.upload.metadata, **(request.metadata or {})}
        job = _job(n, ref, name, stream_id, target.kind, meta)
        bar = ProgressBar(name, ref.size, sys.stderr, enabled=not request.quiet)
        work = Work(
            job=job,
            file=ref,
            resume=Resume(),
            journal=MemoryJournal(),
            progress=bar.add,
        )
        try:
            delivered: Delivered = await target.deliver(work)
        finally:
            bar.close()
    except FileChangedError:
        row["error"] = (
            f"{path}: the file changed or disappeared while it was being uploaded; nothing "
            "was kept on the server — push it again once it is complete"
        )
        return row, None
    except NotFoundError as exc:
        if exc.endpoint != "GET /streams":
            row["error"] = str(exc)
            return row, None
        row["error"] = (
            f"{exc.endpoint}: {exc.detail} — give an existing stream id or name with "
            f"{request.stream_from} (`inboxd check` lists them)"
        )
        return row, None
    except (FileProblem, UploadFailed, AuthError) as exc:
        row["error"] = str(exc)
        return row, None
    except InboxdError as exc:
        row["error"] = f"{exc} (nothing was kept on the server; push it again later)"
        return row, None
    row.update(
        dataset_id=delivered.dataset_id,
        mode=delivered.mode,
        dataset_name=delivered.dataset_name,
    )
    if delivered.refs:
        row["target_refs"] = delivered.refs
    if not delivered.needs_poll:
        row["import_status"] = "DELIVERED"
        return row, None
    done = replace(
        job,
        state=JobState.IMPORTING,
        remote_id=delivered.dataset_id,
        remote_name=delivered.dataset_name,
        target_refs=dict(delivered.refs),
    )
    return row, done


async def _wait_imports(
    target: Target, jobs: list[Job], rows: list[dict[str, Any]], request: PushRequest
) -> None:
    by_id = {job.id: rows[job.id - 1] for job in jobs}
    pending = {job.id: job for job in jobs}
    deadline = time.monotonic() + request.wait_timeout
    while pending and time.monotonic() < deadline:
        updates: list[ImportUpdate] = []
        try:
            updates = await target.poll(list(pending.values()))
        except InboxdError as exc:
            if not exc.retryable:
                raise
        for update in updates:
            row = by_id.get(update.job_id)
            if row is None:
                continue
            row.update(import_status=update.status, import_message=update.message)
            if update.terminal:
                pending.pop(update.job_id, None)
                if update.failed:
                    row["error"] = f"import failed: {update.message or update.status}"
        if pending:
            await anyio.sleep(0.5)
    if pending and not request.quiet:
        print(
            f"inboxd: {len(pending)} import(s) still running after {request.wait_timeout:.0f} s"
            " (the upload itself is complete)",
            file=sys.stderr,
        )


class ProgressBar:
    """One line on stderr: bytes, percent, rate and ETA. Silent when stderr is not a TTY."""

    def __init__(self, name: str, total: int, out: TextIO, *, enabled: bool = True) -> None:
        self.name, self.total, self.out = name, total, out
        self.enabled = enabled and out.isatty()
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (
            f"\r{self.name[:40]:<40} {_human(self.done)}/{_human(self.total)} {pct:5.1f}% "
            f"{_human(rate)}/s ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        self.out.write(line)
        self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
