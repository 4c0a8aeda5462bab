"""Upload workers: claim a job, run (or resume) its ingestion, record the outcome.

Each outcome is one of: uploaded (→ the poller takes over), back in the queue with a per-job
backoff (transient trouble; the ingestion stays open and is resumed), failed with a reason a
person understands (permanent trouble), superseded (the file changed; its new version is a new
job), or paused (the token was refused: nothing else is tried until a probe succeeds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import structlog

from daemon.delivery import Target, Work, content, service_answers
from daemon.delivery.files import FileRef
from daemon.delivery.flow import Resume
from daemon.engine.metrics import EngineMetrics
from daemon.errors import (
    AuthError,
    ConflictError,
    EmptyFileError,
    FileChangedError,
    FileProblem,
    InboxdError,
    NotFoundError,
    NotYetError,
    UploadFailed,
)
from daemon.net.bandwidth import UploadWindows
from daemon.outcomes import change_note, what_to_do
from daemon.retry import CURRENT_HOLD, ServiceHold, backoff_delay, is_service_trouble
from daemon.state import Job, JobState, PriorDelivery, Queue, QueueError, Stage

if TYPE_CHECKING:
    from daemon.state import InboxTrouble

_log = structlog.get_logger(__name__)

LEASE_SECONDS = 60.0
_IDLE_POLL = 1.0  # also picks up `inboxd retry` done by another process
_PROGRESS_EVERY = 1.0  # seconds between bytes_sent writes (a write per chunk would be waste)
_MAX_ATTEMPTS_UNEXPECTED = 20
_UNFINISHED = (JobState.SUPERSEDED, JobState.FAILED, JobState.UPLOADING)
#: error kinds of jobs backed off because the service did not answer (due again once it does)
_OUTAGE_KINDS = ("network", "server", "rate_limited")


@dataclass(frozen=True)
class WorkerSettings:
    count: int
    #: tries of a job whose ingestion vanished on the server before it is failed
    attempts: int
    backoff_base: float
    backoff_cap: float
    #: longest hold of all workers while the service is unreachable ([retry] cap_seconds)
    outage_cap: float = 60.0
    #: longest wait a server's Retry-After imposes ([retry] max_retry_after_seconds)
    max_retry_after: float = 300.0
    #: how often a hold asks the service whether it is back ([retry] probe_seconds)
    probe_seconds: float = 3.0
    #: [inbox] follow_symlinks: a job's path may be a symlink to a file inside the inbox
    follow_symlinks: bool = False
    #: [upload] on_append: "same-dataset" delivers a delivered file that grew by appending
    #: into the dataset it went to; "new-version" as a new version (``on_name_clash``)
    on_append: str = "same-dataset"
    #: the state database was created at this start: once the queue is idle, say how many
    #: files the service turned out to hold already (a restore over a lost database)
    fresh_state: bool = False
    #: [upload] small_files: more loops that take only files of at most ``small_file_bytes``
    small_files: int = 0
    small_file_bytes: int = 1024 * 1024


class Pause:
    """Shared "uploads are paused" state: set on a refused token, cleared by a probe."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self._on_change = on_change
        self.reason: str | None = None
        self._resumed = anyio.Event()
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return self.reason is not None

    def pause(self, reason: str) -> None:
        if self.reason is None:
            self._resumed = anyio.Event()
        self.reason = reason
        if self._on_change is not None:
            self._on_change()

    def resume(self) -> None:
        self.reason = None
        self._resumed.set()
        if self._on_change is not None:
            self._on_change()

    async def wait_resumed(self) -> None:
        await self._resumed.wait()


class _Journal:
    """The upload flow's journal, written to the queue before/after each side effect."""

    def __init__(self, queue: Queue, job_id: int, *, parts_possible: bool) -> None:
        self._queue = queue
        self._job_id = job_id
        # Whether parts of an earlier ingestion may be recorded: only then is a reset worth
        # a DELETE (most files are never multipart; this saves a write per journal entry).
        self._parts_possible = parts_possible

    async def save(self, resume: Resume) -> None:
        named: dict[str, Any] = {}
        if resume.dataset_name is not None:
            named["remote_name"] = resume.dataset_name
        await self._queue.save_progress(
            self._job_id,
            stage=Stage(resume.stage),
            ingestion_id=resume.ingestion_id,
            remote_id=resume.dataset_id,
            mode=resume.mode,
            part_size=resume.part_size,
            fell_back=resume.fell_back,
            **named,
        )
        if not resume.parts_done and self._parts_possible:
            await self._queue.clear_parts(self._job_id)
            self._parts_possible = False

    @property
    def parts_possible(self) -> bool:
        """Whether parts may be recorded for this job (False: none ever were)."""
        return self._parts_possible

    async def part_done(self, part_number: int, digest: bytes | None = None) -> None:
        self._parts_possible = True
        await self._queue.mark_part_done(self._job_id, part_number, digest)


