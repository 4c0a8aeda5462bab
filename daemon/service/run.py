"""The composition root of ``inboxd run``: one task group holding every component.

Start order: queue (open, recover) → client (resolve streams) → workers, poller, disposal →
watcher (its start-up scan done) → ready. SIGTERM/SIGINT stop intake at once, give in-flight
uploads ``grace_seconds`` to finish, then cancel them at a safe point (every step is journaled,
so a cancelled upload resumes on the next start) and exit 0.

A missing inbox folder does not stop the daemon: the watcher waits for it, uploads wait while
it is missing, and the heartbeat shows it to ``status``. A state database deleted or replaced
under the running daemon does stop it (``StateLostError``, exit 75): the heartbeat compares the
files at the state path with the ones opened, so that systemd starts it again on what is there
now instead of letting it write on into an unlinked file.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from daemon import __version__
from daemon.config import Settings
from daemon.delivery import Target
from daemon.delivery.factory import open_target
from daemon.delivery.files import CHUNK_SIZE
from daemon.delivery.flow import UploadOptions
from daemon.engine.disposal import Disposal
from daemon.engine.poller import Poller
from daemon.engine.retention import Retention, disk_free
from daemon.engine.workers import Pause, Workers, WorkerSettings
from daemon.errors import InboxdError, NotFoundError, StateError, StateLostError
from daemon.intake.routing import (
    SIDECAR_SUFFIX,
    Route,
    dataset_name_for,
    route,
    stream_for,
    stream_source,
)
from daemon.intake.watcher import Watcher, WatchRules
from daemon.net.bandwidth import RateLimiter, format_rate, parse_rate, parse_windows
from daemon.outcomes import what_to_do
from daemon.retry import RetryPolicy
from daemon.service import signals as service_signals
from daemon.service.metrics import Metrics, MetricsServer
from daemon.service.notify import Notifier, watchdog_interval
from daemon.state import (
    HEARTBEAT_SECONDS,
    Delivered,
    FileIdentity,
    InboxTrouble,
    Job,
    NewJob,
    Queue,
    QueueError,
    make_private_dirs,
    state_os_error,
)

_log = structlog.get_logger(__name__)
_PROBE_SECONDS = 30.0


class Service:
    """A running daemon. ``await Service(settings).run()`` until cancelled or signalled, or
    ``await tg.start(service.run)`` to go on once it is ready (see :meth:`run`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        grace_seconds: float = 20.0,
        handle_signals: bool = True,
        probe_seconds: float = _PROBE_SECONDS,
    ) -> None:
        self.probe_seconds = probe_seconds
        self.settings = settings
        self.grace_seconds = grace_seconds
        self.handle_signals = handle_signals
        self.inbox = settings.inbox.path.absolute()
        self._beat_now = anyio.Event()
        self.metrics = Metrics()
        self.pause = Pause(on_change=self._pause_changed)
        self.started_at = time.time()
        self.queue: Queue | None = None
        self.workers: Workers | None = None
        self.poller: Poller | None = None
        self.watcher: Watcher | None = None
        self.metrics_server: MetricsServer | None = None
        self.retention: Retention | None = None
        self._disk_low = False
        self.target: Target | None = None
        self._stop = anyio.Event()
        self._settling: dict[str, tuple[int, float] | None] = {}
        #: stream names (casefolded) the workers resolved, so later files queue with the id
        self._stream_ids: dict[str, int] = {}
        self.notifier = Notifier()
        self._ready = False
        #: (st_dev, st_ino) of the state database, -wal and -shm as opened (None: not there yet)
        self._state_files: dict[Path, tuple[int, int] | None] = {}

    def _pause_changed(self) -> None:
        self.metrics.set_paused(self.pause.paused)
        self._beat_now.set()

    def stop(self) -> None:
        """Ask for a graceful stop (what SIGTERM does)."""
        self._stop.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until stopped; returns after a graceful stop.

        Ready (``task_status.started()``, so ``await tg.start(service.run)`` returns) once the
        queue is open, the workers, poller and disposal run and the watcher's start-up scan is
        done: the moment ``daemon.ready`` is logged and systemd is told READY=1.
        Raises ``StateLostError`` when the state database is deleted or replaced meanwhile.
        """
        s = self.settings
        lock = _lock_state(s.state.path)
        try:
            _share_state_with_group(s.state.path)
            try:
                queue = await Queue.open(s.state.path)
            except QueueError as exc:
                raise exc.as_state_error() from None
            self.queue = queue
            self._state_files = _state_files(s.state.path)
            try:
                await self._run(queue, task_status)
            finally:
                self.notifier.close()
                with anyio.CancelScope(shield=True):
                    await queue.close()
        finally:
            os.close(lock)

    async def _run(self, queue: Queue, task_status: anyio.abc.TaskStatus[None]) -> None:
        s = self.settings
        owner = f"inboxd-{os.getpid()}-{int(self.started_at)}"
        recovered = await queue.recover(owner)
        for job in recovered:
            _log.info("job.recovered", job_id=job.id, path=job.identity.rel, stage=job.stage.value)
        await queue.clear_all_settling()
        if not s.api.verify_tls:
            _log.warning(
                "tls.verification_off",
                reason="[api] verify_tls = false: server certificates (API and storage) are "
                "not checked; anyone on the network path can read the token",
            )
        r = s.retry
        policy = RetryPolicy.from_settings(r)
        rate = parse_rate(s.bandwidth.limit)
        limiter = RateLimiter(rate) if rate > 0 else None
        if limiter is not None:
            _log.info("bandwidth.limit", rate=format_rate(rate))
        options = UploadOptions(
            policy=policy,
            part_concurrency=s.upload.part_concurrency,
            on_retry=self.metrics.retried,
            throttle=limiter.consume if limiter is not None else None,
            chunk_size=_chunk_size(rate),
        )
        async with open_target(s, options) as target:
            self.target = target
            self.workers = Workers(
                queue,
                target,
                self.inbox,
                WorkerSettings(
                    count=s.upload.workers,
                    attempts=policy.attempts,
                    backoff_base=max(r.base_seconds, 1.0),
                    backoff_cap=r.job_backoff_cap_seconds,
                    outage_cap=r.cap_seconds,
                    max_retry_after=r.max_retry_after_seconds,
                    probe_seconds=r.probe_seconds,
                    follow_symlinks=s.inbox.follow_symlinks,
                    on_append=s.upload.on_append,
                    fresh_state=queue.created,
                    small_files=s.upload.small_files,
                    small_file_bytes=s.upload.small_file_bytes,
                ),
                pause=self.pause,
                inbox_trouble=self._inbox_trouble,
                owner=owner,
                metrics=self.metrics,
                windows=parse_windows(s.bandwidth.windows),
                resolve_stream=self._stream_of,
            )
            self.poller = Poller(
                queue,
                target,
                interval=s.poll.interval_seconds,
                batch_size=s.poll.batch_size,
                metrics=self.metrics,
                hold=self.workers.hold,
            )
            disposal = Disposal(
                queue,
                self.inbox,
                s.inbox.after_upload,
                s.inbox.archive_path,
                inbox_trouble=self._inbox_trouble,
            )
            self.watcher = Watcher(
                self.inbox,
                self._rules(),
                on_ready=self._on_ready,
                on_skip=self._on_skip,
                on_settling=self._on_settling,
            )
            async with anyio.create_task_group() as tg:
                if self.handle_signals:
                    tg.start_soon(self._signals)
                await tg.start(self._heartbeat)
                await tg.start(self.workers.run)
                await tg.start(self.poller.run)
                await tg.start(disposal.run)
                if s.metrics.listen:
                    self.metrics_server = MetricsServer(
                        s.metrics.listen,
                        self.metrics,
                        queue=queue,
                        health=lambda: self._health(target),
                    )
                    await tg.start(self.metrics_server.run)
                if s.inbox.after_upload == "archive" and s.inbox.archive_path is not None:
                    ret = s.retention
                    self.retention = Retention(
                        s.inbox.archive_path,
                        queue=queue,
                        max_age_days=ret.max_age_days or None,
                        min_free_bytes=None,
                        min_free_percent=ret.min_free_percent or None,
                        warn_free_percent=ret.warn_free_percent or None,
                        inbox=self.inbox,
                    )
                    await tg.start(self.retention.run, ret.interval_seconds)
                tg.start_soon(self._probe_when_paused, target)
                tg.start_soon(self._housekeeping)
                tg.start_soon(self._flush_settling)
                watcher_scope = anyio.CancelScope()
                await tg.start(self._watch, watcher_scope)
                self._beat_now.set()  # status learns at once what the watcher found
                _log.info(
                    "daemon.ready",
                    version=__version__,
                    inbox=str(self.inbox),
                    workers=s.upload.workers,
                    small_files=s.upload.small_files,
                )
                self.notifier.ready(await self.summary())
                self._ready = True
                task_status.started()
                await self._stop.wait()
                _log.info("daemon.stopping", grace_seconds=self.grace_seconds)
                # Ask systemd for the grace period plus time to persist, on top of its own.
                self.notifier.stopping(extend_seconds=self.grace_seconds + 10)
                watcher_scope.cancel()
                self.workers.stopping.set()
                self.workers.wake()
                with anyio.move_on_after(self.grace_seconds):
                    while self.workers.active:
                        await anyio.sleep(0.05)
                if self.workers.active:
                    _log.warning("daemon.cancel_in_flight", jobs=sorted(self.workers.active))
                tg.cancel_scope.cancel()
        _log.info("daemon.stopped")

    async def _watch(
        self, scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        assert self.watcher is not None
        with scope:
            await self.watcher.run(task_status=task_status)

    def _rules(self) -> WatchRules:
        inbox = self.settings.inbox
        exclude = tuple(inbox.exclude)
        if self.settings.upload.sidecar_metadata:
            exclude += ("*" + SIDECAR_SUFFIX,)
        ignore: tuple[Path, ...] = ()
        if inbox.archive_path is not None:
            ignore = (inbox.archive_path.absolute(),)
        return WatchRules(
            settle_seconds=inbox.settle_seconds,
            include=tuple(inbox.include),
            exclude=exclude,
            follow_symlinks=inbox.follow_symlinks,
            ignore_dirs=ignore,
            rescan_seconds=inbox.rescan_seconds,
            force_polling=inbox.force_polling,
            writer_timeout=inbox.writer_timeout_seconds,
        )

    def _inbox_trouble(self) -> InboxTrouble | None:
        """What is wrong with the inbox folder now (missing, unmounted, replaced), or None."""
        return self.watcher.inbox_trouble() if self.watcher is not None else None

    async def _on_ready(self, files: list[FileIdentity]) -> None:
        assert self.queue is not None and self.workers is not None
        # One thread hop for the whole batch: routing may read sidecar files.
        routes = await anyio.to_thread.run_sync(self._route_all, files)
        items = []
        for ident, r in zip(files, routes, strict=True):
            if r.warning:
                _log.warning("route.sidecar", path=ident.rel, problem=r.warning)
            stream_id = await self._stream_id(r.stream)
            kind = self.settings.api.kind
            items.append(NewJob(ident, stream_id, r.dataset_name, r.metadata, kind))
        if not self.settings.inbox.upload_renamed:
            items = await self._take_renamed(items)
        new = await self.queue.enqueue_many(items)
        # The watcher follows each report with on_settling(rel, None): no clearing here.
        if new:
            _log.info("watcher.enqueued", files=len(new))
            self.workers.wake()

    async def _take_renamed(self, items: list[NewJob]) -> list[NewJob]:
        """Record files that are delivered files under a new name; return the others.

        A file renamed or moved within the inbox keeps its inode, size and mtime: when a
        delivered version (or one whose import runs) has them under another path, and that
        path no longer holds the same file (else it is a hard link, a second file), it is not
        uploaded again (``inbox.upload_renamed`` = true uploads it).
        """
        assert self.queue is not None
        found = await self.queue.delivered_elsewhere([item.identity for item in items])
        if not found:
            return items
        renamed = await anyio.to_thread.run_sync(self._renames, items, found)
        if not renamed:
            return items
        records = []
        template = self.settings.upload.dataset_name
        for index, old in renamed.items():
            name = (
                old.job.remote_name if old.job is not None else dataset_name_for(old.rel, template)
            )
            dataset = f"dataset {name!r}" + (f" (id {old.remote_id})" if old.remote_id else "")
            note = f"renamed from {old.rel}: already delivered as {dataset}; not uploaded again"
            records.append((items[index], old, note))
            _log.info(
                "watcher.renamed",
                path=items[index].identity.rel,
                renamed_from=old.rel,
                dataset_name=name,
                dataset_id=old.remote_id,
                hint="not uploaded again; set inbox.upload_renamed = true to upload renamed files",
            )
        await self.queue.record_renamed(records)
        return [item for index, item in enumerate(items) if index not in renamed]

    def _renames(
        self, items: list[NewJob], found: dict[int, list[Delivered]]
    ) -> dict[int, Delivered]:
        """Which candidates are renames: no old path of theirs still holds the same file."""
        out: dict[int, Delivered] = {}
        for index, olds in found.items():
            ident = items[index].identity
            if not any(_holds(self.inbox / old.rel, ident) for old in olds):
                out[index] = olds[0]
        return out

    async def _stream_id(self, ref: int | str) -> int:
        """The stream id a file is queued with; 0 = a name the worker looks up at upload.

        Intake never asks the server: a name it cannot resolve (server down, or no such
        stream) must not hold up the files behind it.
        """
        assert self.target is not None
        if isinstance(ref, str) and not ref.strip().isdigit():
            return self._stream_ids.get(ref.strip().casefold(), 0)
        return await self.target.resolve_destination(ref)  # an id: no network

    async def _stream_of(self, job: Job) -> int:
        """The stream id of a job queued as stream 0, from the route as configured now.

        Raises NotFoundError (GET /streams: the job fails with the reason) for a name the
        server does not know; other errors are the workers' usual retry/pause cases.
        """
        assert self.target is not None
        ref = stream_for(job.identity.rel, self.settings)
        try:
            stream_id = await self.target.resolve_destination(ref)
        except NotFoundError as exc:
            if exc.status is not None:  # the request itself got a 404: not about the name
                raise
            raise NotFoundError(
                f"stream {ref!r} not found on the server",
                endpoint="GET /streams",
                advice=f"fix {stream_source(job.identity.rel, self.settings)} in the config "
                "(`inboxd check` lists the streams this token can see) or create the stream, "
                "then `inboxd retry --all-failed`",
            ) from None
        if isinstance(ref, str) and stream_id:
            self._stream_ids[ref.strip().casefold()] = stream_id
        return stream_id

    async def _on_skip(self, rel: str, reason: str) -> None:
        _log.warning("watcher.skip", path=rel, reason=reason)

    def _route_all(self, files: list[FileIdentity]) -> list[Route]:
        return [route(ident.rel, self.inbox, self.settings) for ident in files]

    async def _on_settling(self, rel: str, size: int | None) -> None:
        # Buffered: status may show a settling file a fraction of a second late, but a burst
        # of files costs one database write instead of two per file.
        self._settling[rel] = None if size is None else (size, time.time())

    async def _flush_settling(self) -> None:
        assert self.queue is not None
        while True:
            await anyio.sleep(0.25)
            if self._settling:
                changes, self._settling = self._settling, {}
                await self.queue.apply_settling(changes)

    async def _heartbeat(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Liveness for ``status`` (a row in the database) and for systemd (WATCHDOG=1).

        WATCHDOG=1 follows a successful database write in the event loop: a wedged loop or
        an unwritable database stops the pings, and systemd restarts the daemon.
        """
        assert self.queue is not None
        queue = self.queue
        period = HEARTBEAT_SECONDS
        watchdog = watchdog_interval()
        if watchdog is not None:
            period = min(period, watchdog)
        first = True
        while True:
            self._check_state_files()
            info = {
                "version": __version__,
                "inbox": str(self.inbox),
                "paused": self.pause.reason,
                "workers": self.settings.upload.workers,
                "window": self._window_info(),
                "disk": await self._disk_info(),
                "inbox_problem": self.watcher.inbox_state() if self.watcher is not None else None,
            }
            await queue.heartbeat(os.getpid(), self.started_at, info)
            if watchdog is not None and self._ready:
                self.notifier.watchdog()
            if first:
                task_status.started()
                first = False
            elif self.notifier.enabled and self._ready:
                self.notifier.status(await self.summary())
            with anyio.move_on_after(period):
                await self._beat_now.wait()
            self._beat_now = anyio.Event()

    def _window_info(self) -> dict[str, Any] | None:
        windows = self.settings.bandwidth.windows
        if not windows or self.workers is None:
            return None
        opens = self.workers.window_opens_at
        return {
            "windows": windows,
            "waiting_until": opens.timestamp() if opens is not None else None,
        }

    def _check_state_files(self) -> None:
        """Stop (exit 75, which systemd restarts) when the state database at the configured
        path is no longer the one this daemon writes: deleted, moved or replaced meanwhile.

        Writing on would go into an unlinked file (``status`` sees nothing, a restart
        starts from scratch); a restart now opens what is at the path. The -wal and -shm
        are compared too: they hold the latest commits and the readers' index of them.
        """
        for path, opened in _state_files(self.settings.state.path).items():
            known = self._state_files.get(path)
            if known is None:
                self._state_files[path] = opened  # -wal/-shm appear with the first write
                continue
            if opened == known:
                continue
            what = "was deleted" if opened is None else "was replaced by another file"
            _log.error(
                "state.lost",
                path=str(path),
                problem=what,
                hint="stopping (exit 75) so that a restart opens the state database now at"
                " [state] path; an empty or older one means files may be uploaded again."
                " Move or restore state.db together with its -wal and -shm files, and only"
                " while inboxd is stopped",
            )
            raise StateLostError(
                f"state database file {path} {what} while inboxd was running",
                advice="inboxd stops so that a restart opens the database now at that path;"
                " restore state.db together with its -wal and -shm files only while inboxd is"
                " stopped",
            )

    async def _disk_info(self) -> dict[str, Any] | None:
        """Free space where the inbox lives; warns once per crossing of the threshold."""
        try:
            free, total = await anyio.to_thread.run_sync(disk_free, self.inbox)
        except OSError:
            return None  # the folder is missing: the watcher says so (inbox_problem)
        warn = self.settings.retention.warn_free_percent
        pct = 100.0 * free / total if total else 100.0
        low = pct < warn
        if low != self._disk_low and self.retention is None:  # Retention logs it itself
            if low:
                _log.warning(
                    "disk.low",
                    path=str(self.inbox),
                    free_bytes=free,
                    free_percent=round(pct, 1),
                    action=what_to_do("disk_low", None),
                )
            else:
                _log.info("disk.ok", free_bytes=free, free_percent=round(pct, 1))
        self._disk_low = low
        self.metrics.set_disk(free, low=low)
        return {"free_bytes": free, "total_bytes": total, "free_percent": round(pct, 1), "low": low}

    async def _health(self, target: Target) -> tuple[bool, str]:
        """``/healthz``: alive (we are answering) and the service reachable, or why not."""
        if self.pause.reason:
            return False, f"uploads paused: {self.pause.reason}"
        try:
            with anyio.fail_after(5):
                lines = await target.check()
        except TimeoutError:
            return False, f"{self.settings.api.url} did not answer within 5 s"
        except InboxdError as exc:
            return False, f"API unreachable: {exc}"
        failed = [line.text for line in lines if not line.ok]
        return (False, "; ".join(failed)) if failed else (True, "ok")

    async def summary(self) -> str:
        """One line for ``systemctl status``: "2 uploading 41%, 5 queued, 1 failed"."""
        assert self.queue is not None
        counts = await self.queue.counts()
        parts = []
        if self.workers is not None:
            files, sent, total = self.workers.in_flight()
            if files:
                pct = 100 * sent / total if total else 100.0
                parts.append(f"{files} uploading {pct:.0f}%")
        for state in ("queued", "importing", "failed"):
            if counts.get(state):
                parts.append(f"{counts[state]} {state}")
        if self.pause.reason:
            parts.insert(0, "PAUSED (token refused)")
        if self.workers is not None and self.workers.window_opens_at is not None:
            opens = self.workers.window_opens_at.strftime("%a %H:%M")
            parts.insert(0, f"waiting for upload window (opens {opens})")
        if self._disk_low:
            parts.append("DISK LOW")
        if self.watcher is not None and self.watcher.inbox_state() is not None:
            parts.insert(0, "INBOX MISSING")
        return ", ".join(parts) or f"idle, {counts.get('done', 0)} done"

    async def _probe_when_paused(self, target: Target) -> None:
        while True:
            await anyio.sleep(self.probe_seconds if self.pause.paused else 0.5)
            if not self.pause.paused:
                continue
            try:
                failed = [line.text for line in await target.check() if not line.ok]
            except InboxdError as exc:
                failed = [str(exc)]
            if failed:
                _log.warning(
                    "daemon.still_paused",
                    reason="; ".join(failed),
                    action=what_to_do("auth", None),
                )
                continue
            _log.info("daemon.resumed", reason="the token is accepted again")
            self.pause.resume()

    async def _housekeeping(self) -> None:
        assert self.queue is not None
        days = self.settings.state.prune_after_days
        while True:
            pruned = await self.queue.prune(days * 86400)
            if pruned:
                _log.info("queue.pruned", jobs=pruned)
                await self.queue.vacuum_if_worthwhile()
            await anyio.sleep(3600)

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            if service_signals.early:
                # Signalled while starting, before this receiver existed.
                _log.info("daemon.signal", signal=signal.Signals(service_signals.early[0]).name)
                self.stop()
            async for signum in signals:
                _log.info("daemon.signal", signal=signal.Signals(signum).name)
                self.stop()


