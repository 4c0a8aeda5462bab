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
(stage and ``mode`` columns; ``dataset_id`` holds the data source id):

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
"""

from __future__ import annotations

import functools
import math
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
import structlog
from authlib.oauth1 import ClientAuth  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from daemon import retry
from daemon.compat import UTC, fromisoformat
from daemon.config import ApiSettings, DataServiceGrant, DataServiceSettings, RouteSettings
from daemon.delivery import CheckLine, Delivered, ImportUpdate, Work
from daemon.delivery.files import FileSlice, Progress, multipart_file_body
from daemon.delivery.flow import UploadOptions, delivered_hash
from daemon.errors import (
    AuthError,
    ConfigError,
    EmptyFileError,
    FileChangedError,
    FileProblem,
    InboxdError,
    LockedError,
    NotFoundError,
    NotYetError,
    ProtocolError,
    RateLimitedError,
    RejectedError,
    TransportError,
    UploadFailed,
)
from daemon.intake.routing import first_route
from daemon.net.answers import send_request
from daemon.net.bandwidth import RateLimiter
from daemon.net.clients import ACCEPT_ENCODING, USER_AGENT, build_client, tls_verify
from daemon.state import Job, Stage

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
    #: requests per minute for the whole account; 0 (the table's value for every plan) or
    #: absent = no account-wide limit
    account_api_call_rate: float | None = Field(default=None, alias="accountApiCallRate")
    file_size_limit: float = Field(alias="fileSizeLimit", gt=0)
    adapter_types: list[str] = Field(default_factory=list, alias="adapterTypes")
    #: seconds between two refreshes of one data source ("N/A" on the free plan: null)
    hard_refresh_interval: float | None = Field(default=None, alias="userHardRefreshInterval")
    soft_refresh_interval: float | None = Field(default=None, alias="userSoftRefreshInterval")

    @property
    def max_file_bytes(self) -> int:
        """``fileSizeLimit`` in bytes.

        The document types it as a number and its table says "2 MB": a value below 1024 can
        only mean megabytes — decimal ones, as the table writes "MB" (2 MB = 2,000,000 bytes,
        not 2 MiB) — anything else is taken as bytes.
        """
        if self.file_size_limit < 1024:
            return int(self.file_size_limit * 1_000_000)
        return int(self.file_size_limit)

    @property
    def refresh_interval(self) -> float:
        """Seconds to keep between two writes of one data source: the larger interval."""
        values = (self.hard_refresh_interval, self.soft_refresh_interval)
        return max([v for v in values if v is not None and math.isfinite(v)] + [0.0])

    @property
    def account_rate(self) -> float:
        """The account-wide requests per minute (0: none)."""
        rate = self.account_api_call_rate
        return rate if rate is not None and math.isfinite(rate) and rate > 0 else 0.0

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
    last_modified: str | None = Field(default=None, alias="lastModified")

    @property
    def id(self) -> int:
        """The number at the end of the DataSourceLink (checked when parsed)."""
        return _link_id(self.uri, "dataSources") or 0

    @property
    def collection_links(self) -> list[str]:
        """The collection link(s) the data source names."""
        if isinstance(self.collections, str):
            return [self.collections] if self.collections else []
        return [c for c in self.collections or [] if c]

    @property
    def modified_at(self) -> float | None:
        """``lastModified`` as UNIX seconds, None when absent or unreadable."""
        return _epoch(self.last_modified)


class CollectionInfo(_Model):
    """The parts of a Collection JSON Object that inboxd uses."""

    uri: str
    data_source: str | None = Field(default=None, alias="dataSource")


class DataSetInfo(_Model):
    """The parts of a Data Set JSON Object that inboxd uses."""

    uri: str
    name: str = ""


class SourceGrantInfo(_Model):
    """The parts of a Source Grant JSON Object that inboxd compares."""

    permission_type: str = Field(alias="permissionType")
    identifier: str
    role: str


class _Page(_Model):
    data_sources: list[DataSourceInfo] = Field(alias="dataSources")
    next: str | None = None


class _CollectionPage(_Model):
    collections: list[CollectionInfo]
    next: str | None = None


class _DataSetPage(_Model):
    data_sets: list[DataSetInfo] = Field(alias="dataSets")
    next: str | None = None


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        when = fromisoformat(text)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _property_value(value: Any) -> str | None:
    """A metadata value as the string a property holds (None: no value, not sent)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _refused_before_work(exc: InboxdError) -> bool:
    """Whether ``exc`` proves the request did nothing (a 429, or no connection at all)."""
    refused = isinstance(exc, RateLimitedError)  # a 429; a 5xx may have done the work
    return refused or (isinstance(exc, TransportError) and not exc.maybe_sent)


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
    """Keeps all requests of the process under the service's call rates, and honours 429s.

    One :class:`~daemon.net.bandwidth.RateLimiter` per rate (the user's and, when the service sets
    one, the account's), each spending one "byte" per call, spaces requests by ``1 / rate``
    (burst 1: never a bunch at once); a request goes out when both allow it. After a 429 every
    request waits until the hold ends, not only the one that was refused.
    """

    def __init__(self) -> None:
        self._limiters: dict[str, RateLimiter] = {}
        self._rates: dict[str, float] = {"user": 0.0, "account": 0.0}
        self._hold_until = 0.0

    @property
    def per_minute(self) -> float:
        """The call rate enforced now: the lower of the two (0: none known yet)."""
        rates = [r for r in self._rates.values() if r > 0]
        return min(rates) if rates else 0.0

    def set_rate(self, per_minute: float, account_per_minute: float = 0.0) -> None:
        """Use ``CALL_RATE_SHARE`` of each rate from now on (0 or less: no such limit)."""
        for name, value in (("user", per_minute), ("account", account_per_minute)):
            if value == self._rates[name]:
                continue
            self._rates[name] = value
            rate = value * CALL_RATE_SHARE / 60.0
            if rate > 0:
                self._limiters[name] = RateLimiter(rate, burst=1)
                # The call that told us the rate went out unlimited: the next one waits.
                self.hold(1.0 / rate)
            else:
                self._limiters.pop(name, None)

    def hold(self, seconds: float) -> None:
        """Let no request out for ``seconds`` (the service said it is rate limiting us)."""
        until = anyio.current_time() + min(max(seconds, 0.0), MAX_HOLD)
        self._hold_until = max(self._hold_until, until)

    async def wait(self) -> None:
        """Return when one more request may go out."""
        while (delay := self._hold_until - anyio.current_time()) > 0:
            await anyio.sleep(delay)
        for limiter in list(self._limiters.values()):
            await limiter.consume(1)


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
        self._http = build_client(
            base_url=self.base_url,
            auth=signer,
            # Only the encodings send_request decodes itself (with its size cap), whatever
            # optional decoders (brotli, zstandard) happen to be installed.
            headers={
                "Accept": ACCEPT,
                "User-Agent": USER_AGENT,
                "Accept-Encoding": ACCEPT_ENCODING,
            },
            timeout=timeout,
            verify=verify,
            transport=transport,
        )

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
            # A 429 only: a 5xx (ServerError, a sibling) is no request to slow down.
            if exc.retry_after is None:
                exc.retry_after = self.rate_limit_wait
            self.gate.hold(exc.retry_after)
            raise
        except RejectedError as exc:
            if exc.status == 423:
                # A collection being refreshed: nothing was done, the same request may follow.
                raise LockedError(
                    exc.detail,
                    status=423,
                    endpoint=exc.endpoint,
                    advice="the collection is being refreshed on the service; inboxd waits "
                    "and tries again",
                ) from exc
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

    async def collections_page(
        self, url: str | None = None
    ) -> tuple[list[CollectionInfo], str | None]:
        """One page of ``GET /collections`` (pending data sources' collections included)."""
        ep = "GET /collections"
        target = self._own(url, ep) if url is not None else "/collections"
        page = _parse(_CollectionPage, await self._send("GET", target, endpoint=ep), ep)
        return page.collections, page.next

    async def data_sets_page(self, url: str | None = None) -> tuple[list[DataSetInfo], str | None]:
        """One page of ``GET /dataSets``: its data sets and the next page's link."""
        ep = "GET /dataSets"
        target = self._own(url, ep) if url is not None else "/dataSets"
        page = _parse(_DataSetPage, await self._send("GET", target, endpoint=ep), ep)
        return page.data_sets, page.next

    async def create_data_set(self, name: str, properties: Mapping[str, str]) -> DataSetInfo:
        """``POST /dataSets {"name", "properties"}``."""
        ep = "POST /dataSets"
        body = await self._send(
            "POST", "/dataSets", endpoint=ep, json={"name": name, "properties": dict(properties)}
        )
        data_set = _parse(DataSetInfo, body, ep)
        if _link_id(data_set.uri, "dataSets") is None:
            raise ProtocolError(f"the data set link {data_set.uri!r} ends in no id", endpoint=ep)
        return data_set

    async def properties(self, link: str, kind: str) -> dict[str, str]:
        """``GET <link>/properties`` of a collection or data set (``kind`` names it)."""
        ep = f"GET /{kind}/{{id}}/properties"
        body = await self._send("GET", self._own(link, ep) + "/properties", endpoint=ep)
        if not isinstance(body, dict):
            raise ProtocolError("the answer is not a property object", endpoint=ep)
        return {str(k): str(v) for k, v in body.items()}

    async def set_properties(self, link: str, kind: str, values: Mapping[str, str]) -> None:
        """``PATCH <link>/properties``: add or change these properties, keep the others."""
        ep = f"PATCH /{kind}/{{id}}/properties"
        await self._send("PATCH", self._own(link, ep) + "/properties", endpoint=ep, json=values)

    async def delete_properties(self, link: str, kind: str, names: Sequence[str]) -> None:
        """``DELETE <link>/properties?properties=a,b``."""
        ep = f"DELETE /{kind}/{{id}}/properties"
        await self._send(
            "DELETE",
            self._own(link, ep) + "/properties",
            endpoint=ep,
            params={"properties": ",".join(names)},
        )


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
            name=source_name(job.dataset_name, job.upload_key, ext) if ext else job.dataset_name,
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
        text = _property_value(value)
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
                source_id = _link_id(collection.data_source or "", "dataSources")
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
        source_id = _link_id(link, "dataSources")
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
