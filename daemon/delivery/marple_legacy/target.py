"""The older Marple API target: library upload → import → metadata → share link.

One file travels like this (``marple-api-guide.txt``; every answer is the envelope
``{"request_time", "message"}``):

1. ``POST /library/folder/add {"path": <parent>, "new_folder_name": <name>}`` for each level of
   the file's folder that this process has not made or met yet (an answer that it exists
   already — 409, or a 400 saying so — counts as made): an upload needs an existing folder.
   ``POST /library/file/upload?path=<folder>`` — the file, streamed as multipart ``file``, then
   lands at ``<[marple] folder>/<dataset name>`` (the dataset name is the path relative to the
   inbox by default, so ``session-1/run.csv`` goes to ``/inboxd/session-1/run.csv``).
2. ``GET /sources/lookup?path=`` — is there a source for that path already (an earlier version
   of the file)? Then the import below re-imports it in place, keeping its id.
3. ``POST /library/file/import {"path", "plugin"}`` → ``source_id``. The plugin comes from the
   extension (``[marple] plugins``) unless the job's metadata names one under ``plugin`` (set it
   in a route: ``[[routes]] metadata = { plugin = "hdf5_plugin" }``); that key is not sent on
   as metadata.
4. ``POST /library/metadata {"source_id", "metadata": [{"name", "value"}]}`` — the job's
   metadata, with the keys of ``[marple] date_metadata`` turned into UTC seconds and the file's
   modification time under ``[marple] modified_key``.
5. With ``[marple] share = true``: ``POST /library/share/new`` then
   ``GET /library/share/{id}/link`` (``?url=`` with ``[marple] share_url``); the link is kept
   in the job's ``target_refs``. With ``share_scope = "folder"`` the sources of one folder on
   the file server share one link: the folder's first source makes the share, each later one
   is added with ``POST /library/share/{id}/add``, which answers a *new* share id holding all of
   them; its link (every job keeps the link as it stood after its file) opens the whole folder.
   The adds of one folder are made one at a time, so none is lost to a concurrent one.

The poller then asks ``GET /sources/status?id=1&id=2…`` (one request per ``[poll] batch_size``
sources) until the status is 100 (imported) or negative (failed).

Each step is journaled *before* its side effect, in the job's ``stage`` and ``mode`` columns
(``mode`` names the step; the ``remote_id`` column holds the source id):

==========  ==========  =================================================================
stage       mode        a restart (or a retry after a lost answer) does
==========  ==========  =================================================================
uploading   upload      upload again: the same path is overwritten, nothing is duplicated
completing  import      if no source existed before (``remote_id`` empty): look the path
                        up; found → the import went through, take that source; else import.
                        If one existed (a changed file): import again — a re-import keeps
                        the source id, so it cannot make a second source
completed   metadata    send the metadata again (it sets the same values)
completed   share       make a share again (a lost answer leaves an unused share id behind;
                        it holds no data)
completed   share:<id>  ask for the link of that share again (a read)
==========  ==========  =================================================================

A changed file is a new version of the same path: it is uploaded over the old bytes and the
source is re-imported in place, so the file keeps one source (and its share link); a version
that changed *during* its upload never reached the import and leaves nothing behind.

The folder shares are known to the running process (and to a changed file through its last
version's ``target_refs``): after a restart, the next new file of a folder starts a new share
for it; the earlier link keeps opening the files it had.

The guide says to always use https: a plain ``http://`` URL to a host other than this machine
is warned about in the log at start and by ``inboxd check`` (the token would cross the network
in clear).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import structlog

from daemon import retry
from daemon.compat import UTC, fromisoformat
from daemon.config import MarpleSettings
from daemon.delivery import CheckLine, Delivered, ImportUpdate, Work
from daemon.delivery.files import FileRef, FileSlice
from daemon.delivery.flow import BytesSent, Resume, UploadOptions, delivered_hash
from daemon.delivery.marple_db.client import MarpleClient
from daemon.delivery.marple_legacy.client import IMPORTED, MarpleLegacyApi, SourceStatus
from daemon.errors import (
    AuthError,
    EmptyFileError,
    FileProblem,
    InboxdError,
    RateLimitedError,
    TransportError,
    UploadFailed,
)
from daemon.net.addresses import is_loopback
from daemon.state import Job, Stage

_T = TypeVar("_T")
_log = structlog.get_logger(__name__)

#: The job metadata key that chooses the plugin (read and removed before metadata is sent).
PLUGIN_KEY = "plugin"

_UPLOAD, _IMPORT, _METADATA, _SHARE = "upload", "import", "metadata", "share"


@dataclass(frozen=True)
class _Plan:
    """Everything decided before the first request: no side effect can fail on these."""

    path: str  # on the file server
    folder: str
    filename: str
    plugin: str
    metadata: list[dict[str, Any]]


class MarpleLegacyTarget:
    """Delivers files as sources of the older Marple API (file server library + import)."""

    kind = "marple"

    def __init__(
        self,
        client: MarpleClient,
        options: UploadOptions,
        settings: MarpleSettings,
        *,
        batch_size: int = 100,
    ) -> None:
        self.api = MarpleLegacyApi(client)
        self.options = options
        self.settings = settings
        self.batch_size = batch_size
        #: folders on the file server known to exist (made or met by this process)
        self.folders: set[str] = {"/"}
        #: folder → the newest share id of its sources (``share_scope = "folder"``)
        self.folder_shares: dict[str, str] = {}
        self._share_locks: dict[str, anyio.Lock] = {}
        self._folder_lock = anyio.Lock()
        warning = plain_http_warning(self.api.base_url)
        if warning:
            _log.warning("marple.plain_http", problem=warning)

    async def resolve_destination(self, ref: int | str) -> int:
        """Streams do not exist in this API: every file goes to ``[marple] folder``."""
        return 0

    async def ensure_folder(self, folder: str) -> None:
        """Make ``folder`` and the folders above it on the file server, level by level
        (``POST /library/folder/add``), except those known to exist already."""
        if folder in self.folders:
            return
        async with self._folder_lock:  # one request per folder, whichever worker needs it
            await self._make_folders(folder)

    async def _make_folders(self, folder: str) -> None:
        parts = [p for p in folder.split("/") if p]
        parent = "/"
        for name in parts:
            path = f"{parent.rstrip('/')}/{name}"
            if path not in self.folders:
                made = await retry.call(
                    functools.partial(self.api.add_folder, parent, name),
                    self.options.policy,
                    what="add folder",
                    on_retry=self.options.on_retry,
                )
                _log.info("marple.folder", folder=path, made=made)
                self.folders.add(path)
            parent = path

    def share_lock(self, folder: str) -> anyio.Lock:
        """The lock that makes the share adds of one folder one at a time."""
        return self._share_locks.setdefault(folder, anyio.Lock())

    # ---- deliver ----------------------------------------------------------------------

    async def deliver(self, work: Work) -> Delivered:
        """Upload, import and describe one file, resuming from its journal."""
        f = work.file
        if f.size == 0:
            raise EmptyFileError(
                f"{f.path.name}: the file is empty (0 bytes)",
                advice="Marple cannot import an empty file; write data into it or remove it",
            )
        plan = self.plan(work.job, f)
        f.check_unchanged()
        return await _Delivery(self, work, plan).run()

    def plan(self, job: Job, file: FileRef) -> _Plan:
        """Server path, plugin and metadata of a job; FileProblem/UploadFailed if impossible."""
        parts = [p for p in job.remote_name.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise FileProblem(f"{job.remote_name!r}: not a usable path on the file server")
        path = "/".join([self.settings.folder.rstrip("/"), *parts])
        folder = str(PurePosixPath(path).parent)
        metadata = dict(job.metadata)
        chosen = metadata.pop(PLUGIN_KEY, None)
        plugin = chosen if isinstance(chosen, str) and chosen.strip() else None
        if plugin is None:
            plugin = self._plugin_for(parts[-1])
        return _Plan(path, folder, parts[-1], plugin.strip(), self._metadata(metadata, file))

    def _plugin_for(self, name: str) -> str:
        # The longest known suffix wins, so "csv.zip" can differ from "zip".
        pieces = name.lower().split(".")[1:]
        for i in range(len(pieces)):
            plugin = self.settings.plugins.get(".".join(pieces[i:]))
            if plugin:
                return plugin
        ext = f"'.{pieces[-1]}'" if pieces else "(none)"
        known = ", ".join(sorted(self.settings.plugins)) or "none"
        raise FileProblem(
            f"{name}: no import plugin for the extension {ext} (known: {known})",
            advice=(
                f"add it to [marple] plugins (e.g. {pieces[-1] if pieces else 'ext'} = "
                '"csv_plugin"), or name one in a route: metadata = { plugin = "..." }'
            ),
        )

    def _metadata(self, values: dict[str, Any], file: FileRef) -> list[dict[str, Any]]:
        """Name/value pairs to send: dates as UTC seconds, plus the modification time."""
        out: dict[str, Any] = {}
        for name, value in values.items():
            if value is None:
                continue  # no value to set; the API has no way to say "unset"
            if name in self.settings.date_metadata:
                value = _utc_seconds(name, value)
            out[name] = value
        key = self.settings.modified_key
        if key and key not in out:
            out[key] = file.mtime_ns // 1_000_000_000
        return [{"name": name, "value": value} for name, value in out.items()]

    # ---- poll -------------------------------------------------------------------------

    async def poll(self, jobs: Sequence[Job]) -> list[ImportUpdate]:
        """``GET /sources/status`` with up to ``batch_size`` ids per request."""
        by_source: dict[int, list[Job]] = defaultdict(list)
        for job in jobs:
            # Jobs of another kind (the target was switched) are left for that target.
            if job.remote_id is not None and job.target == self.kind:
                by_source[job.remote_id].append(job)
        ids = list(by_source)
        updates = []
        for i in range(0, len(ids), self.batch_size):
            for st in await self.api.statuses(ids[i : i + self.batch_size]):
                for job in by_source.get(st.source_id, ()):
                    updates.append(_update(job.id, st))
        return updates

    # ---- check ------------------------------------------------------------------------

    async def check(self, destinations: Sequence[int | str] = ()) -> list[CheckLine]:
        """``/version`` (no token needed), the token (``GET /``), and where files will go."""
        base = self.api.base_url
        warning = plain_http_warning(base)
        warned = [CheckLine(True, warning, warn=True)] if warning else []
        try:
            version = await self.api.version()
        except AuthError as exc:  # a server that wants the token even here
            return [*warned, CheckLine(False, f"token accepted by GET /version: {exc}")]
        except InboxdError as exc:
            return [*warned, CheckLine(False, f"reach {base}/version: {exc}")]
        lines = [*warned, CheckLine(True, f"reach {base}/version (Marple {version})")]
        try:
            await self.api.token_check()
        except AuthError as exc:
            return [*lines, CheckLine(False, f"token accepted by GET /: {exc}")]
        except InboxdError as exc:
            return [*lines, CheckLine(False, f"GET /: {exc}")]
        lines.append(CheckLine(True, "token accepted"))
        plugins = ", ".join(f"{e} → {p}" for e, p in sorted(self.settings.plugins.items()))
        lines.append(
            CheckLine(True, f"files go to {self.settings.folder} (plugins: {plugins or 'none'})")
        )
        if self.settings.share:
            scope = "folder" if self.settings.share_scope == "folder" else "source"
            on = f", links on {self.settings.share_url}" if self.settings.share_url else ""
            lines.append(
                CheckLine(
                    True,
                    f"one share link per {scope}, opening workbook {self.settings.workbook!r}{on}",
                )
            )
        return lines


def plain_http_warning(url: str) -> str | None:
    """A warning when ``url`` is plain http to another machine (the guide: always https)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or is_loopback(parts.hostname or ""):
        return None
    where = parts.netloc.rpartition("@")[2]  # never a user:password written into the URL
    return (
        f"[api] url {parts.scheme}://{where} is plain http to another machine: the "
        "token and the files cross the network unencrypted; the API guide says always use "
        "https"
    )


