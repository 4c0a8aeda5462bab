"""The spreadsheet data service target: CSV and Excel files become data sources.

Protocol (``data-service-api.txt``):

* every request is signed with **OAuth 1.0** (HMAC-SHA1, ``Authorization: OAuth ...``; the
  signature comes from authlib's ``ClientAuth``) and asks for API version 1 with
  ``Accept: application/json;v=1``;
* ``GET /rateLimits`` (cached for an hour) gives ``fileSizeLimit`` — bigger files are refused
  before anything is sent — ``userApiCallRate`` (requests per minute), which a client-side
  limiter shared by all workers keeps under, and ``adapterTypes``;
* a new file goes through its adapter (``[data_service] adapters``: ``.csv`` → CSV, ``.xlsx`` →
  Excel): ``POST /adapter/csv|excel[?permissionType=]`` with the file as multipart form data
  creates a data source named like the attached file. It is then put into ``data_set`` (``PATCH
  /dataSources/{id}``) and given the configured ``grants`` (``POST /sourceGrants``);
* a changed file overwrites the data source made from its last delivered version
  (``Work.previous_refs``): ``PUT /adapter/csv|excel?dataSource=<link>``, so a watched
  spreadsheet keeps one data source that stays current. If that data source was deleted on
  the service (404), a new one is made.

There is no import to follow: a delivered file is done (``needs_poll=False``).

Exactly one data source per file, whatever fails
------------------------------------------------

The adapters take no client-chosen id, but they name the data source after the attached file,
and the file name is ours to choose. So inboxd sends ``<name> [inboxd-<16 hex of the job's
upload key>].<ext>`` (``sales [inboxd-3f2a9c1b7d4e5f60].csv``): the marker is unique per job and
survives any path the service may strip. The journal records each step *before* it is taken
(stage and ``mode`` columns; ``dataset_id`` holds the data source id):

==========  =============================================================================
stage       a restart (or a retry after a lost answer) does
==========  =============================================================================
creating    the POST may have landed: list ``GET /dataSources`` for a name holding this
            job's marker; found → take it, not found → POST again. (A 429 or a connect
            failure proves nothing was done, so those retry without looking.)
completing  the data source exists: put it into the data set again (idempotent) and add
            only the grants ``GET /sourceGrants`` does not list yet
uploading   an overwrite (PUT) replaces the whole content, so it is simply sent again
==========  =============================================================================

The journaled name also survives ``inboxd retry`` and a worker's ingestion reset (which clear
the stage), so a job whose name already carries its marker always looks before it posts. A new
version of a file whose earlier version never finished (changed during delivery, failed) looks
for the data sources of those versions' markers (``Work.predecessor_keys``) and overwrites the
one it finds instead of making another.

Rate limits: a 429 makes every worker wait ``Retry-After`` (or ``[data_service]
rate_limit_wait`` seconds, 60 as the service advises, without one); the step is then retried
under the ``[retry]`` policy like any other retryable error.
"""

from __future__ import annotations

import functools
import math
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
import structlog
from authlib.oauth1 import ClientAuth  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from daemon import __version__, netio, retry
from daemon.bandwidth import RateLimiter
from daemon.client import (
    FileSlice,
    Progress,
    forget_cookies,
    multipart_file_body,
    send_request,
    tls_verify,
)
from daemon.config import ApiSettings, DataServiceGrant, DataServiceSettings
from daemon.errors import (
    AuthError,
    ConfigError,
    EmptyFileError,
    FileProblem,
    InboxdError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RejectedError,
    TransportError,
    UploadFailed,
)
from daemon.queue import Job
from daemon.targets import CheckLine, Delivered, ImportUpdate, Work
from daemon.upload import UploadOptions

_log = structlog.get_logger(__name__)
_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)

KIND = "data-service"
#: The version header the service requires on every request (API version 1, the only one).
ACCEPT = "application/json;v=1"
#: How long ``GET /rateLimits`` is trusted before it is asked again.
LIMITS_TTL = 3600.0
#: Share of ``userApiCallRate`` the limiter uses: headroom for clock jitter and other clients
#: of the same user.
CALL_RATE_SHARE = 0.9
#: The longest a 429 may hold every request back (a confused Retry-After cannot stall us).
MAX_HOLD = 300.0
#: Pages of ``GET /dataSources`` read at most when looking for a marker (a loop guard).
MAX_PAGES = 10_000
_MARKER_HEX = 16
_USER_AGENT = f"inboxd/{__version__}"

