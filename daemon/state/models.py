"""The state's models: files, jobs, their states and stages, deliveries, imports, the daemon's
own row, and the inbox's condition as the workers read it. Plain data, no SQL."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from daemon.compat import StrEnum


@dataclass(frozen=True)
class FileIdentity:
    """One version of one file in the inbox: a changed file is a new identity."""

    rel: str  # relative to the inbox, as os.fsdecode gives it (may hold surrogate escapes)
    size: int
    mtime_ns: int
    inode: int
    #: the inode's change time: a rewrite that restores the mtime still moves it. 0 = unknown
    #: (jobs queued before schema v3): then it matches any ctime. Part of the identity in the
    #: database (its unique index, the ledger, the upload key), not of ``==``: 0 there means
    #: "unknown", which must not make two sightings of one file unequal.
    ctime_ns: int = field(default=0, compare=False)

    def upload_key(self) -> str:
        """The key that tags what this version makes on the server (``inboxd_upload_id``).

        Derived from the identity, not drawn at random: a job re-enqueued after its row was
        lost (a power cut dropping the WAL's last commits, or all of it) gets the same key, so
        the dataset its lost attempt made is recognised as its own and taken over or found
        done, never duplicated as ``name (2)``. Two versions never share a key: each differs
        in size, mtime, ctime or inode.
        """
        text = f"{self.size}:{self.mtime_ns}:{self.ctime_ns}:{self.inode}:"
        digest = hashlib.blake2b(
            os.fsencode(self.rel) + b"\0" + text.encode(), digest_size=16, person=b"inboxd-key-v3"
        )
        return digest.hexdigest()


class JobState(StrEnum):
    """Where a job is in its life; see the module docstring for the transitions."""

    QUEUED = "queued"
    UPLOADING = "uploading"
    IMPORTING = "importing"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class Stage(StrEnum):
    """How far the ingestion flow got; persisted before each side effect."""

    NEW = "new"
    CREATING = "creating"
    UPLOADING = "uploading"
    COMPLETING = "completing"
    COMPLETED = "completed"


@dataclass(frozen=True)
class NewJob:
    """What the watcher hands to :meth:`Queue.enqueue_many` for one file."""

    identity: FileIdentity
    stream_id: int
    remote_name: str
    metadata: dict[str, Any]
    target: str = "marple-db"


@dataclass(frozen=True)
class Job:
    """A snapshot of one row of ``jobs``; re-read it after a write to see the new values."""

    id: int
    identity: FileIdentity
    state: JobState
    stage: Stage
    stream_id: int
    #: the name it is delivered under (dataset name, file path, data source name)
    remote_name: str
    metadata: dict[str, Any]
    upload_key: str  # FileIdentity.upload_key(); tags the dataset (a lost create is recognised)
    ingestion_id: int | None
    #: the target's id of what this job made (Marple DB dataset, legacy source, data source)
    remote_id: int | None
    mode: str | None
    part_size: int | None
    bytes_sent: int
    attempts: int  # tries that ended without success (retry_later, recover, mark_failed)
    next_attempt_at: float
    last_error: str | None
    error_kind: str | None
    import_status: str | None
    import_progress: float | None
    import_message: str | None
    fell_back: bool
    after_upload: str | None  # None until archived/deleted/kept
    created_at: float
    updated_at: float
    started_at: float | None
    uploaded_at: float | None
    finished_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    target: str = "marple-db"
    #: the target service's own identifiers (source id, share link, data source link)
    target_refs: dict[str, Any] = field(default_factory=dict)
    #: hash of the bytes delivered (``daemon.delivery.content``), once uploaded
    content_hash: str | None = None
    #: what this version is to the path's last delivery, when that decided how it was
    #: delivered: "appended" (delivered again into the same dataset), "unchanged" (nothing
    #: uploaded), "on_server" (a dataset of the name already held it); None otherwise
    change: str | None = None
    #: how many other jobs (any state) and ledger rows had the same path when ``claim`` took
    #: this one; None when not counted. 0 spares the worker a look at the path's history.
    same_path_jobs: int | None = None


@dataclass(frozen=True)
class PriorDelivery:
    """The last delivered version of a path: a job uploaded (importing) or done, else the
    newest ledger row. What a new version of the path is compared with
    (``daemon.delivery.content``)."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int
    remote_id: int | None
    content_hash: str | None
    #: the dataset name it went to (None for a ledger row: not kept there)
    remote_name: str | None = None
    #: the delivered job's ``target_refs`` (empty for a ledger row)
    target_refs: dict[str, Any] = field(default_factory=dict)
    #: False while its import is still running (the job is IMPORTING)
    imported: bool = True


@dataclass(frozen=True)
class DaemonInfo:
    """The running (or last) daemon's heartbeat, for ``inboxd status``."""

    pid: int
    started_at: float
    heartbeat_at: float
    info: dict[str, Any]


@dataclass(frozen=True)
class Delivered:
    """A delivered version of a file, found under another path (see ``delivered_elsewhere``)."""

    rel: str
    remote_id: int | None
    #: its job (DONE, or IMPORTING: uploaded, import still running); None when the job was
    #: pruned and only the ledger remembers it
    job: Job | None = None


@dataclass(frozen=True)
class ImportRecord:
    """A delivered file's import status as the service reports it, for ``record_import(s)``.

    Targets return these from ``poll`` (as ``daemon.delivery.ImportUpdate``).
    """

    job_id: int
    status: str
    progress: float | None
    message: str | None
    terminal: bool
    failed: bool


@dataclass(frozen=True)
class SettlingFile:
    """A file the watcher has seen but is waiting on until it stops changing."""

    rel: str
    size: int
    since: float


#: how often the daemon writes its heartbeat (status calls it dead after a few missed ones)
HEARTBEAT_SECONDS = 2.0


@dataclass(frozen=True)
class InboxTrouble:
    """The inbox folder is missing, or was just replaced (see ``Watcher.inbox_trouble``)."""

    #: what is wrong, for logs and job messages
    reason: str
    #: the folder is not there: nothing can be uploaded from it, uploads wait
    hold: bool
    #: how long a job whose file is missing waits before it is looked at again
    wait: float