def _update(job_id: int, st: SourceStatus) -> ImportUpdate:
    """A source status as an import update (codes: 100 imported, 0..99 percent, < 0 failed)."""
    code = st.status
    if isinstance(code, int | float) and not isinstance(code, bool) and math.isfinite(code):
        if code == IMPORTED:
            return ImportUpdate(job_id, "FINISHED", 100.0, st.message, True, False)
        if code < 0:
            why = st.message or f"the import failed (status {code:g})"
            return ImportUpdate(job_id, "FAILED", None, why, True, True)
        if code < IMPORTED:
            status = "WAITING" if code == 0 else "IMPORTING"
            return ImportUpdate(job_id, status, float(code), st.message, False, False)
    # Unknown codes are recorded and polled again, never a crash (as for Marple DB).
    return ImportUpdate(job_id, f"STATUS {code}", None, st.message, False, False)


def _utc_seconds(name: str, value: Any) -> int:
    """A metadata date as UTC seconds: numbers are taken as seconds, strings as ISO 8601."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(float(text))
        except (ValueError, OverflowError):  # not a number, or nan/inf
            pass
        try:
            when = fromisoformat(text)
        except ValueError:
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)  # no offset given: the guide's dates are UTC
            return int(when.timestamp())
    raise UploadFailed(
        f"metadata {name!r} = {value!r} is listed in [marple] date_metadata but is not a date "
        '(use ISO 8601 such as "2024-05-01T14:30:00+02:00", or UTC seconds)',
        cause_kind="metadata",
    )


class _Delivery:
    """One run (or resumed run) of the steps in the module docstring."""

    def __init__(self, target: MarpleLegacyTarget, work: Work, plan: _Plan) -> None:
        self.target = target
        self.api = target.api
        self.work = work
        self.plan = plan
        self.opts = target.options
        self.state: Resume = replace(work.resume, parts_done=set())
        self.sent = BytesSent(work.progress)
        #: the digest of the file as uploaded (``daemon.delivery.content``), once it was
        self.digest: bytes | None = None

    async def _save(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        await self.work.journal.save(self.state)

    async def _step(self, call: Callable[[], Awaitable[_T]], what: str) -> _T:
        """One request whose repetition is safe, with the usual retries."""
        return await retry.call(call, self.opts.policy, what=what, on_retry=self.opts.on_retry)

    async def run(self) -> Delivered:
        st = self.state
        step = st.mode or ""
        after_upload = st.stage in (Stage.COMPLETING, Stage.COMPLETED)
        recovered = after_upload
        source_id = st.dataset_id
        share_id: str | None = None
        if after_upload and step == _IMPORT:
            source_id, found = await self._import(existing=st.dataset_id, ambiguous=True)
            recovered = found
        elif after_upload and source_id is not None and step == _METADATA:
            pass
        elif after_upload and source_id is not None and step.startswith(_SHARE):
            share_id = step.partition(":")[2] or None
        else:
            await self._upload()
            existing = await self._step(lambda: self.api.lookup(self.plan.path), "lookup")
            await self._save(stage=Stage.COMPLETING, mode=_IMPORT, dataset_id=existing)
            source_id, recovered = await self._import(existing=existing, ambiguous=False)
            step = _IMPORT
        assert source_id is not None
        if step in (_IMPORT, _METADATA):
            await self._save(stage=Stage.COMPLETED, mode=_METADATA, dataset_id=source_id)
            if self.plan.metadata:
                entries = self.plan.metadata
                await self._step(lambda: self.api.add_metadata(source_id, entries), "metadata")
        refs: dict[str, Any] = {
            "source_id": source_id,
            "path": self.plan.path,
            "plugin": self.plan.plugin,
        }
        if self.target.settings.share:
            refs.update(await self._share(source_id, share_id))
        f = self.work.file
        known = {1: self.digest} if self.digest is not None else {}
        return Delivered(
            dataset_name=self.work.job.remote_name,
            dataset_id=source_id,
            bytes_sent=self.sent.total,
            mode="library",
            refs=refs,
            recovered=recovered,
            content_hash=await delivered_hash(f, f.size, known),
        )

    async def _upload(self) -> None:
        await self._save(stage=Stage.UPLOADING, mode=_UPLOAD, dataset_id=None)
        await self.target.ensure_folder(self.plan.folder)
        f = self.work.file
        source = FileSlice(
            f.path,
            0,
            f.size,
            inode=f.inode,
            min_size=f.size,
            throttle=self.opts.throttle,
            chunk_size=self.opts.chunk_size,
            on_digest=self._digested,
        )

        async def once() -> None:
            add, undo = self.sent.tracker()
            try:
                await self.api.upload(
                    self.plan.folder, source, filename=self.plan.filename, progress=add
                )
            except BaseException:
                undo()
                raise

        # Repeating an upload overwrites the same path: safe after any failure.
        await self._step(once, "library upload")
        f.check_unchanged()  # changed after the last byte went out: the new version follows

    def _digested(self, digest: bytes) -> None:
        self.digest = digest

    async def _import(self, *, existing: int | None, ambiguous: bool) -> tuple[int, bool]:
        """Import once; returns (source id, whether an earlier lost import was found)."""
        policy = self.opts.policy
        attempt = 0
        while True:
            attempt += 1
            if ambiguous and existing is None:
                # There was no source before our import: one now is the import's work.
                found = await self._step(lambda: self.api.lookup(self.plan.path), "lookup")
                if found is not None:
                    return found, True
            try:
                return await self.api.import_file(self.plan.path, self.plan.plugin), False
            except InboxdError as exc:
                if not exc.retryable or attempt >= policy.attempts:
                    raise
                # Refused before processing (429, no connection) or perhaps done (5xx, no
                # answer, garbage): look before importing again in the second case.
                refused = isinstance(exc, RateLimitedError)  # a 429; a 5xx may have done the work
                refused |= isinstance(exc, TransportError) and not exc.maybe_sent
                ambiguous = not refused
                await retry.backoff(
                    policy, attempt, exc, what="import", on_retry=self.opts.on_retry
                )

    async def _share(self, source_id: int, share_id: str | None) -> dict[str, Any]:
        if self.target.settings.share_scope == "folder":
            async with self.target.share_lock(self.plan.folder):
                return await self._folder_share(source_id, share_id)
        settings = self.target.settings
        prev = self.work.previous_refs or {}
        if (
            share_id is None
            and prev.get("source_id") == source_id
            and prev.get("workbook") == settings.workbook
            and isinstance(prev.get("share_id"), str)
            and isinstance(prev.get("share_link"), str)
        ):
            # A new version re-imported into the same source: its link still opens it.
            return {k: prev[k] for k in ("share_id", "share_link", "workbook")}
        if share_id is None:
            await self._save(mode=_SHARE)
            share_id = await self._step(
                lambda: self.api.new_share(settings.workbook, [source_id]), "new share"
            )
            await self._save(mode=f"{_SHARE}:{share_id}")
        return await self._link(share_id)

    async def _folder_share(self, source_id: int, share_id: str | None) -> dict[str, Any]:
        """The folder's share, with this source added: made by the folder's first source,
        each later one added to the newest share id (which ``share/add`` replaces)."""
        settings = self.target.settings
        folder = self.plan.folder
        shares = self.target.folder_shares
        if share_id is None:
            prev = self.work.previous_refs or {}
            base = shares.get(folder)
            if base is None and prev.get("share_folder") == folder:
                base = prev.get("share_id") if isinstance(prev.get("share_id"), str) else None
            await self._save(mode=_SHARE)
            if base is None:
                share_id = await self._step(
                    lambda: self.api.new_share(settings.workbook, [source_id]), "new share"
                )
            else:
                old = base
                share_id = await self._step(
                    lambda: self.api.add_to_share(old, settings.workbook, [source_id]),
                    "add to share",
                )
            await self._save(mode=f"{_SHARE}:{share_id}")
            shares[folder] = share_id
        else:
            shares.setdefault(folder, share_id)  # resumed: at least as new as nothing
        return {**await self._link(share_id), "share_folder": folder}

    async def _link(self, share_id: str) -> dict[str, Any]:
        settings = self.target.settings
        url = settings.share_url
        link = await self._step(lambda: self.api.share_link(share_id, url), "share link")
        return {"share_id": share_id, "share_link": link, "workbook": settings.workbook}


__all__ = ["MarpleLegacyTarget", "plain_http_warning"]