Adapter = Literal["csv", "excel"]
#: adapterTypes spellings (normalised: upper case, no spaces/underscores) per adapter
_ADAPTER_TYPES: dict[str, set[str]] = {"csv": {"CSV"}, "excel": {"EXCEL", "XLSX"}}


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


def _norm_type(text: str) -> str:
    return re.sub(r"[\s_]", "", text).upper()


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class RateLimits(_Model):
    """``GET /rateLimits``."""

    user_api_call_rate: float = Field(alias="userApiCallRate", ge=0)
    account_api_call_rate: float | None = Field(default=None, alias="accountApiCallRate")
    file_size_limit: float = Field(alias="fileSizeLimit", gt=0)
    adapter_types: list[str] = Field(default_factory=list, alias="adapterTypes")

    @property
    def max_file_bytes(self) -> int:
        """``fileSizeLimit`` in bytes.

        The document types it as a number and its table says "2 MB": a value below 1024 can
        only mean megabytes (MiB here), anything else is taken as bytes.
        """
        if self.file_size_limit < 1024:
            return int(self.file_size_limit * 1024 * 1024)
        return int(self.file_size_limit)

    def offers(self, adapter: str) -> bool:
        """Whether this account may use ``adapter`` (an empty list is read as "unknown": yes)."""
        if not self.adapter_types:
            return True
        return bool(_ADAPTER_TYPES[adapter] & {_norm_type(t) for t in self.adapter_types})


class DataSourceInfo(_Model):
    """The parts of a Data Source JSON Object that inboxd uses."""

    uri: str
    name: str = ""
    adapter_type: str | None = Field(default=None, alias="adapterType")
    collections: str | list[str] | None = None
    data_set: str | None = Field(default=None, alias="dataSet")
    pending: bool = False

    @property
    def id(self) -> int:
        """The number at the end of the DataSourceLink (checked when parsed)."""
        return _link_id(self.uri, "dataSources") or 0


class SourceGrantInfo(_Model):
    """The parts of a Source Grant JSON Object that inboxd compares."""

    permission_type: str = Field(alias="permissionType")
    identifier: str
    role: str


class _Page(_Model):
    data_sources: list[DataSourceInfo] = Field(alias="dataSources")
    next: str | None = None


def _link_id(link: str, kind: str) -> int | None:
    match = re.search(rf"/{kind}/(\d+)/?$", urlsplit(link).path)
    return int(match.group(1)) if match else None