def _chunk_size(rate: float) -> int:
    """1 MiB, or less at low rate limits so a request body never goes quiet for long."""
    if rate <= 0:
        return CHUNK_SIZE
    return int(min(CHUNK_SIZE, max(64 * 1024, rate / 4)))


def _share_state_with_group(db: Path) -> None:
    """Let the state folder's group read the database when the folder lets it in.

    ``inboxd status`` is for the people at the PC: with ``StateDirectoryMode=0750`` (the
    unit) members of the ``inboxd`` group may enter the folder, and the database and its
    ``-wal``/``-shm`` are then made 0640 (SQLite gives ``-wal``/``-shm`` the database's mode).
    A reader that may not write ``-shm`` still reads a live WAL database read-only (SQLite ≥
    3.22; README "Inspect"). A private folder (0700, what inboxd creates itself) keeps 0600.
    """
    try:
        folder_mode = db.parent.stat().st_mode
    except OSError:
        return
    if not folder_mode & stat.S_IXGRP:
        return
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        try:
            if path is db and not path.exists():
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640))
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o040 == 0:
                path.chmod((mode | 0o040) & 0o7750)
        except FileNotFoundError:
            continue
        except OSError as exc:
            _log.warning("state.not_shared", path=str(path), reason=exc.strerror)


def _holds(path: Path, ident: FileIdentity) -> bool:
    """Whether ``path`` names the file version ``ident`` (same inode, size and mtime)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_ino, st.st_size, st.st_mtime_ns) == (ident.inode, ident.size, ident.mtime_ns)


def _state_files(db: Path) -> dict[Path, tuple[int, int] | None]:
    """(st_dev, st_ino) of the state database and its -wal and -shm; None for a missing one."""
    out: dict[Path, tuple[int, int] | None] = {}
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        try:
            st = os.stat(path)
            out[path] = (st.st_dev, st.st_ino)
        except OSError:
            out[path] = None
    return out


def _lock_state(db: Path) -> int:
    """Hold an exclusive lock next to the database: two daemons on one queue would race."""
    path = db.with_name(db.name + ".lock")
    try:
        make_private_dirs(db.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise state_os_error(db, exc, "lock the state database").as_state_error() from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateError(
            f"another inboxd (pid {other}) is running with the state database {db}",
            advice="stop it first, or give this one its own [state] path",
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError as exc:  # ENOSPC on a full state filesystem, before SQLite even starts
        os.close(fd)
        raise state_os_error(db, exc, "lock the state database").as_state_error() from None
    return fd
