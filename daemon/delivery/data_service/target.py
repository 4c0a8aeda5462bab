"""The spreadsheet data service target: CSV and Excel files become data sources.

Protocol (``data-service-api.txt``):

* every request is signed with **OAuth 1.0** (HMAC-SHA1, ``Authorization: OAuth ...``; the
  signature comes from authlib's ``ClientAuth``) and asks for API version 1 with
  ``Accept: application/json;v=1``;
* ``GET /rateLimits`` (cached for an hour) gives ``fileSizeLimit`` — bigger files are refused
  before anything is sent; the table says "2 MB", so a small number is read as decimal
  megabytes — ``userApiCallRate`` and ``accountApiCallRate`` (requests per minute), which one
  client-side limiter shared by all workers keeps under, both at once, the refresh intervals
  and ``adapterTypes``;
* a new file goes through its adapter (``[data_service] adapters``: ``.csv`` → CSV, ``.xlsx`` →
  Excel): ``POST /adapter/csv|excel[?permissionType=]`` with the file as multipart form data
  creates a data source named like the attached file. It is then put into its data set (``PATCH
  /dataSources/{id}``) and given the configured ``grants`` (``POST /sourceGrants``);
* a changed file overwrites the data source made from its last delivered version
  (``Work.previous_refs``): ``PUT /adapter/csv|excel?dataSource=<link>``, so a watched
  spreadsheet keeps one data source that stays current. If that data source was deleted on
  the service (404), a new one is made;
* the data source's collection (the one its ``collections`` link names: a CSV file's only one,
  an Excel file's first tab) gets the job's metadata as collection properties
  (``PATCH /collections/{id}/properties``; values as strings, plus ``inboxd_upload_id`` and
  ``inboxd_file_modified``), and a CSV collection ``headerRow`` (``[data_service]
  csv_header_row``, default 1) so its columns are named by its first row, not A, B, C.
  Properties an earlier version set and this one lacks are deleted;
* the data set is the route's ``data_set`` or ``[data_service] data_set``: a link, or a name —
  looked up in ``GET /dataSets`` and, when there is none, created (``POST /dataSets``) with its
  ``data_set_properties`` (an existing one gets those it lacks or has otherwise).

Service rules kept on the client's side, so the service never has to refuse:

* **Refresh intervals**: a data source is not overwritten sooner than the larger of
  ``userHardRefreshInterval`` and ``userSoftRefreshInterval`` after inboxd last wrote it (the
  time is kept in the job's ``target_refs``, so it survives restarts). A version that comes
  sooner waits in the queue (:class:`~daemon.errors.NotYetError`: no worker is held); if the
  file changes again meanwhile, the waiting version is superseded with that reason and only
  the newest is sent.
* **423 Locked** (a collection being refreshed) is retried with backoff under ``[retry]``,
  then the job backs off like any retryable failure: never a permanent failure.

There is no import to follow: a delivered file is done (``needs_poll=False``).

Exactly one data source per file, whatever fails
------------------------------------------------

The adapters take no client-chosen id, but they name the data source after the attached file,
and the file name is ours to choose. So inboxd sends ``<name> [inboxd-<16 hex of the job's
upload key>].<ext>`` (``sales [inboxd-3f2a9c1b7d4e5f60].csv``): the marker is unique per job and
survives any path the service may strip. The journal records each step *before* it is taken
(stage and ``mode`` columns; the ``remote_id`` column holds the data source id):

==========  =============================================================================
stage       a restart (or a retry after a lost answer) does
==========  =============================================================================
creating    the POST may have landed: list ``GET /dataSources`` for a name holding this
            job's marker; found → take it, not found → POST again. (A 429 or a connect
            failure proves nothing was done, so those retry without looking.) A data source
            whose import is still running is ``pending``, which ``GET /dataSources`` hides:
            when the marker is not listed, the collections (``GET /collections``, which
            lists those of pending data sources too) name the data sources the list left
            out, and each is read by id before anything is posted again
completing  the data source exists: put it into the data set again (idempotent), add only
            the grants ``GET /sourceGrants`` does not list yet, set the properties again
uploading   an overwrite (PUT) replaces the whole content, so it is simply sent again
==========  =============================================================================

The journaled name also survives ``inboxd retry`` and a worker's ingestion reset (which clear
the stage), so a job whose name already carries its marker always looks before it posts. A new
version of a file whose earlier version never finished (changed during delivery, failed) looks
for the data sources of those versions' markers (``Work.predecessor_keys``) and overwrites the
one it finds instead of making another.

A data set created by name is looked for again by name before a ``POST /dataSets`` whose
answer was lost is repeated, so it too is made once.

Rate limits: a 429 makes every worker wait ``Retry-After`` (or ``[data_service]
rate_limit_wait`` seconds, 60 as the service advises, without one); the step is then retried
under the ``[retry]`` policy like any other retryable error.

Why one module: the target and its per-file flow (``_Delivery``) share the plan and the
data-set types and are read together against the service's documents; the API client, its
models and the call-rate gate live in client.py.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog

from daemon import retry
from daemon.compat import UTC
from daemon.config import ApiSettings, DataServiceSettings, RouteSettings
from daemon.delivery import CheckLine, Delivered, ImportUpdate, Work
from daemon.delivery.data_service.client import (
    LIMITS_TTL,
    MAX_PAGES,
    Adapter,
    DataServiceClient,
    DataSetInfo,
    DataSourceInfo,
    RateLimits,
    link_id,
    property_value,
)
from daemon.delivery.files import FileSlice
from daemon.delivery.flow import UploadOptions, delivered_hash
from daemon.errors import (
    AuthError,
    EmptyFileError,
    FileChangedError,
    FileProblem,
    InboxdError,
    NotFoundError,
    NotYetError,
    ProtocolError,
    RateLimitedError,
    RejectedError,
    TransportError,
    UploadFailed,
)
from daemon.intake.routing import first_route
from daemon.state import Job, Stage

_log = structlog.get_logger(__name__)
_T = TypeVar("_T")

KIND = "data-service"
#: Collection property of the job's upload key (the key Marple DB datasets carry as metadata).
UPLOAD_ID_PROPERTY = "inboxd_upload_id"
#: Collection property of the file's modification time (ISO 8601, UTC).
MODIFIED_PROPERTY = "inboxd_file_modified"
#: The collection property that names the row the columns are named after.
HEADER_ROW = "headerRow"
#: Added to a refresh-interval wait: the service counts from when it wrote, a little later
#: than our clock saw the answer, and a retry refused for a rounding error would cost a 429.
REFRESH_MARGIN = 0.5
_MARKER_HEX = 16


def marker(upload_key: str) -> str:
    """The tag that names a job's data source: ``inboxd-`` and 16 hex digits of its key."""
    return f"inboxd-{upload_key[:_MARKER_HEX]}"


