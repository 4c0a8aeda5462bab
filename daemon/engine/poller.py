"""The import poller: asks the server how each uploaded dataset's import goes, in batches.

Statuses are recorded as given. A terminal status ends polling (``FINISHED``/``LIVE`` → done,
``*FAILED`` → failed with the server's message); an unknown status is recorded and polled
again, never a crash. Nor does anything else end the loop: a pass that fails in a way
nobody foresaw is logged and retried after a growing pause, because a dead poller would leave
every later upload IMPORTING for good (and end the daemon's task group with it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import anyio
import structlog

from daemon.delivery import ImportUpdate, Target
from daemon.engine.metrics import EngineMetrics
from daemon.errors import AuthError, InboxdError, scrub_secrets
from daemon.outcomes import what_to_do
from daemon.retry import ServiceHold, backoff_delay
from daemon.state import ImportRecord, Job, Queue, QueueError

_log = structlog.get_logger(__name__)
#: longest pause after repeated unexpected failures (the interval is used when it is longer)
MAX_BACKOFF = 300.0


class Poller:
    """Polls IMPORTING jobs every ``interval`` seconds through the target."""

    def __init__(
        self,
        queue: Queue,
        target: Target,
        *,
        interval: float = 2.0,
        batch_size: int = 100,
        metrics: EngineMetrics | None = None,
        hold: ServiceHold | None = None,
    ) -> None:
        self.metrics = metrics
        #: the workers' outage hold: no polling while the service does not answer
        self.hold = hold
        self.queue = queue
        self.target = target
        self.interval = interval
        self.batch_size = batch_size
        #: set after each pass; tests and the service wait on it
        self.passes = 0

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled."""
        task_status.started()
        streak = 0  # passes in a row that failed unexpectedly
        while True:
            if self.hold is not None:
                await self.hold.wait_over()
            if await self._pass_failed_unexpectedly():
                streak += 1
                cap = max(self.interval, MAX_BACKOFF)
                pause = backoff_delay(streak + 1, self.interval, cap, jitter="none")
                _log.info("poller.backoff", retry_in=round(pause, 2), failures=streak)
                self.passes += 1
                await anyio.sleep(pause)
            else:
                streak = 0
                self.passes += 1
                await anyio.sleep(self.interval)

    async def _pass_failed_unexpectedly(self) -> bool:
        """One pass; errors are logged here. True when it failed in a way nobody foresaw."""
        try:
            await self.poll_once()
        except AuthError as exc:
            _log.error("poller.auth", error=str(exc))
        except InboxdError as exc:
            _log.warning("poller.error", error=str(exc))
        except QueueError:
            raise  # the state database failed: not a poll problem; the service stops with it
        except Exception as exc:  # not BaseException: cancellation must end the loop
            _log.error(
                "poller.unexpected",
                error_type=type(exc).__name__,
                error=scrub_secrets(str(exc))[:500],
            )
            return True
        return False

    async def poll_once(self) -> int:
        """One pass over the jobs waiting for their import; returns how many were asked."""
        jobs = await self.queue.jobs_to_poll(limit=self.batch_size * 10)
        if not jobs:
            return 0
        by_id = {job.id: job for job in jobs}
        records: list[ImportRecord] = []
        finished: list[tuple[Job, ImportUpdate]] = []
        for update in await self.target.poll(jobs):
            job = by_id.get(update.job_id)
            if job is None:
                continue
            # NaN/inf from a target would make `status --json` invalid (and NaN never equals
            # itself, so it would be rewritten on every pass).
            progress = update.progress
            if progress is not None and not math.isfinite(progress):
                progress = None
            unchanged = (update.status, progress, update.message) == (
                job.import_status,
                job.import_progress,
                job.import_message,
            )
            if unchanged and not update.terminal:
                continue
            records.append(dataclasses.replace(update, progress=progress))
            if update.terminal:
                finished.append((job, update))
        # One transaction for the whole answer: a batch of small files finishes together.
        await self.queue.record_imports(records)
        for job, update in finished:
            if self.metrics is not None:
                self.metrics.import_finished(not update.failed)
                if update.failed:
                    self.metrics.failed("import")  # the job ends failed, like upload failures
            log = _log.bind(job_id=job.id, path=job.identity.rel, dataset_id=job.remote_id)
            if update.failed:
                log.warning(
                    "import.failed",
                    kind="import",
                    status=update.status,
                    reason=f"import failed: {update.message}",
                    action=what_to_do("import", job.id),
                )
            else:
                log.info("import.done", status=update.status)
        return len(jobs)
