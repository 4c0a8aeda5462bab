"""The sandbox's in-memory records: datasets, ingestions and the request log.

The import status of a dataset is not stored but derived from the time since its upload was
completed, so tests reading `sandbox.datasets[i].import_status` see the same value a client
polling `/datasets/status` would.

`Dataset.as_json` is the dataset object of the real service, with every field the official SDK's
`Dataset` model requires, in its types (times in epoch seconds). Fields about the imported data
itself cannot be known, because the sandbox parses nothing: docs/sandbox.md lists what it sends
for those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

import anyio

from daemon.compat import UTC

#: Ingestion states.
UPLOADING = "UPLOADING"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
ABORTED = "ABORTED"
SUPERSEDED = "SUPERSEDED"

#: Share of the import time spent in WAITING before IMPORTING starts.
WAITING_SHARE = 0.1
#: The lake layout version a dataset's parquet files were written with (the SDK requires the
#: field; the sandbox writes no parquet and says what a current server would).
PARQUET_VERSION = 1


def iso8601(unix: float) -> str:
    """Format a unix time the way the API does (UTC, ISO 8601, 'Z')."""
    stamp = datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@dataclass
class Dataset:
    """One dataset of a stream, with its import timeline."""

    id: int
    stream_id: int
    path: str
    metadata: dict[str, Any]
    size: int
    created_at: float = field(default_factory=time.time)
    #: Where the completed object lives: ("local", path) / ("s3", key) / ("azure", blob) /
    #: ("discard", "") or None before a successful complete.
    location: tuple[str, str] | None = None
    #: A status that holds until changed (UPLOADING, FAILED); None while the import timeline runs.
    fixed_status: str | None = "UPLOADING"
    fixed_message: str | None = None
    #: time.monotonic() of the successful complete, and the length of the simulated import.
    import_started: float | None = None
    import_seconds: float = 0.0
    #: The message the import ends with when it is set to fail (fail_import_glob).
    import_failure: str | None = None
    #: `plugin_args` given to POST /ingestion (None: the stream's default).
    plugin_args: str | None = None
    #: time.time() of the successful complete (the stream's `last_ingested`).
    completed_at: float | None = None

    @property
    def name(self) -> str:
        """The dataset name (the API calls it `path`)."""
        return self.path

    def _elapsed_share(self) -> float:
        if self.import_started is None:
            return 0.0
        if self.import_seconds <= 0:
            return 1.0
        return (time.monotonic() - self.import_started) / self.import_seconds

    @property
    def import_status(self) -> str:
        """The status a client polling now would see."""
        if self.fixed_status is not None:
            return self.fixed_status
        share = self._elapsed_share()
        if share >= 1.0:
            return "FAILED" if self.import_failure is not None else "FINISHED"
        return "WAITING" if share < WAITING_SHARE else "IMPORTING"

    @property
    def import_progress(self) -> float | None:
        """Progress 0..100 while importing; None when nothing is being imported."""
        status = self.import_status
        if status == "FINISHED":
            return 100.0
        if status == "WAITING":
            return 0.0
        if status == "IMPORTING":
            share = (self._elapsed_share() - WAITING_SHARE) / (1.0 - WAITING_SHARE)
            return round(min(max(share, 0.0), 1.0) * 100.0, 1)
        return None

    @property
    def import_message(self) -> str | None:
        """Why the dataset failed, or None."""
        if self.fixed_status is not None:
            return self.fixed_message
        if self.import_status == "FAILED":
            return self.import_failure
        return None

    def fail(self, message: str) -> None:
        """Mark the dataset FAILED for good (size mismatch, abort)."""
        self.fixed_status = "FAILED"
        self.fixed_message = message
        self.import_started = None

    def start_import(self, seconds: float, failure: str | None) -> None:
        """Start the simulated import now (after a successful complete)."""
        self.fixed_status = None
        self.fixed_message = None
        self.completed_at = time.time()
        self.import_started = time.monotonic()
        self.import_seconds = seconds
        self.import_failure = failure

    def reset_for_overwrite(
        self, metadata: dict[str, Any], size: int, plugin_args: str | None
    ) -> None:
        """Start over as a fresh upload of the same name, keeping the id."""
        self.metadata = metadata
        self.size = size
        self.plugin_args = plugin_args
        self.location = None
        self.completed_at = None
        self.fixed_status = "UPLOADING"
        self.fixed_message = None
        self.import_started = None
        self.import_failure = None

    @property
    def plugin(self) -> str:
        """The import plugin: the sandbox names it after the file's extension."""
        suffix = PurePosixPath(self.path).suffix.lower().lstrip(".")
        return suffix or "unknown"

    @property
    def backup_path(self) -> str | None:
        """Where the original file is kept once complete; None before, or when discarded."""
        if self.location is None or self.location[0] == "discard":
            return None
        kind, where = self.location
        if kind == "local":
            return f"datasets/{self.id}"  # relative to the sandbox's data directory
        return f"{kind}:{where}"  # the S3 key or the Azure blob name

    def as_json(self, *, datapool: str, stream_version: int) -> dict[str, Any]:
        """The dataset as the service's dataset endpoints answer it (see the module docstring)."""
        status = self.import_status
        imported = status == "FINISHED"
        # The import ran to its end (finished, or failed while importing; not an abort).
        import_time = (
            self.import_seconds
            if status in ("FINISHED", "FAILED") and self.import_started is not None
            else None
        )
        backup_path = self.backup_path
        return {
            "id": self.id,
            "stream_id": self.stream_id,
            "datastream_id": self.stream_id,
            "datastream_version": stream_version,
            "datapool": datapool,
            "path": self.path,
            "metadata": self.metadata,
            "created_at": self.created_at,
            "created_by": None,
            "import_status": status,
            "import_progress": self.import_progress,
            "import_message": self.import_message,
            "import_time": import_time,
            "import_speed": self.size / import_time if imported and import_time else None,
            "file_size": self.size,
            "cold_path": f"datapool={datapool}/dataset={self.id}" if imported else "",
            "cold_bytes": self.size if imported else 0,
            "hot_bytes": 0,
            "backup_path": backup_path,
            "backup_size": self.size if backup_path is not None else None,
            "plugin": self.plugin,
            "plugin_args": self.plugin_args if self.plugin_args is not None else "",
            "n_signals": 0 if imported else None,
            "n_datapoints": 0 if imported else None,
            "timestamp_start": None,
            "timestamp_stop": None,
            "parquet_version": PARQUET_VERSION,
        }