def source_name(dataset_name: str, upload_key: str, extension: str) -> str:
    """``dir/sales.csv`` → ``dir/sales [inboxd-…].csv``: the name the adapter will give it.

    A name that holds the marker already (journaled by an earlier try) is kept as it is.
    """
    if marker(upload_key) in dataset_name:
        return dataset_name
    ext = f".{extension}"
    base = dataset_name[: -len(ext)] if dataset_name.lower().endswith(ext.lower()) else dataset_name
    return f"{base} [{marker(upload_key)}]{ext}"


def _refused_before_work(exc: InboxdError) -> bool:
    """Whether ``exc`` proves the request did nothing (a 429, or no connection at all)."""
    refused = isinstance(exc, RateLimitedError)  # a 429; a 5xx may have done the work
    return refused or (isinstance(exc, TransportError) and not exc.maybe_sent)


# ---------------------------------------------------------------------------------------------
# Transport: OAuth 1.0 signing and the call-rate gate


# ---------------------------------------------------------------------------------------------
# The target


@dataclass(frozen=True)
class _DataSetSpec:
    """Where a file's data source belongs: a DataSetLink, or a name to find or create."""

    ref: str
    properties: dict[str, str]
    #: the config key it came from, for a person who has to fix it
    source: str

    @property
    def is_link(self) -> bool:
        """A link (``https://…/dataSets/435``) rather than a name."""
        return self.ref.startswith(("http://", "https://"))


@dataclass(frozen=True)
class _Plan:
    """What one delivery decided before its first request."""

    adapter: Adapter
    name: str  # the data source name (the attached file's name), with the job's marker
    marker: str
    predecessor_markers: tuple[str, ...]
    #: collection properties: the job's metadata, the file facts and (CSV) headerRow
    properties: dict[str, str] = field(default_factory=dict)
    data_set: _DataSetSpec | None = None