class Workers:
    """Upload loops over one queue, in two lanes.

    ``count`` loops take any file; ``small_files`` more take only files of at most
    ``small_file_bytes``. A small file is latency-bound (three round trips of waiting, little
    to send), so on a real network many of them must be in flight to keep the link busy,
    while large files stay bounded by ``count`` x ``part_concurrency`` parts in flight. The
    pause, the upload windows, the outage hold and the bandwidth limit are checked by every
    loop, so they hold for the total.
    """

    def __init__(
        self,
        queue: Queue,
        target: Target,
        inbox: Path,
        settings: WorkerSettings,
        *,
        pause: Pause | None = None,
        owner: str | None = None,
        metrics: EngineMetrics | None = None,
        windows: UploadWindows | None = None,
        resolve_stream: Callable[[Job], Awaitable[int]] | None = None,
        inbox_trouble: Callable[[], InboxTrouble | None] | None = None,
    ) -> None:
        self.metrics = metrics
        #: what is wrong with the inbox folder now, or None: while it is missing no job is
        #: claimed, and a job whose file went missing waits instead of failing
        self.inbox_trouble = inbox_trouble
        #: the stream id of a job queued as stream 0 (its stream name not looked up yet)
        self.resolve_stream = resolve_stream
        self.windows = windows
        #: when uploads wait for an upload window: the time it opens (for status)
        self.window_opens_at: datetime | None = None
        self.queue = queue
        self.target = target
        self.inbox = inbox
        self.settings = settings
        self.pause = pause or Pause()
        self.owner = owner or f"inboxd-{os.getpid()}"
        self.stopping = anyio.Event()
        # A circuit breaker: while the service is unreachable, no worker claims the next job
        # just to fail it too (an outage must not churn through the whole queue). A probe
        # (``_probe_holds``) ends the hold as soon as the service answers again.
        self.hold = ServiceHold(
            base=settings.backoff_base,
            cap=settings.outage_cap,
            max_retry_after=settings.max_retry_after,
            trial_every=settings.probe_seconds,
        )
        self._wake = anyio.Event()
        #: whether a loop polls the queue for due jobs (the other idle loops wait on it)
        self._polling = False
        self.active: dict[int, Job] = {}
        self._sent: dict[int, _ProgressSaver] = {}
        #: files found already on the server (``on_server``) in this run, and whether the
        #: summary of a fresh state database has been logged
        self.found_on_server = 0
        self._fresh_summary_done = not settings.fresh_state

    def in_flight(self) -> tuple[int, int, int]:
        """(files, bytes sent, bytes total) of the uploads running now."""
        sent = sum(max(p.total, 0) for p in self._sent.values())
        total = sum(j.identity.size for j in self.active.values())
        return len(self.active), min(sent, total), total

    def _window_closed(self, opens_at: datetime) -> None:
        if self.window_opens_at is None:
            _log.info("upload.window_closed", opens_at=opens_at.isoformat(timespec="minutes"))
        self.window_opens_at = opens_at
        if self.metrics is not None:
            self.metrics.set_upload_window_open(False)

    def _window_open(self) -> None:
        if self.window_opens_at is not None:
            _log.info("upload.window_open")
            self.window_opens_at = None
        if self.metrics is not None:
            self.metrics.set_upload_window_open(True)

    def wake(self) -> None:
        """New work was queued: stop idling."""
        self._wake.set()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until cancelled, or until ``stopping`` is set and work is done."""
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._housekeeping)
            outer.start_soon(self._probe_holds)
            async with anyio.create_task_group() as tg:
                for i in range(self.settings.count):
                    tg.start_soon(self._loop, i)
                small = self.settings.small_file_bytes
                for i in range(self.settings.small_files):
                    tg.start_soon(self._loop, f"s{i}", small)
                task_status.started()
            outer.cancel_scope.cancel()  # the loops are done: nothing left to keep

    async def _loop(self, index: int | str, max_size: int | None = None) -> None:
        log = _log.bind(worker=index)
        CURRENT_HOLD.set(self.hold)  # a step's retries inside this task wait for the hold
        while not self.stopping.is_set():
            if self.pause.paused:
                with anyio.move_on_after(_IDLE_POLL):
                    await self.pause.wait_resumed()
                continue
            if self.windows is not None and not self.windows.always_open:
                await self.windows.wait_open(on_wait=self._window_closed)
                self._window_open()
            if self.hold.left > 0:
                await self.hold.wait_over()
                continue
            if self._inbox_held():
                await anyio.sleep(_IDLE_POLL)  # every file is in there: nothing can upload
                continue
            if max_size is not None and not self.hold.proven:
                # The small-file lane starts once a file went through (after start-up and
                # after trouble): a service that is down is not asked by dozens of loops at
                # once, only by the `workers` ones, and then by one trial at a time.
                with anyio.move_on_after(_IDLE_POLL):
                    await self.hold.wait_proven()
                continue
            job = await self.queue.claim(f"{self.owner}/{index}", LEASE_SECONDS, max_size=max_size)
            if job is None:
                self._fresh_summary()
                await self._idle()
                continue
            try:
                await self._process(job)
            except QueueError:
                # Not this file's problem: the state database cannot be written (full disk,
                # I/O error). Carrying on would only hide it; the service stops and says why.
                raise
            except Exception:  # the daemon must outlive any one file
                log.exception("worker.unexpected", job_id=job.id)
                await self._backoff(job, "internal error (see the log); will retry", "internal")

    def _fresh_summary(self) -> None:
        """Once the queue has run dry after a start on a new state database: how many of the
        files the start-up scan took the service already held (one line, once)."""
        if self._fresh_summary_done or self.active or not self.found_on_server:
            return
        self._fresh_summary_done = True
        _log.warning(
            "state.fresh_database",
            files=self.found_on_server,
            note=f"the state database is new; {self.found_on_server} files were already on the"
            " server (same name, size and modification time): not uploaded again",
        )

    async def _idle(self) -> None:
        """Wait for work: new files (``wake``), a backoff that ends, or another process's
        ``inboxd retry``. One idle loop polls the queue for the latter two and wakes the rest
        when something is due: with dozens of loops, each polling on its own would cost the
        database dozens of reads a second while nothing happens."""
        if self._polling:
            await self._wake.wait()
        else:
            self._polling = True
            try:
                while not self._wake.is_set():
                    due = await self.queue.next_due_at()
                    now = time.time()
                    if due is not None and due <= now:
                        break
                    wait = _IDLE_POLL if due is None else min(_IDLE_POLL, due - now)
                    with anyio.move_on_after(wait):
                        await self._wake.wait()
            finally:
                self._polling = False
            self._wake.set()  # something is due (or new): every idle loop tries to claim
        if self._wake.is_set():
            self._wake = anyio.Event()

    async def _process(self, job: Job) -> None:
        rel = job.identity.rel
        structlog.contextvars.bind_contextvars(job_id=job.id, path=rel)
        try:
            self.active[job.id] = job
            saver = self._sent[job.id] = _ProgressSaver(self.queue, job.id)
            await self._upload(job, saver)
        finally:
            self.active.pop(job.id, None)
            self._sent.pop(job.id, None)
            structlog.contextvars.unbind_contextvars("job_id", "path")

    async def _housekeeping(self) -> None:
        """Keep the leases of the jobs in flight and their ``bytes_sent`` current.

        One task for all jobs rather than two per job: most files take milliseconds, and
        starting and cancelling tasks for each cost more than the upload's own bookkeeping.
        """
        renewed = time.monotonic()
        while True:
            await anyio.sleep(_PROGRESS_EVERY)
            for saver in list(self._sent.values()):
                await saver.flush()
            if time.monotonic() - renewed >= LEASE_SECONDS / 3:
                renewed = time.monotonic()
                for job_id in list(self.active):
                    await self.queue.renew_lease(job_id, self._owner_of(job_id), LEASE_SECONDS)

    def _owner_of(self, job_id: int) -> str:
        job = self.active.get(job_id)
        return job.lease_owner if job is not None and job.lease_owner else self.owner

    async def _upload(self, job: Job, sent: _ProgressSaver) -> None:
        ident = job.identity
        path = self.inbox / ident.rel
        if self.settings.follow_symlinks and path.is_symlink():
            # Upload the target, and only while it still lies inside the inbox: the link may
            # have been pointed elsewhere since the watcher checked it.
            real = await anyio.to_thread.run_sync(_target_inside, path, self.inbox)
            if real is None:
                await self._fail(job, f"{ident.rel}: the symlink points outside the inbox", "file")
                return
            path = real
        ref = FileRef(path, ident.size, ident.mtime_ns, ident.inode, ident.ctime_ns)
        parts = await self.queue.part_digests(job.id) if job.ingestion_id else {}
        resume = Resume(
            stage=job.stage if job.stage != Stage.COMPLETED else Stage.COMPLETING,
            ingestion_id=job.ingestion_id,
            dataset_id=job.remote_id,
            dataset_name=job.remote_name,
            mode=job.mode,
            part_size=job.part_size,
            parts_done=set(parts),
            fell_back=job.fell_back,
            part_digests={n: d for n, d in parts.items() if d is not None},
        )
        predecessors, previous_refs, prior = await self._history(job)
        journal = _Journal(self.queue, job.id, parts_possible=job.ingestion_id is not None)
        work = Work(
            job=job,
            file=ref,
            resume=resume,
            journal=journal,
            progress=sent.add,
            predecessor_keys=predecessors,
            previous_refs=previous_refs,
        )
        log = _log.bind(job_id=job.id, path=ident.rel)
        # At debug: a line per step of every file drowns the journal (and costs CPU per file);
        # upload.done and import.done tell the story at info, warnings say what went wrong.
        log.debug("upload.start", size=ident.size, attempt=job.attempts + 1, stage=resume.stage)
        started = time.monotonic()
        try:
            change = await self._change(job, ref, prior) if prior is not None else "new"
            if change == "unchanged" and prior is not None:
                await self.queue.mark_unchanged(job.id, prior)
                log.info(
                    "upload.unchanged",
                    dataset_id=prior.remote_id,
                    note=change_note("unchanged", job.target, prior.target_refs, prior.remote_id),
                )
                return
            if change == "appended":
                work = replace(work, append=prior)
            if prior is not None:
                work = replace(work, delivered_before=True)
            if self.hold.suspect:
                # The service was in trouble and nothing succeeded since: one trial at a time
                # (only tasks with a file to send take one; see ServiceHold).
                await self.hold.wait()
            if job.stream_id == 0 and self.resolve_stream is not None:
                # Here, not at intake: an outage or an unknown name then meets the same
                # backoff, pause and failure handling as the upload itself.
                job = await self._with_stream(job, self.resolve_stream)
                work = replace(work, job=job)
            result = await self.target.deliver(work)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await sent.flush()
            raise
        except EmptyFileError as exc:
            await self._fail(job, str(exc), exc.kind)
        except FileChangedError as exc:
            await self._changed(job, exc)
        except FileProblem as exc:
            if not await self._inbox_gone(job, str(exc)):
                await self._fail(job, str(exc), exc.kind)
        except UploadFailed as exc:
            await self._fail(job, exc.reason, exc.cause_kind)
        except AuthError as exc:
            self.pause.pause(str(exc))
            log.error("upload.paused", reason=str(exc), action=what_to_do("auth", job.id))
            await self.queue.retry_later(job.id, error=str(exc), kind=exc.kind, delay=0.0)
        except (ConflictError, NotFoundError) as exc:
            if isinstance(exc, NotFoundError) and exc.endpoint == "GET /streams":
                await self._fail(job, str(exc), exc.kind)  # the destination does not exist
            elif job.attempts >= self.settings.attempts:
                await self._fail(job, str(exc), exc.kind)
            else:
                # The ingestion is gone or closed on the server (aborted there, superseded):
                # start this file afresh; the upload key finds and reuses our dataset.
                await self.queue.reset_ingestion(job.id)
                await self._backoff(job, str(exc), exc.kind)
        except NotYetError as exc:
            # Not a failure: the service allows this step only later (a refresh interval).
            # The job waits in the queue until then, holding no worker.
            log.info("upload.not_yet", reason=exc.message, delay=round(exc.delay, 2))
            await self.queue.retry_later(job.id, error=str(exc), kind=exc.kind, delay=exc.delay)
        except InboxdError as exc:
            if exc.retryable:
                await sent.flush()
                if is_service_trouble(exc):
                    self.hold.trouble(exc)
                await self._backoff(job, str(exc), exc.kind)
            else:
                await self._fail(job, str(exc), exc.kind)
        else:
            self.hold.succeeded()
            # What happened, as the target saw it ("on_server", or "new": it could not
            # append), else what was asked ("appended").
            done_as = result.change or ("appended" if work.append is not None else None)
            if done_as == "new" and job.change is not None:
                await self.queue.set_change(job.id, None)
            await self.queue.mark_uploaded(
                job.id,
                bytes_sent=ident.size,
                remote_id=result.dataset_id,
                remote_name=result.dataset_name,
                target_refs=result.refs,
                parts_recorded=journal.parts_possible,
                content_hash=result.content_hash,
                change=None if done_as == "new" else done_as,
            )
            if done_as == "on_server":
                self.found_on_server += 1
            elif done_as == "appended":
                log.info(
                    "upload.appended",
                    dataset_id=result.dataset_id,
                    note=change_note("appended", job.target, result.refs, result.dataset_id),
                )
            if not result.needs_poll:
                # Nothing to wait for on the server's side: delivered is done.
                await self.queue.record_import(
                    job.id,
                    status="DELIVERED",
                    progress=None,
                    message=None,
                    terminal=True,
                    failed=False,
                )
            if self.metrics is not None:
                self.metrics.upload_succeeded(result.bytes_sent, time.monotonic() - started)
            log.info(
                "upload.done",
                dataset_id=result.dataset_id,
                mode=result.mode,
                refs=result.refs,
                fell_back=result.fell_back,
                recovered=result.recovered,
                seconds=round(time.monotonic() - started, 3),
            )

    async def _with_stream(self, job: Job, resolve: Callable[[Job], Awaitable[int]]) -> Job:
        stream_id = await resolve(job)
        if stream_id == job.stream_id:
            return job
        # Stored before the upload: the poller asks for the import status per stream.
        await self.queue.set_stream_id(job.id, stream_id)
        return replace(job, stream_id=stream_id)

    async def _history(
        self, job: Job
    ) -> tuple[frozenset[str], dict[str, Any] | None, PriorDelivery | None]:
        """What earlier jobs of this path tell the upload.

        The upload keys of earlier versions that never finished (see ``UploadRequest``), the
        ``target_refs`` of the newest finished one for the same target (a target that keeps
        one remote object per file updates it rather than creating another), and the path's
        last delivery (a job or a ledger row) to compare this version with.
        """
        if job.same_path_jobs == 0:
            return frozenset(), None, None  # the usual case: the first file by this name
        others = [j for j in await self.queue.find_by_rel(job.identity.rel) if j.id != job.id]
        keys = frozenset(j.upload_key for j in others if j.state in _UNFINISHED)
        done = [j for j in others if j.state == JobState.DONE and j.target == job.target]
        prior = await self.queue.prior_delivery(job.identity.rel, before=job.id, target=job.target)
        return keys, (max(done, key=lambda j: j.id).target_refs if done else None), prior

    async def _change(self, job: Job, ref: FileRef, prior: PriorDelivery) -> content.Change:
        """What this version is to the path's last delivery (``daemon.delivery.content.compare``).

        Decided once, before anything is sent: a job that got further keeps the way it was
        being delivered ("appended" is stored for that; anything else is a new version).
        """
        if job.change == "appended":
            return "appended"
        if job.stage != Stage.NEW:
            return "new"
        change = await content.compare(
            ref.path,
            size=ref.size,
            mtime_ns=ref.mtime_ns,
            inode=ref.inode,
            ctime_ns=ref.ctime_ns,
            prior=prior,
            appends=self.settings.on_append == "same-dataset",
        )
        if change == "appended":
            await self.queue.set_change(job.id, "appended")
        return change

    async def _changed(self, job: Job, exc: FileChangedError) -> None:
        path = self.inbox / job.identity.rel
        if await self._inbox_gone(job, exc.message):
            return
        if path.exists():
            # The watcher settles and enqueues the new version as its own job.
            await self.queue.mark_superseded(job.id, reason=f"file changed: {exc.message}")
        else:
            await self._fail(
                job, f"file vanished before its upload finished: {exc.message}", "file_vanished"
            )

    async def _probe_holds(self) -> None:
        """While every worker is held back, ask the service every ``probe_seconds`` whether
        it is back; the first success ends the hold and makes the jobs that were backed off
        for the outage due at once, so uploads resume within seconds of the recovery.

        One probe at a time, spaced by ``probe_seconds``: an outage costs the service a
        request every few seconds, not one per worker or per queued file.
        """
        every = self.settings.probe_seconds
        hold = self.hold
        while True:
            await hold.begun()
            while hold.left > 0:
                if hold.left <= every:
                    # It ends by itself before another probe would be due.
                    await hold.wait_over()
                    break
                await hold.wait_over_or(every)
                if hold.left <= 0:
                    break
                if await self._service_answers(every):
                    _log.info("service.back", hold_left_seconds=round(hold.left, 2))
                    hold.end()
                    released = await self.queue.release_backoffs(_OUTAGE_KINDS)
                    if released:
                        _log.info("service.back.jobs_due", jobs=released)
                    self.wake()
                    break

    async def _service_answers(self, timeout: float) -> bool:
        """One probe (``daemon.delivery.service_answers``), given ``timeout`` (at least 5 s)."""
        with anyio.move_on_after(max(timeout, 5.0)):
            answered, why = await service_answers(self.target)
            _log.debug("service.probe", ok=answered, error=why or None)
            return answered
        return False

    def _inbox_held(self) -> bool:
        trouble = self.inbox_trouble() if self.inbox_trouble is not None else None
        return trouble is not None and trouble.hold

    async def _inbox_gone(self, job: Job, error: str) -> bool:
        """When the whole inbox folder is missing (deleted, unmounted) or was just replaced,
        a job whose file is gone with it waits rather than failing: the folder may come back
        with the file. Returns whether the job was put back to wait."""
        trouble = self.inbox_trouble() if self.inbox_trouble is not None else None
        if trouble is None:
            return False
        await self.queue.retry_later(
            job.id,
            error=f"waiting: {trouble.reason} ({error})",
            kind="inbox_missing",
            delay=trouble.wait,
        )
        return True

    async def _fail(self, job: Job, error: str, kind: str) -> None:
        await self.queue.mark_failed(job.id, error=error, kind=kind)
        # The one journal line per failure (`journalctl -u inboxd -p warning`).
        _log.warning(
            "job.failed",
            job_id=job.id,
            path=job.identity.rel,
            kind=kind,
            reason=error,
            action=what_to_do(kind, job.id),
        )
        if self.metrics is not None:
            self.metrics.failed(kind)

    async def _backoff(self, job: Job, error: str, kind: str) -> None:
        if kind == "internal" and job.attempts + 1 >= _MAX_ATTEMPTS_UNEXPECTED:
            await self._fail(job, error, kind)
            return
        if self.metrics is not None:
            self.metrics.retried(kind)
        s = self.settings
        # attempts counts the tries before this one: this failure is try attempts + 1
        delay = backoff_delay(job.attempts + 1, s.backoff_base, s.backoff_cap, jitter="half")
        _log.info("job.backoff", job_id=job.id, delay=round(delay, 2), error=error)
        await self.queue.retry_later(job.id, error=error, kind=kind, delay=delay)


def _target_inside(link: Path, inbox: Path) -> Path | None:
    """Where ``link`` points, if that is inside ``inbox``; None otherwise."""
    real = Path(os.path.realpath(link))
    return real if real.is_relative_to(os.path.realpath(inbox)) else None


class _ProgressSaver:
    """Keeps ``bytes_sent`` in the queue current, at most once a second."""

    def __init__(self, queue: Queue, job_id: int) -> None:
        self._queue = queue
        self._job_id = job_id
        self.total = 0
        self._dirty = False

    def add(self, n: int) -> None:
        self.total += n
        self._dirty = True

    async def flush(self) -> None:
        if self._dirty:
            self._dirty = False
            await self._queue.save_progress(self._job_id, bytes_sent=max(self.total, 0))
