"""What every target's delivery flow shares: the saved place of a delivery (``Resume``) and
the journal it is saved through, the upload options, the count of bytes sent that can be taken
back when a request is retried (``BytesSent``), and the hash of what was delivered."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import structlog

from daemon import retry
from daemon.delivery import content
from daemon.delivery.files import CHUNK_SIZE, FileRef, Progress, Throttle
from daemon.errors import InboxdError
from daemon.state import Stage

_log = structlog.get_logger(__name__)


@dataclass
class Resume:
    """What an earlier attempt of this upload got done (what the queue persisted)."""

    stage: Stage = Stage.NEW
    ingestion_id: int | None = None
    dataset_id: int | None = None
    dataset_name: str | None = None
    mode: str | None = None
    part_size: int | None = None
    parts_done: set[int] = field(default_factory=set)
    fell_back: bool = False
    #: xxh3_128 digests of the parts (or Azure blocks) stored, where known
    #: (``daemon.delivery.content``)
    part_digests: dict[int, bytes] = field(default_factory=dict)


class Journal(Protocol):
    """Where the flow records progress; the daemon's implementation writes to the queue."""

    async def save(self, resume: Resume) -> None:
        """Persist the whole ``resume`` (stage, ingestion fields) durably before returning."""

    async def part_done(self, part_number: int, digest: bytes | None = None) -> None:
        """Persist that a part (or Azure block) is stored, with the digest of its bytes."""


class MemoryJournal:
    """A journal for one-shot uploads: keeps the state in memory only."""

    def __init__(self) -> None:
        self.resume = Resume()
        self.saves = 0

    async def save(self, resume: Resume) -> None:
        self.resume = replace(
            resume, parts_done=set(resume.parts_done), part_digests=dict(resume.part_digests)
        )
        self.saves += 1

    async def part_done(self, part_number: int, digest: bytes | None = None) -> None:
        self.resume.parts_done.add(part_number)
        if digest is not None:
            self.resume.part_digests[part_number] = digest


@dataclass(frozen=True)
class UploadOptions:
    policy: retry.RetryPolicy = field(default_factory=retry.RetryPolicy)
    part_concurrency: int = 4
    #: storage attempts per part/object before giving up on storage (then: fallback or abort)
    storage_attempts: int = 5
    server_fallback: bool = True
    #: refresh signed URLs once this fraction of their lifetime is left (0.1 = at 90 %)
    url_refresh_margin: float = 0.1
    #: awaited per chunk read from disk, in every mode: the global bandwidth limit
    throttle: Throttle | None = None
    #: bytes read and sent at a time (smaller at low rate limits, so bodies never stall long)
    chunk_size: int = CHUNK_SIZE
    #: told the error kind of every retried step (metrics)
    on_retry: retry.OnRetry | None = None
    abort_on_give_up: bool = False
    abort_on_cancel: bool = False
    #: recognise a dataset of the name whose metadata has this file's size and mtime as this
    #: file already delivered (the daemon: a restore over a fresh state database); off for a
    #: one-shot ``inboxd push``, which uploads what it is told to
    recognise_delivered: bool = True


class BytesSent:
    """Counts bytes sent; a failed request's bytes are taken back so the total stays honest."""

    def __init__(self, progress: Progress | None) -> None:
        self.total = 0
        self._progress = progress

    def tracker(self) -> tuple[Progress, Callable[[], None]]:
        sent = 0

        def add(n: int) -> None:
            nonlocal sent
            sent += n
            self.total += n
            if self._progress is not None:
                self._progress(n)

        def undo() -> None:
            nonlocal sent
            self.total -= sent
            if self._progress is not None and sent:
                self._progress(-sent)
            sent = 0

        return add, undo


async def delivered_hash(
    file: FileRef, segment: int, known: Mapping[int, bytes] | None = None
) -> str | None:
    """The content hash (``daemon.delivery.content``) of ``file``, delivered in ``segment``-byte
    segments of which ``known`` were hashed while they were sent; the others are read now.

    The caller checked that the file is still the version pinned, so its bytes are the ones
    delivered. If it changed since, None (the hash is unknown: the next version of the file
    then counts as a new one) rather than a wrong hash.
    """
    try:
        return await content.hash_file(
            file.path,
            file.size,
            segment,
            inode=file.inode,
            pinned=(file.mtime_ns, file.ctime_ns),
            known=known,
        )
    except InboxdError as exc:
        _log.warning("content_hash.unknown", file=file.path.name, reason=str(exc))
        return None
