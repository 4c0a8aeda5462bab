"""The import poller: asks the server how each uploaded dataset's import goes, in batches.

Statuses are recorded as given. A terminal status ends polling (``FINISHED``/``LIVE`` → done,
``*FAILED`` → failed with the server's message); an unknown status is recorded and polled
again, never a crash.
"""

from __future__ import annotations

from typing import Any

import anyio
import structlog

from daemon.errors import AuthError, InboxdError
from daemon.metrics import Metrics
from daemon.queue import Queue
from daemon.targets import Target

_log = structlog.get_logger(__name__)


class Poller:
    """Polls IMPORTING jobs every ``interval`` seconds through the target."""

    def __init__(
        self,
        queue: Queue,
        target: Target,
        *,
        interval: float = 2.0,
        batch_size: int = 100,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.queue = queue
        self.target = target
        self.interval = interval
        self.batch_size = batch_size
        self._wake = anyio.Event()
        #: set after each pass; tests and the service wait on it
        self.passes = 0

    def wake(self) -> None:
        """Something was uploaded: poll soon rather than at the next interval."""
        self._wake.set()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled."""
        task_status.started()
        while True:
            try:
                await self.poll_once()
            except AuthError as exc:
                _log.error("poller.auth", error=str(exc))
            except InboxdError as exc:
                _log.warning("poller.error", error=str(exc))
            self.passes += 1
            with anyio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def poll_once(self) -> int:
        """One pass over the jobs waiting for their import; returns how many were asked."""
        jobs = await self.queue.jobs_to_poll(limit=self.batch_size * 10)
        if not jobs:
            return 0
        by_id = {job.id: job for job in jobs}
        for update in await self.target.poll(jobs):
            job = by_id.get(update.job_id)
            if job is None:
                continue
            unchanged = (update.status, update.progress, update.message) == (
                job.import_status,
                job.import_progress,
                job.import_message,
            )
            if unchanged and not update.terminal:
                continue
            await self.queue.record_import(
                job.id,
                status=update.status,
                progress=update.progress,
                message=update.message,
                terminal=update.terminal,
                failed=update.failed,
            )
            if update.terminal and self.metrics is not None:
                self.metrics.import_finished(not update.failed)
                if update.failed:
                    self.metrics.failed("import")  # the job ends failed, like upload failures
            if update.terminal:
                log = _log.bind(job_id=job.id, path=job.identity.rel, dataset_id=job.dataset_id)
                if update.failed:
                    log.warning("import.failed", status=update.status, message=update.message)
                else:
                    log.info("import.done", status=update.status)
        return len(jobs)
