"""The import poller: asks the server how each uploaded dataset's import goes, in batches.

Statuses are recorded as given. A terminal status ends polling (``FINISHED``/``LIVE`` → done,
``*FAILED`` → failed with the server's message); an unknown status is recorded and polled
again, never a crash.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import anyio
import structlog

from daemon.client import FAILED_STATUSES, OK_STATUSES, MarpleClient
from daemon.errors import AuthError, InboxdError
from daemon.metrics import Metrics
from daemon.queue import Job, Queue

_log = structlog.get_logger(__name__)


class Poller:
    """Polls IMPORTING jobs every ``interval`` seconds, ``batch_size`` datasets per request."""

    def __init__(
        self,
        queue: Queue,
        client: MarpleClient,
        *,
        interval: float = 2.0,
        batch_size: int = 100,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.queue = queue
        self.client = client
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
        by_stream: dict[int, list[Job]] = defaultdict(list)
        for job in jobs:
            if job.dataset_id is not None:
                by_stream[job.stream_id].append(job)
        asked = 0
        for stream_id, group in by_stream.items():
            for i in range(0, len(group), self.batch_size):
                batch = group[i : i + self.batch_size]
                asked += len(batch)
                await self._poll_batch(stream_id, batch)
        return asked

    async def _poll_batch(self, stream_id: int, batch: list[Job]) -> None:
        by_dataset = {job.dataset_id: job for job in batch}
        statuses = await self.client.datasets_status(
            stream_id, [j.dataset_id for j in batch if j.dataset_id]
        )
        for st in statuses:
            job = by_dataset.get(st.dataset_id)
            if job is None:
                continue
            status = st.import_status or "UNKNOWN"
            terminal = status in OK_STATUSES or status in FAILED_STATUSES
            failed = status in FAILED_STATUSES
            if (status, st.import_progress, st.import_message) == (
                job.import_status,
                job.import_progress,
                job.import_message,
            ) and not terminal:
                continue
            await self.queue.record_import(
                job.id,
                status=status,
                progress=st.import_progress,
                message=st.import_message,
                terminal=terminal,
                failed=failed,
            )
            if terminal and self.metrics is not None:
                self.metrics.import_finished(not failed)
                if failed:
                    self.metrics.failed("import")  # the job ends failed, like upload failures
            if terminal:
                log = _log.bind(job_id=job.id, path=job.identity.rel, dataset_id=st.dataset_id)
                if failed:
                    log.warning("import.failed", status=status, message=st.import_message)
                else:
                    log.info("import.done", status=status)
