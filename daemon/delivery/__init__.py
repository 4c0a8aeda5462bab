"""Delivery targets: the small interface between the workers and a service.

A target delivers one file (``deliver``: start → upload → finish, aborting what it started
when it cannot finish), reports import progress of delivered files (``poll``), and checks
its configuration against the server (``check``). The queue, the watcher, the workers'
retries and crash recovery are the same for every target; only this interface differs.

Targets raise the errors of ``daemon.errors`` with the same meaning everywhere: a retryable
error sends the job back to the queue (the target resumes from ``Work.resume``), a
``FileProblem``/``UploadFailed`` ends it with the reason, an ``AuthError`` pauses uploads.

Kinds: ``marple-db`` (the default, ``daemon.delivery.marple_db.target``), ``marple`` (the older
Marple API, ``daemon.delivery.marple_legacy.target``) and ``data-service`` (the spreadsheet data
service, ``daemon.delivery.data_service.target``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from daemon.delivery.files import FileRef, Progress
from daemon.delivery.flow import Journal, Resume
from daemon.errors import InboxdError
from daemon.state import ImportRecord, Job, PriorDelivery

KINDS = ("marple-db", "marple", "data-service")


@dataclass(frozen=True)
class Work:
    """One file to deliver, with everything a target needs to start or resume it."""

    job: Job
    file: FileRef
    resume: Resume
    journal: Journal
    progress: Progress
    #: upload keys of earlier, unfinished versions of the same file
    predecessor_keys: frozenset[str] = frozenset()
    #: ``target_refs`` of the last delivered version of the same file, if any
    previous_refs: dict[str, Any] | None = None
    #: the last delivery of this file when this version is it with bytes appended and
    #: ``[upload] on_append = "same-dataset"``: deliver into the same dataset (Marple DB:
    #: overwrite it, keeping its id). Targets that keep one object per file do so anyway.
    append: PriorDelivery | None = None
    #: the state database knows an earlier delivery of this path: its content was compared
    #: with this version, so a dataset of the name that merely has the same size and mtime
    #: is not taken for this file (that is only for a path with no history: a restore)
    delivered_before: bool = False


@dataclass(frozen=True)
class Delivered:
    """What a delivery achieved."""

    dataset_name: str
    #: the service's numeric id of what was made (dataset, source); None when it has none
    dataset_id: int | None
    bytes_sent: int
    mode: str
    #: the service's own identifiers, shown by ``status`` (source id, share link, ...)
    refs: dict[str, Any] = field(default_factory=dict)
    #: False when the service has nothing more to report (no import to poll)
    needs_poll: bool = True
    fell_back: bool = False
    recovered: bool = False
    #: the hash of the bytes delivered (``daemon.delivery.content``); None when not known
    content_hash: str | None = None
    #: what happened instead of a plain delivery, when the target decided it: "on_server"
    #: (the service already held this file), "appended" (delivered into ``Work.append``'s
    #: dataset) or "new" (``Work.append`` asked, but the dataset was gone: a new one); None
    #: when the target did what the worker asked
    change: str | None = None


#: A delivered file's import progress as the service reports it: the very record the queue
#: stores (``Queue.record_imports``), so the poller passes a target's answer straight through.
ImportUpdate = ImportRecord


@dataclass(frozen=True)
class CheckLine:
    """One line of ``inboxd check``."""

    ok: bool
    text: str
    #: worth a person's attention, but nothing fails for it (``check`` prints ``warn``)
    warn: bool = False


class Target(Protocol):
    """What the workers and the poller need from a service."""

    kind: str

    async def deliver(self, work: Work) -> Delivered:
        """Start, upload and finish one file (or resume it); abort what cannot finish."""
        ...

    async def poll(self, jobs: Sequence[Job]) -> list[ImportUpdate]:
        """Import progress of delivered jobs (those the service knows; others omitted)."""
        ...

    async def check(self, destinations: Sequence[int | str] = ()) -> list[CheckLine]:
        """Reach the service, check the credentials and the configured destinations."""
        ...

    async def resolve_destination(self, ref: int | str) -> int:
        """The numeric destination (a stream id) for a configured reference; 0 if unused."""
        ...


async def service_answers(target: Target) -> tuple[bool, str]:
    """Whether the service answers now, and if not why: the probe that ends an outage hold.

    A target may offer ``probe()`` (one cheap authenticated request, raising our errors);
    otherwise its ``check()`` is the probe and every line must succeed.
    """
    probe = getattr(target, "probe", None)
    try:
        if probe is not None:
            await probe()
            return True, ""
        failed = [line.text for line in await target.check() if not line.ok]
    except InboxdError as exc:
        return False, str(exc)
    return not failed, "; ".join(failed)