class DataServiceTarget:
    """Delivers CSV and Excel files as data sources of the spreadsheet data service."""

    kind = KIND

    def __init__(
        self,
        client: DataServiceClient,
        options: UploadOptions,
        settings: DataServiceSettings,
        *,
        routes: Sequence[RouteSettings] = (),
    ) -> None:
        self.client = client
        self.options = options
        self.settings = settings
        self.routes = tuple(routes)
        self._limits: RateLimits | None = None
        self._limits_at = -math.inf
        self._limits_lock = anyio.Lock()
        #: data set name → its link, once found or made (the same for every worker)
        self._data_sets: dict[str, str] = {}
        self._data_set_locks: dict[str, anyio.Lock] = {}
        #: data source id → when this process last wrote it (UNIX seconds)
        self._written: dict[int, float] = {}

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        api: ApiSettings,
        settings: DataServiceSettings,
        options: UploadOptions,
        *,
        routes: Sequence[RouteSettings] = (),
    ) -> AsyncIterator[DataServiceTarget]:
        """The target with its own client; the connections close when the block ends."""
        async with DataServiceClient.from_settings(api, settings) as client:
            yield cls(client, options, settings, routes=routes)

    async def resolve_destination(self, ref: int | str) -> int:
        """Data sources are not filed into streams: always 0."""
        return 0

    # ---- helpers ----------------------------------------------------------------------

    async def _retry(self, step: Callable[[], Awaitable[_T]], what: str) -> _T:
        return await retry.call(
            step, self.options.policy, what=what, on_retry=self.options.on_retry
        )

    async def limits(self, *, refresh: bool = False, patient: bool = True) -> RateLimits:
        """``GET /rateLimits``, cached for :data:`LIMITS_TTL`; sets the call-rate limiter.

        ``patient=False`` asks once instead of retrying (``inboxd check`` answers at once).
        """
        async with self._limits_lock:
            now = anyio.current_time()
            if refresh or self._limits is None or now - self._limits_at > LIMITS_TTL:
                if patient:
                    self._limits = await self._retry(self.client.rate_limits, "read rate limits")
                else:
                    self._limits = await self.client.rate_limits()
                self._limits_at = now
                self.client.gate.set_rate(
                    self._limits.user_api_call_rate, self._limits.account_rate
                )
                _log.info(
                    "data_service.limits",
                    user_api_call_rate=self._limits.user_api_call_rate,
                    account_api_call_rate=self._limits.account_rate,
                    refresh_interval=self._limits.refresh_interval,
                    file_size_limit=self._limits.max_file_bytes,
                    adapter_types=self._limits.adapter_types,
                )
            return self._limits

    def _adapter_for(self, path: Path) -> Adapter:
        ext = path.suffix.lstrip(".").lower()
        adapter = self.settings.adapters.get(ext)
        if adapter is None:
            known = ", ".join(f".{e}" for e in sorted(self.settings.adapters)) or "none"
            raise FileProblem(
                f"{path.name}: the data service has no adapter for "
                f"{'.' + ext if ext else 'files without an extension'} (configured: {known})",
                advice="only spreadsheets are delivered; map the extension in "
                "[data_service] adapters, or keep such files out of the inbox ([inbox] exclude)",
            )
        return adapter

    def _data_set_spec(self, rel: str) -> _DataSetSpec | None:
        """The data set of the file at ``rel``: its route's, else ``[data_service]``'s."""
        rule = first_route(rel, self.routes)
        if rule is not None and rule.data_set is not None:
            props = rule.data_set_properties
            where = f"the [[routes]] entry with glob {rule.glob!r}"
            return _DataSetSpec(rule.data_set, _strings(props), where)
        if self.settings.data_set is not None:
            props = self.settings.data_set_properties
            return _DataSetSpec(self.settings.data_set, _strings(props), "[data_service] data_set")
        return None

    def _properties(self, work: Work, adapter: Adapter) -> dict[str, str]:
        """The collection properties of a job: metadata, file facts and (CSV) headerRow."""
        out: dict[str, str] = {}
        if adapter == "csv" and self.settings.csv_header_row > 0:
            out[HEADER_ROW] = str(self.settings.csv_header_row)
        out.update(_strings(work.job.metadata))
        header = out.get(HEADER_ROW)
        if header is not None and not (header.isdigit() and int(header) >= 1):
            raise UploadFailed(
                f"metadata {HEADER_ROW!r} = {header!r} is not a row number: it names the row "
                "that holds the column names (1 = the first); fix the route or sidecar, or "
                "set [data_service] csv_header_row",
                cause_kind="metadata",
            )
        out[UPLOAD_ID_PROPERTY] = work.job.upload_key
        modified = datetime.fromtimestamp(work.file.mtime_ns / 1e9, UTC)
        out[MODIFIED_PROPERTY] = modified.isoformat(timespec="seconds").replace("+00:00", "Z")
        return out

    def refresh_wait(self, source_id: int, *known: float | None) -> float:
        """Seconds until ``source_id`` may be written again (0: now).

        Counted from the latest of ``known`` write times and this process's own last write.
        """
        interval = self._limits.refresh_interval if self._limits is not None else 0.0
        times = [t for t in (*known, self._written.get(source_id)) if t is not None]
        if interval <= 0 or not times:
            return 0.0
        left = interval - (time.time() - max(times))
        return left + REFRESH_MARGIN if left > 0 else 0.0

    def wrote(self, source_id: int) -> float:
        """Note that this process just wrote ``source_id``; returns the time noted."""
        now = time.time()
        self._written[source_id] = now
        return now

    # ---- data sets --------------------------------------------------------------------

    async def data_set_link(self, spec: _DataSetSpec, *, fresh: bool = False) -> str:
        """The link of ``spec``'s data set, made by name (with its properties) if need be.

        ``fresh`` forgets what is known of the name (the data set was deleted meanwhile).
        """
        if spec.is_link:
            return spec.ref
        lock = self._data_set_locks.setdefault(spec.ref, anyio.Lock())
        async with lock:  # one lookup or creation per name, however many workers ask
            if fresh:
                self._data_sets.pop(spec.ref, None)
            link = self._data_sets.get(spec.ref)
            if link is not None:
                return link
            found = await self._find_data_set(spec.ref)
            if found is not None:
                link = found.uri
                await self._ensure_set_properties(link, spec.properties)
            else:
                link = await self._create_data_set(spec)
            self._data_sets[spec.ref] = link
            return link

    async def _find_data_set(self, name: str) -> DataSetInfo | None:
        """The first data set called ``name`` (``GET /dataSets``, paged), None if none is."""
        url: str | None = None
        for _ in range(MAX_PAGES):
            sets, url = await self._retry(
                functools.partial(self.client.data_sets_page, url), "list data sets"
            )
            for data_set in sets:
                if data_set.name == name:
                    return data_set
            if not url:
                return None
        raise ProtocolError("GET /dataSets: too many pages", endpoint="GET /dataSets")

    async def _create_data_set(self, spec: _DataSetSpec) -> str:
        """``POST /dataSets``; after an answer that may have been lost, look before repeating."""
        policy = self.options.policy
        attempt = 0
        ambiguous = False
        while True:
            attempt += 1
            if ambiguous:
                found = await self._find_data_set(spec.ref)
                if found is not None:
                    _log.info("data_set.recovered", data_set=found.uri, name=spec.ref)
                    await self._ensure_set_properties(found.uri, spec.properties)
                    return found.uri
            try:
                made = await self.client.create_data_set(spec.ref, spec.properties)
            except InboxdError as exc:
                if not exc.retryable or attempt >= policy.attempts:
                    raise
                ambiguous = not _refused_before_work(exc)
                await retry.backoff(
                    policy, attempt, exc, what="create data set", on_retry=self.options.on_retry
                )
                continue
            _log.info("data_set.created", data_set=made.uri, name=spec.ref)
            return made.uri

    async def _ensure_set_properties(self, link: str, wanted: Mapping[str, str]) -> None:
        """Give an existing data set the configured properties it lacks or has otherwise."""
        if not wanted:
            return
        have = await self._retry(
            lambda: self.client.properties(link, "dataSets"), "read data set properties"
        )
        changes = {k: v for k, v in wanted.items() if have.get(k) != v}
        if changes:
            await self._retry(
                lambda: self.client.set_properties(link, "dataSets", changes),
                "set data set properties",
            )

    # ---- deliver ----------------------------------------------------------------------

    async def deliver(self, work: Work) -> Delivered:
        """Create or overwrite the file's data source, resuming from the journal."""
        f = work.file
        adapter = self._adapter_for(f.path)
        if f.size == 0:
            raise EmptyFileError(
                f"{f.path.name}: the file is empty (0 bytes)",
                advice="the data service cannot read an empty spreadsheet; write data into it "
                "or remove it",
            )
        _check_still_newest(work)
        limits = await self.limits()
        if f.size > limits.max_file_bytes:
            raise FileProblem(
                f"{f.path.name}: {f.size} bytes is above the data service's file size limit of "
                f"{limits.max_file_bytes} bytes (fileSizeLimit of GET /rateLimits); not sent",
                advice="split the spreadsheet or trim it below the limit",
            )
        if not limits.offers(adapter):
            raise FileProblem(
                f"{f.path.name}: this data service account does not offer the {adapter} adapter "
                f"(adapterTypes: {', '.join(limits.adapter_types)})",
                advice="upgrade the plan, or map the extension to another adapter",
            )
        ext = f.path.suffix.lstrip(".")
        job = work.job
        plan = _Plan(
            adapter=adapter,
            name=source_name(job.remote_name, job.upload_key, ext) if ext else job.remote_name,
            marker=marker(job.upload_key),
            predecessor_markers=tuple(sorted(marker(k) for k in work.predecessor_keys)),
            properties=self._properties(work, adapter),
            data_set=self._data_set_spec(job.identity.rel),
        )
        return await _Delivery(self, work, plan).run()

    # ---- poll / check -----------------------------------------------------------------

    async def poll(self, jobs: Sequence[Job]) -> list[ImportUpdate]:
        """Nothing is imported after delivery: a job still waiting here is simply done.

        (Only after a crash between "uploaded" and "done" does a data-service job reach the
        poller.)
        """
        return [
            ImportUpdate(j.id, "DELIVERED", None, None, terminal=True, failed=False)
            for j in jobs
            if j.target == KIND
        ]

    async def check(self, destinations: Sequence[int | str] = ()) -> list[CheckLine]:
        """The credentials and version header (``GET /rateLimits``), adapters and data sets."""
        base = self.client.base_url
        try:
            limits = await self.limits(refresh=True, patient=False)
        except InboxdError as exc:
            return [CheckLine(False, f"reach {base}/rateLimits with OAuth 1.0: {exc}")]
        account = f", {limits.account_rate:g} calls/min for the account" * bool(limits.account_rate)
        lines = [
            CheckLine(
                True,
                f"reach {base}/rateLimits, OAuth 1.0 accepted: {limits.user_api_call_rate:g} "
                f"calls/min{account}, files up to {limits.max_file_bytes} bytes, a data source "
                f"overwritten at most every {limits.refresh_interval:g} s, adapters "
                f"{', '.join(limits.adapter_types) or '(not listed)'}",
            )
        ]
        for ext, adapter in sorted(self.settings.adapters.items()):
            if not limits.offers(adapter):
                lines.append(
                    CheckLine(
                        False, f".{ext} files: the account does not offer the {adapter} adapter"
                    )
                )
        specs = [
            _DataSetSpec(r.data_set, {}, f"the [[routes]] entry with glob {r.glob!r}")
            for r in self.routes
            if r.data_set is not None
        ]
        if self.settings.data_set is not None:
            specs.insert(0, _DataSetSpec(self.settings.data_set, {}, "[data_service] data_set"))
        for spec in specs:
            lines.append(await self._check_data_set(spec))
        return lines

    async def _check_data_set(self, spec: _DataSetSpec) -> CheckLine:
        """Whether a configured data set can be reached (a name may be missing: made later)."""
        try:
            if spec.is_link:
                data_set = await self.client.data_set(spec.ref)
                return CheckLine(True, f"data set {data_set.get('name')!r} ({spec.ref})")
            found = await self._find_data_set(spec.ref)
        except InboxdError as exc:
            return CheckLine(False, f"data set {spec.ref!r} of {spec.source}: {exc}")
        if found is None:
            return CheckLine(True, f"data set {spec.ref!r}: none yet, made with the first file")
        return CheckLine(True, f"data set {spec.ref!r} ({found.uri})")