def _parse(model: type[_M], data: Any, endpoint: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ProtocolError(
            f"unexpected answer ({where}: {first['msg']})", endpoint=endpoint
        ) from None


def _source(data: Any, endpoint: str) -> DataSourceInfo:
    source = _parse(DataSourceInfo, data, endpoint)
    if _link_id(source.uri, "dataSources") is None:
        raise ProtocolError(f"the data source link {source.uri!r} ends in no id", endpoint=endpoint)
    return source


# ---------------------------------------------------------------------------------------------
# Transport: OAuth 1.0 signing and the call-rate gate


class OAuth1Signer(httpx.Auth):
    """Signs each request (each retry anew: fresh nonce and timestamp) with OAuth 1.0 HMAC-SHA1.

    authlib's ``ClientAuth`` computes the ``Authorization`` header. Its httpx integration is
    not used: it reads (and for non-form bodies drops) the request body and refuses plain
    http, while our bodies are streamed files and the sandbox is http. The body is not part of
    an OAuth 1.0 signature unless it is form-encoded, which no request here is.
    """

    requires_request_body = False

    def __init__(
        self,
        consumer_key: str,
        consumer_secret: SecretStr,
        token: SecretStr,
        token_secret: SecretStr,
    ) -> None:
        self._auth = ClientAuth(
            consumer_key,
            consumer_secret.get_secret_value(),
            token=token.get_secret_value(),
            token_secret=token_secret.get_secret_value(),
        )

    def __repr__(self) -> str:
        return "OAuth1Signer(<credentials hidden>)"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Add the signed ``Authorization`` header; the body is left untouched."""
        _, headers, _ = self._auth.sign(request.method, str(request.url), {}, b"")
        request.headers["Authorization"] = headers["Authorization"]
        yield request


class CallGate:
    """Keeps all requests of the process under the service's call rate, and honours 429s.

    A :class:`~daemon.bandwidth.RateLimiter` spending one "byte" per call spaces requests by
    ``1 / rate`` (burst 1: never a bunch at once). After a 429 every request waits until the
    hold ends, not only the one that was refused.
    """

    def __init__(self) -> None:
        self._limiter: RateLimiter | None = None
        self._per_minute = 0.0
        self._hold_until = 0.0

    @property
    def per_minute(self) -> float:
        """The call rate enforced now (0: none known yet)."""
        return self._per_minute

    def set_rate(self, per_minute: float) -> None:
        """Use ``CALL_RATE_SHARE`` of ``per_minute`` from now on (0 or less: unlimited)."""
        if per_minute == self._per_minute:
            return
        self._per_minute = per_minute
        rate = per_minute * CALL_RATE_SHARE / 60.0
        self._limiter = RateLimiter(rate, burst=1) if rate > 0 else None
        if rate > 0:
            # The call that told us the rate went out unlimited: the next one waits its turn.
            self.hold(1.0 / rate)

    def hold(self, seconds: float) -> None:
        """Let no request out for ``seconds`` (the service said it is rate limiting us)."""
        until = anyio.current_time() + min(max(seconds, 0.0), MAX_HOLD)
        self._hold_until = max(self._hold_until, until)

    async def wait(self) -> None:
        """Return when one more request may go out."""
        while (delay := self._hold_until - anyio.current_time()) > 0:
            await anyio.sleep(delay)
        if self._limiter is not None:
            await self._limiter.consume(1)


class DataServiceClient:
    """One attempt per call to the data service; retries are the caller's (see the module doc)."""

    def __init__(
        self,
        url: str,
        signer: httpx.Auth,
        *,
        rate_limit_wait: float = 60.0,
        timeout: float = 30.0,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = url.rstrip("/")
        self.rate_limit_wait = rate_limit_wait
        self.gate = CallGate()
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            auth=signer,
            # Only the encodings send_request decodes itself (with its size cap), whatever
            # optional decoders (brotli, zstandard) happen to be installed.
            headers={
                "Accept": ACCEPT,
                "User-Agent": _USER_AGENT,
                "Accept-Encoding": "gzip, deflate",
            },
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )
        if transport is None:
            netio.adopt(self._http)
        forget_cookies(self._http)

    @classmethod
    def from_settings(cls, api: ApiSettings, ds: DataServiceSettings) -> DataServiceClient:
        """The client for ``[data_service]`` (credentials resolved here) and ``[api]``."""
        problems = ds.check_credentials()
        if problems:
            raise ConfigError(problems)
        signer = OAuth1Signer(
            ds.consumer_key.strip(),
            ds.secret("consumer_secret"),
            ds.secret("token"),
            ds.secret("token_secret"),
        )
        return cls(
            ds.url or api.url,
            signer,
            rate_limit_wait=ds.rate_limit_wait,
            timeout=api.timeout,
            verify=tls_verify(api.verify_tls, api.ca_file),
        )

    async def __aenter__(self) -> DataServiceClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            await self._http.aclose()

    def link(self, kind: str, ident: int) -> str:
        """A link of the URL directory, e.g. ``link("dataSources", 12)``."""
        return f"{self.base_url}/{kind}/{ident}"

    def _own(self, link: str, endpoint: str) -> str:
        """``link`` if it points into our service (signed requests go nowhere else)."""
        base, target = urlsplit(self.base_url), urlsplit(link)
        if not target.scheme and link.startswith("/"):
            return self.base_url + link
        same_server = (target.scheme, target.netloc.lower()) == (base.scheme, base.netloc.lower())
        if not same_server or not target.path.startswith(base.path):
            raise ProtocolError(f"the service linked elsewhere ({link!r})", endpoint=endpoint)
        return link

    async def _send(self, method: str, url: str, *, endpoint: str, **kwargs: Any) -> Any:
        await self.gate.wait()
        try:
            return await send_request(
                self._http,
                method,
                url,
                endpoint=endpoint,
                server=self.base_url,
                advice="check [data_service] url (or [api] url), the network and the service",
                **kwargs,
            )
        except RateLimitedError as exc:
            if exc.status == 429:
                if exc.retry_after is None:
                    exc.retry_after = self.rate_limit_wait
                self.gate.hold(exc.retry_after)
            raise
        except AuthError as exc:
            raise AuthError(
                exc.detail,
                status=exc.status,
                endpoint=exc.endpoint,
                advice=(
                    "the data service refused the OAuth 1.0 signature: check [data_service] "
                    "consumer_key, consumer_secret, token and token_secret (and the clock), "
                    "then run `inboxd check`"
                ),
            ) from exc

    async def rate_limits(self) -> RateLimits:
        """``GET /rateLimits``."""
        body = await self._send("GET", "/rateLimits", endpoint="GET /rateLimits")
        return _parse(RateLimits, body, "GET /rateLimits")

    async def upload(
        self,
        adapter: Adapter,
        source: FileSlice,
        *,
        filename: str,
        data_source: str | None = None,
        permission_type: str | None = None,
        progress: Progress | None = None,
    ) -> DataSourceInfo:
        """``POST /adapter/<adapter>`` (a new data source), or ``PUT`` over ``data_source``."""
        body, headers = multipart_file_body(source, filename=filename, progress=progress)
        method = "PUT" if data_source is not None else "POST"
        params: dict[str, str] = {}
        if data_source is not None:
            params["dataSource"] = data_source
        elif permission_type is not None:
            params["permissionType"] = permission_type
        ep = f"{method} /adapter/{adapter}"
        answer = await self._send(
            method, f"/adapter/{adapter}", endpoint=ep, params=params, content=body, headers=headers
        )
        return _source(answer, ep)

    async def data_source(self, source_id: int) -> DataSourceInfo | None:
        """``GET /dataSources/{id}``; None when the service has no such data source."""
        ep = "GET /dataSources/{id}"
        try:
            body = await self._send("GET", f"/dataSources/{source_id}", endpoint=ep)
        except NotFoundError:
            return None
        return _source(body, ep)

    async def data_sources_page(
        self, url: str | None = None
    ) -> tuple[list[DataSourceInfo], str | None]:
        """One page of ``GET /dataSources``: its data sources and the next page's link."""
        ep = "GET /dataSources"
        target = self._own(url, ep) if url is not None else "/dataSources"
        page = _parse(_Page, await self._send("GET", target, endpoint=ep), ep)
        return page.data_sources, page.next

    async def set_data_set(self, source: DataSourceInfo, data_set: str) -> DataSourceInfo:
        """``PATCH /dataSources/{id}`` moving the data source into ``data_set``."""
        ep = "PATCH /dataSources/{id}"
        body = await self._send(
            "PATCH",
            f"/dataSources/{source.id}",
            endpoint=ep,
            json={"uri": source.uri, "name": source.name, "dataSet": data_set},
        )
        return _source(body, ep)

    async def source_grants(self, data_source: str) -> list[SourceGrantInfo]:
        """``GET /sourceGrants?dataSource=<link>``."""
        ep = "GET /sourceGrants"
        body = await self._send(
            "GET", "/sourceGrants", endpoint=ep, params={"dataSource": data_source}
        )
        if not isinstance(body, list):
            raise ProtocolError("the answer is not a list of source grants", endpoint=ep)
        return [_parse(SourceGrantInfo, item, ep) for item in body]

    async def add_source_grant(self, data_source: str, grant: DataServiceGrant) -> None:
        """``POST /sourceGrants``."""
        payload = {
            "dataSource": data_source,
            "permissionType": grant.permission_type,
            "identifier": grant.identifier,
            "role": grant.role,
        }
        await self._send("POST", "/sourceGrants", endpoint="POST /sourceGrants", json=payload)

    async def data_set(self, link: str) -> dict[str, Any]:
        """``GET`` a DataSetLink (it must point into this service)."""
        ep = "GET /dataSets/{id}"
        body = await self._send("GET", self._own(link, ep), endpoint=ep)
        if not isinstance(body, dict):
            raise ProtocolError("the answer is not a data set", endpoint=ep)
        return body


# ---------------------------------------------------------------------------------------------
# The target


@dataclass(frozen=True)
class _Plan:
    """What one delivery decided before its first request."""

    adapter: Adapter
    name: str  # the data source name (the attached file's name), with the job's marker
    marker: str
    predecessor_markers: tuple[str, ...]


class DataServiceTarget:
    """Delivers CSV and Excel files as data sources of the spreadsheet data service."""

    kind = KIND

    def __init__(
        self, client: DataServiceClient, options: UploadOptions, settings: DataServiceSettings
    ) -> None:
        self.client = client
        self.options = options
        self.settings = settings
        self._limits: RateLimits | None = None
        self._limits_at = -math.inf
        self._limits_lock = anyio.Lock()

    @classmethod
    @asynccontextmanager
    async def open(
        cls, api: ApiSettings, settings: DataServiceSettings, options: UploadOptions
    ) -> AsyncIterator[DataServiceTarget]:
        """The target with its own client; the connections close when the block ends."""
        async with DataServiceClient.from_settings(api, settings) as client:
            yield cls(client, options, settings)

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
                self.client.gate.set_rate(self._limits.user_api_call_rate)
                _log.info(
                    "data_service.limits",
                    user_api_call_rate=self._limits.user_api_call_rate,
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
        f.check_unchanged()
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
            name=source_name(job.dataset_name, job.upload_key, ext) if ext else job.dataset_name,
            marker=marker(job.upload_key),
            predecessor_markers=tuple(sorted(marker(k) for k in work.predecessor_keys)),
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
        """The credentials and version header (``GET /rateLimits``), adapters and data set."""
        base = self.client.base_url
        try:
            limits = await self.limits(refresh=True, patient=False)
        except InboxdError as exc:
            return [CheckLine(False, f"reach {base}/rateLimits with OAuth 1.0: {exc}")]
        lines = [
            CheckLine(
                True,
                f"reach {base}/rateLimits, OAuth 1.0 accepted: {limits.user_api_call_rate:g} "
                f"calls/min, files up to {limits.max_file_bytes} bytes, adapters "
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
        if self.settings.data_set:
            link = self.settings.data_set
            try:
                data_set = await self.client.data_set(link)
            except InboxdError as exc:
                lines.append(CheckLine(False, f"data_service.data_set {link!r}: {exc}"))
            else:
                lines.append(CheckLine(True, f"data set {data_set.get('name')!r} ({link})"))
        return lines


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

    async def _save(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        await self.work.journal.save(self.state)

    async def run(self) -> Delivered:
        state = self.state
        if state.stage == "completing" and state.dataset_id is not None:
            source = await self.target._retry(
                lambda: self.client.data_source(state.dataset_id or 0), "read data source"
            )
            if source is not None:
                self.recovered = True
                return await self._finish_new(source)
            self.log.warning("data_source.vanished", data_source_id=state.dataset_id)
        elif state.stage == "uploading" and state.dataset_id is not None:
            overwritten = await self._overwrite(self.client.link("dataSources", state.dataset_id))
            if overwritten is not None:
                return overwritten
        previous = (self.work.previous_refs or {}).get("data_source")
        if isinstance(previous, str) and previous:
            # The last delivered version's data source: keep it current.
            overwritten = await self._overwrite(previous)
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
                overwritten = await self._overwrite(earlier.uri)
                if overwritten is not None:
                    return overwritten
        return await self._create()

    async def _recovered(self, source: DataSourceInfo) -> Delivered:
        """Take over the data source an earlier try of this job made (its answer was lost)."""
        self.log.info("data_source.recovered", data_source=source.uri)
        self.recovered = True
        await self._save(stage="completing", dataset_id=source.id)
        return await self._finish_new(source)

    def _may_have_created(self) -> bool:
        """Did an earlier try of *this* job get as far as sending the create request?"""
        return self.state.stage == "creating" or self.plan.marker in (self.state.dataset_name or "")

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
        )

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
        """Marker → the first data source whose name holds it (``GET /dataSources``, paged).

        Reads pages until every marker is found or the list ends.
        """
        found: dict[str, DataSourceInfo] = {}
        url: str | None = None
        for _ in range(MAX_PAGES):
            sources, url = await self.target._retry(
                functools.partial(self.client.data_sources_page, url),
                "list data sources",
            )
            for source in sources:
                for m in markers:
                    if m in source.name and m not in found:
                        found[m] = source
            if not url or len(found) == len(set(markers)):
                return found
        raise ProtocolError("GET /dataSources: too many pages", endpoint="GET /dataSources")

    # ---- overwrite --------------------------------------------------------------------

    async def _overwrite(self, link: str) -> Delivered | None:
        """``PUT /adapter/...?dataSource=<link>``; None when that data source is gone."""
        source_id = _link_id(link, "dataSources")
        if source_id is None:
            self.log.warning("data_source.bad_link", link=link)
            return None
        if source_id in self.gone:
            return None
        await self._save(stage="uploading", dataset_id=source_id, mode=self.plan.adapter)
        try:
            source = await self.target._retry(
                lambda: self._send_file(data_source=link), "overwrite data source"
            )
        except NotFoundError:
            # Deleted on the service: the file gets a new data source.
            self.log.warning("data_source.gone", data_source=link)
            self.gone.add(source_id)
            await self._save(stage="new", dataset_id=None)
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
        self.work.file.check_unchanged()
        self.log.info("data_source.overwritten", data_source=source.uri)
        return self._delivered(source, "overwritten")

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
                stage="creating",
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
                refused = isinstance(exc, RateLimitedError) and exc.status == 429
                unsent = isinstance(exc, TransportError) and not exc.maybe_sent
                ambiguous = not (refused or unsent)
                await retry.backoff(
                    policy,
                    attempt,
                    exc,
                    what="create data source",
                    on_retry=self.target.options.on_retry,
                )
                continue
            await self._save(stage="completing", dataset_id=source.id)
            self.log.info("data_source.created", data_source=source.uri)
            self.work.file.check_unchanged()
            return await self._finish_new(source)

    async def _finish_new(self, source: DataSourceInfo) -> Delivered:
        """Put a new data source into the data set and give it the configured grants."""
        settings = self.target.settings
        data_set = settings.data_set
        try:
            if data_set and source.data_set != data_set:
                current = source
                source = await self.target._retry(
                    lambda: self.client.set_data_set(current, data_set), "add to data set"
                )
            if settings.grants:
                await self.target._retry(lambda: self._ensure_grants(source.uri), "add grants")
        except (NotFoundError, RejectedError) as exc:
            # A wrong data set link or grant: retrying cannot help, the reason must be seen.
            raise UploadFailed(
                f"data source {source.uri} was made but could not be set up: {exc.message} "
                "(check [data_service] data_set and grants; `inboxd retry` finishes it)",
                cause_kind=exc.kind,
            ) from exc
        return self._delivered(source, "created")

    async def _ensure_grants(self, link: str) -> None:
        """Add the configured grants the data source lacks (listed again on every try)."""
        have = {
            (g.permission_type, g.identifier, g.role) for g in await self.client.source_grants(link)
        }
        for grant in self.target.settings.grants:
            if (grant.permission_type, grant.identifier, grant.role) not in have:
                await self.client.add_source_grant(link, grant)
                have.add((grant.permission_type, grant.identifier, grant.role))

    def _delivered(self, source: DataSourceInfo, action: str) -> Delivered:
        refs: dict[str, Any] = {
            "data_source": source.uri,
            "data_source_id": source.id,
            "collection": source.collections,
            "name": source.name,
            "adapter": self.plan.adapter,
            "action": action,
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


__all__ = [
    "ACCEPT",
    "CallGate",
    "DataServiceClient",
    "DataServiceTarget",
    "DataSourceInfo",
    "OAuth1Signer",
    "RateLimits",
    "marker",
    "source_name",
]
