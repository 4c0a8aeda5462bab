"""The Marple DB target: ``POST /ingestion`` → upload in the server's mode → complete.

The flow itself lives in ``daemon.delivery.marple_db.upload``; this adapter resolves the job's
stream and maps the batched dataset status onto import updates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace

import structlog

from daemon import retry
from daemon.delivery import CheckLine, Delivered, ImportUpdate, Work
from daemon.delivery.flow import Resume, UploadOptions
from daemon.delivery.marple_db.client import FAILED_STATUSES, OK_STATUSES, MarpleClient, Stream
from daemon.delivery.marple_db.streams import StreamDirectory
from daemon.delivery.marple_db.upload import NameClash, UploadRequest, upload_file
from daemon.errors import InboxdError
from daemon.state import Job, Stage

_log = structlog.get_logger(__name__)


class MarpleDbTarget:
    """Delivers files as datasets of Marple DB streams."""

    kind = "marple-db"

    def __init__(
        self,
        client: MarpleClient,
        options: UploadOptions,
        *,
        on_name_clash: NameClash = "rename",
        plugin_args: str | None = None,
        batch_size: int = 100,
    ) -> None:
        self.client = client
        self.options = options
        self.streams = StreamDirectory(client)
        self.on_name_clash = on_name_clash
        self.plugin_args = plugin_args
        self.batch_size = batch_size

    async def resolve_destination(self, ref: int | str) -> int:
        """A stream id for an id or a stream name (names need the API once)."""
        return await self.streams.resolve(ref)

    async def deliver(self, work: Work) -> Delivered:
        """Run or resume the ingestion flow of one file."""
        job = work.job
        stream = await self.streams.get(job.stream_id)
        resume, append_to = await self._appending(work, stream)
        request = UploadRequest(
            file=work.file,
            dataset_name=job.remote_name,
            stream=stream,
            metadata=dict(job.metadata),
            upload_key=job.upload_key,
            on_name_clash=self.on_name_clash,
            plugin_args=self.plugin_args,
            predecessor_keys=work.predecessor_keys,
            append_to=append_to,
            recognise_delivered=not work.delivered_before,
        )
        result = await upload_file(
            self.client,
            request,
            options=self.options,
            resume=resume,
            journal=work.journal,
            progress=work.progress,
        )
        change = result.change
        if change is None and work.append is not None:
            change = "new"  # asked to append, but the dataset was gone or not the same one
        return Delivered(
            dataset_name=result.dataset_name,
            dataset_id=result.dataset_id,
            bytes_sent=result.bytes_sent,
            mode=result.mode,
            # no ingestion (0) when the service already held the file
            refs={"stream_id": stream.id, "ingestion_id": result.ingestion_id or None},
            fell_back=result.fell_back,
            recovered=result.recovered,
            content_hash=result.content_hash,
            change=change,
        )

    async def _appending(self, work: Work, stream: Stream) -> tuple[Resume, int | None]:
        """Where an appended file goes: the resume to start from and the dataset id to
        overwrite (None: deliver as a new version, the earlier dataset is gone).

        The earlier delivery's dataset is looked up by id: its name may differ from this
        job's (it was renamed ``name (2)`` on a clash; a ledger row keeps no name) and the
        dataset may have been deleted since. A job that got past ``new`` resumes with the
        name it saved.
        """
        prior = work.append
        if prior is None or prior.remote_id is None:
            return work.resume, None
        if work.resume.stage != Stage.NEW:
            return work.resume, prior.remote_id
        dataset_id = prior.remote_id
        ds = await retry.call(
            lambda: self.client.dataset(stream.datapool or "default", dataset_id=dataset_id),
            self.options.policy,
            what="find dataset",
            on_retry=self.options.on_retry,
        )
        if ds is None or not ds.path:
            _log.info("upload.append_target_gone", dataset_id=dataset_id)
            return work.resume, None
        return replace(work.resume, dataset_name=ds.path), dataset_id

    async def poll(self, jobs: Sequence[Job]) -> list[ImportUpdate]:
        """``POST /stream/{id}/datasets/status`` per stream, in batches."""
        by_stream: dict[int, list[Job]] = defaultdict(list)
        for job in jobs:
            if job.remote_id is not None:
                by_stream[job.stream_id].append(job)
        updates: list[ImportUpdate] = []
        for stream_id, group in by_stream.items():
            for i in range(0, len(group), self.batch_size):
                batch = group[i : i + self.batch_size]
                # Several jobs may share a dataset: a version appended into it, or one whose
                # metadata alone changed, waits for the same import as the one before it.
                by_dataset: dict[int | None, list[Job]] = defaultdict(list)
                for j in batch:
                    by_dataset[j.remote_id].append(j)
                statuses = await self.client.datasets_status(
                    stream_id, sorted(d for d in by_dataset if d is not None)
                )
                for st in statuses:
                    status = st.import_status or "UNKNOWN"
                    failed = status in FAILED_STATUSES
                    updates.extend(
                        ImportUpdate(
                            job_id=owner.id,
                            status=status,
                            progress=st.import_progress,
                            message=st.import_message,
                            terminal=failed or status in OK_STATUSES,
                            failed=failed,
                        )
                        for owner in by_dataset.get(st.dataset_id, [])
                    )
        return updates

    async def probe(self) -> None:
        """One cheap authenticated request (``GET /streams``): raises unless the API answers.

        Also refreshes the stream directory, which the next upload needs anyway.
        """
        await self.streams.refresh()

    async def check(self, destinations: Sequence[int | str] = ()) -> list[CheckLine]:
        """``/health``, the token (``/streams``), and each configured stream."""
        lines = []
        try:
            await self.client.health()
        except InboxdError as exc:
            return [CheckLine(False, f"reach {self.client.base_url}/health: {exc}")]
        lines.append(CheckLine(True, f"reach {self.client.base_url}/health"))
        try:
            streams = await self.client.streams()
        except InboxdError as exc:
            return [*lines, CheckLine(False, f"token accepted by GET /streams: {exc}")]
        lines.append(CheckLine(True, f"token accepted ({len(streams)} stream(s) visible)"))
        for ref in destinations:
            try:
                stream = await self.client.resolve_stream(ref)
            except InboxdError as exc:
                lines.append(CheckLine(False, f"stream {ref!r}: {exc}"))
                continue
            lines.append(
                CheckLine(
                    True, f"stream {stream.id} ({stream.name!r}, datapool {stream.datapool!r})"
                )
            )
        return lines