def _strings(values: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as property strings (keys without a value are left out)."""
    out = {}
    for key, value in values.items():
        text = property_value(value)
        if text is not None and str(key).strip():
            out[str(key)] = text
    return out


def _check_still_newest(work: Work) -> None:
    """The file must still be this version; a version that waited for the refresh interval
    and was overtaken by a newer one is superseded with that reason."""
    f = work.file
    try:
        f.check_unchanged()
    except FileChangedError as exc:
        if work.job.error_kind == NotYetError.kind and f.path.exists():
            raise FileChangedError(
                f"{f.path.name}: a newer version arrived while this one waited for the data "
                "service's refresh interval; only the newest version is sent",
                advice="nothing to do: changes faster than the service allows are coalesced",
            ) from exc
        raise


class _Delivery:
    """One file's way to its data source; see the table in the module docstring."""

    def __init__(self, target: DataServiceTarget, work: Work, plan: _Plan) -> None:
        self.target = target
        self.client = target.client
        self.work = work
        self.plan = plan
        self.state = replace(work.resume, parts_done=set())
        self.sent = 0
        self.recovered = False
        #: ids of data sources an overwrite found deleted (not tried twice in one delivery)
        self.gone: set[int] = set()
        self.log = _log.bind(source_name=plan.name)
        #: the digest of the file as last sent (``daemon.delivery.content``), once it was
        self.digest: bytes | None = None

    async def _save(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        await self.work.journal.save(self.state)

    async def run(self) -> Delivered:
        state = self.state
        previous = self.work.previous_refs or {}
        if state.stage == Stage.COMPLETING and state.dataset_id is not None:
            source = await self._read_source(state.dataset_id)
            if source is not None:
                # Made by this job (its name was journaled with the marker), else overwritten.
                made = self.plan.marker in (state.dataset_name or "")
                self.recovered = made
                return await self._finish(source, "created" if made else "overwritten")
            self.log.warning("data_source.vanished", data_source_id=state.dataset_id)
        elif state.stage == Stage.UPLOADING and state.dataset_id is not None:
            link = self.client.link("dataSources", state.dataset_id)
            overwritten = await self._overwrite(link, _written_at(previous, state.dataset_id))
            if overwritten is not None:
                return overwritten
        last = previous.get("data_source")
        if isinstance(last, str) and last:
            # The last delivered version's data source: keep it current.
            written = previous.get("written_at")
            overwritten = await self._overwrite(last, _number(written))
            if overwritten is not None:
                return overwritten
        may_exist = self._may_have_created()
        if may_exist or self.plan.predecessor_markers:
            # This job (in an earlier try) or an unfinished earlier version of the file may
            # have made a data source already: look before making one.
            found = await self._find((self.plan.marker, *self.plan.predecessor_markers))
            own = found.get(self.plan.marker)
            if own is not None:
                return await self._recovered(own)
            for earlier in (found[m] for m in self.plan.predecessor_markers if m in found):
                self.log.info("data_source.predecessor", data_source=earlier.uri)
                overwritten = await self._overwrite(earlier.uri, earlier.modified_at)
                if overwritten is not None:
                    return overwritten
        return await self._create()

    async def _recovered(self, source: DataSourceInfo) -> Delivered:
        """Take over the data source an earlier try of this job made (its answer was lost)."""
        self.log.info("data_source.recovered", data_source=source.uri, pending=source.pending)
        self.recovered = True
        await self._save(stage=Stage.COMPLETING, dataset_id=source.id, dataset_name=self.plan.name)
        return await self._finish(source, "created")

    def _may_have_created(self) -> bool:
        """Did an earlier try of *this* job get as far as sending the create request?"""
        return self.state.stage == Stage.CREATING or self.plan.marker in (
            self.state.dataset_name or ""
        )

    def _slice(self) -> FileSlice:
        f = self.work.file
        opts = self.target.options
        return FileSlice(
            f.path,
            0,
            f.size,
            inode=f.inode,
            min_size=f.size,
            throttle=opts.throttle,
            chunk_size=opts.chunk_size,
            on_digest=self._digested,
        )

    def _digested(self, digest: bytes) -> None:
        self.digest = digest

    async def _send_file(
        self, *, data_source: str | None = None, permission_type: str | None = None
    ) -> DataSourceInfo:
        """One adapter request with the file; progress is taken back when it fails."""
        sent = 0

        def add(n: int) -> None:
            nonlocal sent
            sent += n
            self.work.progress(n)

        try:
            source = await self.client.upload(
                self.plan.adapter,
                self._slice(),
                filename=self.plan.name,
                data_source=data_source,
                permission_type=permission_type,
                progress=add,
            )
        except BaseException:
            if sent:
                self.work.progress(-sent)
            raise
        self.sent += sent
        return source

    async def _find(self, markers: Sequence[str]) -> dict[str, DataSourceInfo]:
        """Marker → the first data source whose name holds it.

        ``GET /dataSources`` (paged) until every marker is found or the list ends. It hides
        pending data sources (an import still running, perhaps the one whose answer was
        lost), so for markers still missing the data sources that own collections but were
        not listed are read one by one (``GET /collections``, then ``GET /dataSources/{id}``).
        """
        wanted = set(markers)
        found: dict[str, DataSourceInfo] = {}
        listed: set[int] = set()

        def match(source: DataSourceInfo) -> None:
            for m in markers:
                if m in source.name and m not in found:
                    found[m] = source

        url: str | None = None
        for _ in range(MAX_PAGES):
            sources, url = await self.target._retry(
                functools.partial(self.client.data_sources_page, url), "list data sources"
            )
            for source in sources:
                listed.add(source.id)
                match(source)
            if len(found) == len(wanted):
                return found
            if not url:
                break
        else:
            raise ProtocolError("GET /dataSources: too many pages", endpoint="GET /dataSources")
        for source_id in await self._unlisted_sources(listed):
            unlisted = await self._read_source(source_id)
            if unlisted is not None:
                match(unlisted)
                if len(found) == len(wanted):
                    break
        return found

    async def _read_source(self, source_id: int) -> DataSourceInfo | None:
        """``GET /dataSources/{id}`` with retries; None when there is no such data source."""
        return await self.target._retry(
            lambda: self.client.data_source(source_id), "read data source"
        )

    async def _unlisted_sources(self, listed: set[int]) -> list[int]:
        """Ids of data sources that own collections but ``GET /dataSources`` did not list."""
        out: list[int] = []
        url: str | None = None
        for _ in range(MAX_PAGES):
            collections, url = await self.target._retry(
                functools.partial(self.client.collections_page, url), "list collections"
            )
            for collection in collections:
                source_id = link_id(collection.data_source or "", "dataSources")
                if source_id is not None and source_id not in listed:
                    listed.add(source_id)
                    out.append(source_id)
            if not url:
                return out
        raise ProtocolError("GET /collections: too many pages", endpoint="GET /collections")

    # ---- overwrite --------------------------------------------------------------------

    async def _overwrite(self, link: str, written_at: float | None) -> Delivered | None:
        """``PUT /adapter/...?dataSource=<link>``; None when that data source is gone.

        Raises NotYetError when the data source was written less than the refresh interval
        ago: the job waits in the queue, holding no worker.
        """
        source_id = link_id(link, "dataSources")
        if source_id is None:
            self.log.warning("data_source.bad_link", link=link)
            return None
        if source_id in self.gone:
            return None
        wait = self.target.refresh_wait(source_id, written_at)
        if wait > 0:
            interval = self.target._limits.refresh_interval if self.target._limits else 0.0
            raise NotYetError(
                f"{self.work.file.path.name}: its data source was written less than "
                f"{interval:g} s ago, the data service's refresh interval; overwritten in "
                f"{wait:.0f} s (a newer version arriving meanwhile replaces this one)",
                delay=wait,
            )
        await self._save(stage=Stage.UPLOADING, dataset_id=source_id, mode=self.plan.adapter)
        try:
            source = await self.target._retry(
                lambda: self._send_file(data_source=link), "overwrite data source"
            )
        except NotFoundError:
            # Deleted on the service: the file gets a new data source.
            self.log.warning("data_source.gone", data_source=link)
            self.gone.add(source_id)
            await self._save(stage=Stage.NEW, dataset_id=None)
            return None
        except AuthError as exc:
            if exc.status == 403 and await self._credentials_work():
                raise UploadFailed(
                    f"the data source {link} (made from an earlier version of this file) "
                    "refuses the overwrite (403 Forbidden): give the inboxd user edit access "
                    "to it again, or delete it so that a new one is made",
                    cause_kind="forbidden",
                ) from exc
            raise
        self.target.wrote(source.id)
        await self._save(stage=Stage.COMPLETING, dataset_id=source.id)
        self.work.file.check_unchanged()
        self.log.info("data_source.overwritten", data_source=source.uri)
        return await self._finish(source, "overwritten")

    async def _credentials_work(self) -> bool:
        try:
            await self.target.limits(refresh=True)
        except AuthError:
            return False
        return True

    # ---- create -----------------------------------------------------------------------

    async def _create(self) -> Delivered:
        """``POST /adapter/...``; after an ambiguous failure, look for it before trying again."""
        policy = self.target.options.policy
        ambiguous = False  # run() has looked already
        attempt = 0
        while True:
            attempt += 1
            if ambiguous:
                own = (await self._find((self.plan.marker,))).get(self.plan.marker)
                if own is not None:
                    return await self._recovered(own)
                ambiguous = False
            await self._save(
                stage=Stage.CREATING,
                dataset_id=None,
                dataset_name=self.plan.name,
                mode=self.plan.adapter,
            )
            try:
                source = await self._send_file(permission_type=self.target.settings.permission_type)
            except InboxdError as exc:
                if not exc.retryable or attempt >= policy.attempts:
                    raise
                # Only a refusal before any work (429, or no connection at all) proves that
                # no data source was made; anything else may have landed.
                ambiguous = not _refused_before_work(exc)
                await retry.backoff(
                    policy,
                    attempt,
                    exc,
                    what="create data source",
                    on_retry=self.target.options.on_retry,
                )
                continue
            self.target.wrote(source.id)
            await self._save(stage=Stage.COMPLETING, dataset_id=source.id)
            self.log.info("data_source.created", data_source=source.uri)
            self.work.file.check_unchanged()
            return await self._finish(source, "created")

    # ---- finish -----------------------------------------------------------------------

    async def _finish(self, source: DataSourceInfo, action: str) -> Delivered:
        """Data set, grants (new data sources) and collection properties; every step is safe
        to repeat, so a restart in the middle simply does them again."""
        settings = self.target.settings
        try:
            source = await self._into_data_set(source)
            if settings.grants and action == "created":
                await self.target._retry(lambda: self._ensure_grants(source.uri), "add grants")
            names = await self._set_properties(source)
        except (NotFoundError, RejectedError) as exc:
            # A wrong data set link or grant: retrying cannot help, the reason must be seen.
            raise UploadFailed(
                f"data source {source.uri} was made but could not be set up: {exc.message} "
                "(check [data_service] data_set, grants and the metadata; `inboxd retry` "
                "finishes it)",
                cause_kind=exc.kind,
            ) from exc
        f = self.work.file
        known = {1: self.digest} if self.digest is not None else {}
        return replace(
            self._delivered(source, action, names),
            content_hash=await delivered_hash(f, f.size, known),
        )

    async def _into_data_set(self, source: DataSourceInfo) -> DataSourceInfo:
        """Move the data source into its data set (found or made by name) unless it is there."""
        spec = self.plan.data_set
        if spec is None:
            return source
        link = await self.target.data_set_link(spec)
        if source.data_set == link:
            return source
        try:
            return await self.target._retry(
                lambda: self.client.set_data_set(source, link), "add to data set"
            )
        except NotFoundError:
            if spec.is_link:
                raise
            # The data set known by that name was deleted meanwhile: find or make it again.
            link = await self.target.data_set_link(spec, fresh=True)
            return await self.target._retry(
                lambda: self.client.set_data_set(source, link), "add to data set"
            )

    async def _set_properties(self, source: DataSourceInfo) -> list[str]:
        """The plan's properties on the data source's collection(s); returns their names.

        Properties the last delivered version set and this one lacks are deleted, so the
        collection describes the file it now holds.
        """
        wanted = self.plan.properties
        before = (self.work.previous_refs or {}).get("properties")
        stale = sorted(str(n) for n in before or () if str(n) not in wanted and "," not in str(n))
        for link in source.collection_links:
            if wanted:
                await self.target._retry(
                    functools.partial(self.client.set_properties, link, "collections", wanted),
                    "set collection properties",
                )
            if stale:
                await self.target._retry(
                    functools.partial(self.client.delete_properties, link, "collections", stale),
                    "delete collection properties",
                )
        return sorted(wanted) if source.collection_links else []

    async def _ensure_grants(self, link: str) -> None:
        """Add the configured grants the data source lacks (listed again on every try)."""
        have = {
            (g.permission_type, g.identifier, g.role) for g in await self.client.source_grants(link)
        }
        for grant in self.target.settings.grants:
            if (grant.permission_type, grant.identifier, grant.role) not in have:
                await self.client.add_source_grant(link, grant)
                have.add((grant.permission_type, grant.identifier, grant.role))

    def _delivered(self, source: DataSourceInfo, action: str, properties: list[str]) -> Delivered:
        refs: dict[str, Any] = {
            "data_source": source.uri,
            "data_source_id": source.id,
            "collection": source.collections,
            "name": source.name,
            "adapter": self.plan.adapter,
            "action": action,
            # When the data source was last written: the next version waits for the refresh
            # interval from here, across restarts too.
            "written_at": self.target._written.get(source.id) or time.time(),
            "properties": properties,
        }
        if source.data_set:
            refs["data_set"] = source.data_set
        return Delivered(
            dataset_name=source.name or self.plan.name,
            dataset_id=source.id,
            bytes_sent=self.sent,
            mode=self.plan.adapter,
            refs=refs,
            needs_poll=False,
            recovered=self.recovered,
        )


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _written_at(refs: Mapping[str, Any], source_id: int) -> float | None:
    """When ``refs`` (the last delivered version's) say ``source_id`` was written."""
    return _number(refs.get("written_at")) if refs.get("data_source_id") == source_id else None


__all__ = ["KIND", "DataServiceTarget", "marker", "source_name"]