@dataclass
class Ingestion:
    """One upload attempt of a dataset."""

    id: int
    dataset_id: int
    mode: str
    file_size: int
    part_size: int | None
    #: Where direct uploads go: "local", "s3", "azure" or "discard".
    backend: str
    state: str = UPLOADING
    abort_reason: str | None = None
    created_at: float = field(default_factory=time.time)
    #: True once a `/upload/server` body was stored; it then wins at complete.
    server_upload: bool = False
    s3_key: str | None = None
    s3_upload_id: str | None = None
    azure_blob: str | None = None
    # Serialises complete/abort of one ingestion (a retried complete waits for the first).
    lock: anyio.Lock = field(default_factory=anyio.Lock, repr=False, compare=False)

    @property
    def part_count(self) -> int:
        """Number of multipart parts (1 for other modes)."""
        if not self.part_size:
            return 1
        return max(1, -(-self.file_size // self.part_size))

    def expected_part_size(self, number: int) -> int:
        """Length part `number` (1-based) must have."""
        assert self.part_size is not None
        start = (number - 1) * self.part_size
        return max(0, min(self.part_size, self.file_size - start))


@dataclass
class RequestRecord:
    """One request the sandbox received (API or storage), for tests to inspect."""

    method: str
    path: str
    query: str
    has_authorization: bool
    authorization: str | None
    kind: str
    time: float = field(default_factory=time.time)
    status: int | None = None
    #: The route key faults are matched on, e.g. "POST /ingestion/{id}/upload/complete".
    route: str | None = None
    #: True when the response was cut off on purpose (lost-response fault).
    dropped: bool = False
    headers: dict[str, str] = field(default_factory=dict, repr=False)
