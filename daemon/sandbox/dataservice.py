"""A strict local spreadsheet data service (``data-service-api.txt``) under ``/data-service``.

The main sandbox hands every request below :data:`PREFIX` to :class:`DataService`, which is an
ASGI app of its own with the service's rules:

* **OAuth 1.0** (RFC 5849, HMAC-SHA1, ``Authorization: OAuth ...`` header) verified by hand:
  the signature over the base string of method, URL and parameters, the consumer key and the
  token, a timestamp within ``timestamp_skew`` seconds and a nonce never seen before. Any
  failure answers 401. Form-encoded bodies are not part of the signature because no endpoint
  here takes one.
* **Versioning**: ``Accept: application/json;v=1`` on every request, else 406.
* **Rate limits**: at most ``user_api_call_rate`` requests per minute per token, and (when not
  0, which the document's table gives for every plan and which is read as "no account limit")
  ``account_api_call_rate`` per minute for all tokens of the account together, each counted
  over a sliding ``rate_window`` (which tests shorten) — past either, 429 with
  ``Retry-After``. ``GET /rateLimits`` reports the limits. A file above ``file_size_limit``
  gets 413: the table says "2 MB", taken as decimal megabytes (2,000,000 bytes).
* **Refresh intervals**: an overwrite of a data source less than
  ``user_hard_refresh_interval`` seconds after its last adapter write (create or overwrite) is
  refused with 429 and ``Retry-After``. The soft interval is reported, not enforced (it is the
  pace clients are asked to keep; inboxd keeps the larger of the two).
* **Adapters**: ``POST /adapter/csv|excel`` (multipart form data with one file; optional
  ``permissionType``) creates a data source named like the attached file, with one collection
  per CSV file or per Excel tab; ``PUT /adapter/csv|excel?dataSource=<link>`` overwrites one,
  keeping its id and (for matching tabs) its collection ids. An import takes
  ``import_seconds``: meanwhile a new data source is ``pending`` (hidden from
  ``GET /dataSources``, as the document says, but readable by id and through its collections)
  and the collections being written are locked.
* **423 Locked**: a collection being refreshed (an import in progress, or :meth:`refresh`
  called by a test, as when the web app refreshes it) refuses overwrites, property changes
  and item reads with 423 until the refresh ends; ``syncStarted`` shows it.
* **Properties**: ``/collections/{id}/properties`` and ``/dataSets/{id}/properties`` (GET,
  PATCH, DELETE ``?properties=a,b``), string values only. A collection's ``headerRow`` (a row
  number) names its columns: ``/schema`` and ``/items`` then use that row's cells as field
  names and list the rows after it; without it the columns are A, B, C, ….
* ``/dataSources``, ``/sourceGrants``, ``/dataSets`` (+ ``POST``, ``PATCH``, ``DELETE``),
  ``/collections`` (all, or one, + ``/items``, ``/schema``) with the JSON objects and pagination
  (``start``/``end``, ``prev``/``next``) the document describes.

Faults are the main sandbox's :class:`~daemon.sandbox.config.Faults` (503/429 rates,
``drop_response_rate``, ``fail_next`` keyed by e.g. ``"POST /adapter/csv"`` or
``"GET /dataSources"``); ``adapter_delay`` holds an adapter answer back after the work is done,
so a test can kill a client while it waits. Tests read ``data_sources``, ``data_sets`` and
``requests`` directly, and count the refusals in ``refused`` (e.g. ``refused["refresh"]``).

Why one module: the data service API's routes as one server, read against its seed document
route by route; the faults, route keys and answers shared with the other two APIs are in
common.py.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import html
import io
import itertools
import math
import re
import time
import zipfile
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from daemon.sandbox.common import (
    ERROR_HANDLERS,
    FaultGate,
    RouteKeys,
    SandboxError,
    read_json,
    recorded,
    route_key,
)
from daemon.sandbox.config import Faults, SandboxConfig
from daemon.sandbox.formdata import (
    FormDataError,
    FormDataParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_from_content_type,
)
from daemon.sandbox.injection import Control
from daemon.sandbox.models import RequestRecord, iso8601

_T = TypeVar("_T")

#: Where the main sandbox serves the data service.
PREFIX = "/data-service"
#: The only API version there is; every request must ask for it.
VERSION_MEDIA_TYPE = "application/json;v=1"
PERMISSION_TYPES = ("account", "project", "user")
ROLES = ("edit", "view")
#: Adapter path segment → adapterType of the data sources it makes.
ADAPTERS = {"csv": "CSV", "excel": "EXCEL"}
_REALM = "data-service-sandbox"


def url_of(origin: str) -> str:
    """The data service's base URL on a sandbox reachable at ``origin`` (``Sandbox.origin``)."""
    return origin.rstrip("/") + PREFIX


@dataclass
class DataServiceConfig:
    """The sandbox data service's account: credentials and limits. Mutable while it runs."""

    consumer_key: str = "sandbox-consumer"
    consumer_secret: str = "sandbox-consumer-secret"  # noqa: S105 - published fake credential
    token: str = "sandbox-oauth-token"  # noqa: S105 - published fake credential
    token_secret: str = "sandbox-oauth-token-secret"  # noqa: S105 - published fake credential
    #: requests per minute per user (GET /rateLimits userApiCallRate)
    user_api_call_rate: int = 200
    account_api_call_rate: int = 0
    #: the sliding window (seconds) the call rate is enforced over; allowed requests in it are
    #: ``user_api_call_rate * rate_window / 60`` (tests use 1 s to see the limit quickly)
    rate_window: float = 60.0
    #: bytes (GET /rateLimits fileSizeLimit; the document's table says 2 MB: decimal units)
    file_size_limit: int = 2_000_000
    adapter_types: list[str] = field(
        default_factory=lambda: ["CSV", "Excel", "Google Sheets", "BambooHR", "AWS"]
    )
    #: seconds between two adapter writes of one data source (an overwrite sooner is a 429)
    user_hard_refresh_interval: float = 60
    #: reported only (the pace clients should keep)
    user_soft_refresh_interval: float = 60
    #: how far an oauth_timestamp may be from the server's clock (seconds)
    timestamp_skew: float = 300.0
    #: most items a list endpoint returns at once
    page_size: int = 100
    #: seconds an adapter answer is held back after the data source was written
    adapter_delay: float = 0.0
    #: seconds an adapter import takes: a new data source stays ``pending`` and the collections
    #: written stay locked (423) that long; the answer comes when it is done
    import_seconds: float = 0.0
    #: the Marq ids the sandbox user's own grants name
    user_id: str = "1001"
    account_id: str = "2001"
    project_id: str = "3001"


@dataclass
class SourceGrant:
    """One source grant of a data source."""

    id: int
    data_source_id: int
    permission_type: str
    identifier: str
    role: str


@dataclass
class Collection:
    """One collection (a CSV file, an Excel tab): its rows are its items, columns A, B, …."""

    id: int
    data_source_id: int
    name: str
    rows: list[list[str]]
    created: float = field(default_factory=time.time)
    last_modified: float = field(default_factory=time.time)
    properties: dict[str, str] = field(default_factory=dict)
    #: wall-clock start of the refresh in progress (``syncStarted``), None when there is none
    sync_started: float | None = None
    #: monotonic time the refresh in progress ends
    sync_until: float = 0.0

    @property
    def column_count(self) -> int:
        """Width of the widest row."""
        return max((len(r) for r in self.rows), default=0)

    @property
    def locked(self) -> bool:
        """Whether a refresh is in progress (writes and item reads answer 423)."""
        if self.sync_started is not None and time.monotonic() >= self.sync_until:
            self.sync_started = None
        return self.sync_started is not None

    def lock(self, seconds: float) -> None:
        """Start (or extend) a refresh that lasts ``seconds``."""
        if seconds <= 0:
            return
        if not self.locked:
            self.sync_started = time.time()
        self.sync_until = max(self.sync_until, time.monotonic() + seconds)

    def unlock(self) -> None:
        """End the refresh in progress now."""
        self.sync_started = None
        self.sync_until = 0.0

    @property
    def header_row(self) -> int:
        """The ``headerRow`` property as a row number (0: none, the columns are A, B, C…)."""
        value = self.properties.get("headerRow", "")
        return int(value) if value.isdigit() else 0

    def fields(self) -> list[str]:
        """The field names: the header row's cells (blank → letter, repeats numbered), or A, B…"""
        width = self.column_count
        header = self.rows[self.header_row - 1] if 0 < self.header_row <= len(self.rows) else []
        names: list[str] = []
        for index in range(width):
            name = header[index].strip() if index < len(header) else ""
            name = name or column_name(index)
            base, n = name, 1
            while name in names:
                n += 1
                name = f"{base} ({n})"
            names.append(name)
        return names

    def items(self) -> list[list[str]]:
        """The rows that are items: those after the header row (all rows without one)."""
        return self.rows[self.header_row :] if self.header_row else self.rows


@dataclass
class DataSource:
    """A data source made by an adapter, with what the test needs to check it."""

    id: int
    name: str
    adapter: str  # "CSV" or "EXCEL"
    content: bytes
    collections: list[Collection]
    grants: list[SourceGrant] = field(default_factory=list)
    data_set_id: int | None = None
    created: float = field(default_factory=time.time)
    last_modified: float = field(default_factory=time.time)
    #: how many times an adapter wrote it: 1 when created, +1 per overwrite
    writes: int = 1
    pending: bool = False
    #: monotonic time of the last adapter write (the refresh intervals count from it)
    last_write: float = field(default_factory=time.monotonic)
    link_parameters: dict[str, str] = field(default_factory=dict)


@dataclass
class DataSet:
    """A data set (a group of data sources)."""

    id: int
    name: str
    properties: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    modified: float = field(default_factory=time.time)


class ServiceError(SandboxError):
    """An error of the data service, answered as ``{"error": message}`` with ``status``."""


def _worded(status: int, message: str) -> ServiceError:
    # The data service starts every error message with the status's reason phrase.
    return ServiceError(status, f"{HTTPStatus(status).phrase}: {message}")


def oauth_encode(value: str) -> str:
    """RFC 5849 §3.6 percent-encoding: everything but ALPHA, DIGIT, ``-._~``, as UTF-8."""
    return quote(value, safe="~")


def parse_oauth_header(value: str) -> dict[str, str]:
    """The parameters of an ``Authorization: OAuth k="v", ...`` header (values decoded)."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "oauth":
        raise ServiceError(401, "the Authorization header must use the OAuth scheme")
    params: dict[str, str] = {}
    for item in rest.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        raw = raw.strip()
        if not sep or len(raw) < 2 or raw[0] != '"' or raw[-1] != '"':
            raise ServiceError(401, f"malformed OAuth parameter {key.strip()!r}")
        name = unquote(key.strip())
        if name in params:
            raise ServiceError(401, f"OAuth parameter {name!r} given twice")
        params[name] = unquote(raw[1:-1])
    return params


def base_string_uri(scheme: str, host: str, path: str) -> str:
    """RFC 5849 §3.4.1.2: lower-case scheme and host, no default port, the path as sent."""
    scheme = scheme.lower()
    host = host.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default is not None and host.endswith(default):
        host = host[: -len(default)]
    return f"{scheme}://{host}{path or '/'}"


def signature_base_string(method: str, uri: str, query: str, oauth_params: dict[str, str]) -> str:
    """RFC 5849 §3.4.1: METHOD & uri & the sorted, encoded query and oauth parameters."""
    pairs = parse_qsl(query, keep_blank_values=True)
    pairs += [(k, v) for k, v in oauth_params.items() if k not in ("oauth_signature", "realm")]
    encoded = sorted((oauth_encode(k), oauth_encode(v)) for k, v in pairs)
    normalized = "&".join(f"{k}={v}" for k, v in encoded)
    return "&".join((method.upper(), oauth_encode(uri), oauth_encode(normalized)))


def hmac_sha1_signature(base_string: str, consumer_secret: str, token_secret: str) -> str:
    """RFC 5849 §3.4.2: base64 of HMAC-SHA1 keyed with both encoded secrets."""
    key = f"{oauth_encode(consumer_secret)}&{oauth_encode(token_secret)}"
    digest = hmac.new(key.encode(), base_string.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _accepts_version(accept: str | None) -> bool:
    if not accept:
        return False
    for media_range in accept.split(","):
        if media_range.replace(" ", "").lower() == VERSION_MEDIA_TYPE:
            return True
    return False


def column_name(index: int) -> str:
    """Spreadsheet column letters: 0 → A, 25 → Z, 26 → AA."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("A") + rem) + name
    return name


def parse_csv(content: bytes) -> list[list[str]]:
    """The rows of a CSV file; ServiceError 400 when it cannot be read as CSV."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = content.decode("cp1252", "replace")
    if "\x00" in text:
        raise ServiceError(400, "Bad Request: the file could not be parsed as CSV (NUL byte)")
    try:
        rows = [row for row in csv.reader(io.StringIO(text, newline="")) if row]
    except csv.Error as exc:
        raise ServiceError(400, f"Bad Request: the file is not valid CSV ({exc})") from None
    if not rows:
        raise ServiceError(400, "Bad Request: the CSV file has no rows")
    return rows


_SHEET_RE = re.compile(rb"<(?:\w+:)?sheet\b[^>]*?\bname=\"([^\"]*)\"")
_ROW_RE = re.compile(rb"<(?:\w+:)?row[\s>/]")


def parse_xlsx(content: bytes) -> list[tuple[str, int]]:
    """(tab name, row count) per tab of an .xlsx file; ServiceError 400 when it is not one.

    Only what a realistic answer needs is read (tab names and row counts), with plain pattern
    matching rather than an XML parser: cell values stay in the stored bytes.
    """
    bad = "Bad Request: the file could not be parsed as an Excel (*.xlsx) file"
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            names = set(archive.namelist())
            if "xl/workbook.xml" not in names:
                raise ServiceError(400, f"{bad} (no xl/workbook.xml)")
            workbook = archive.read("xl/workbook.xml")
            found = _SHEET_RE.findall(workbook)
            tabs = [html.unescape(name.decode("utf-8", "replace")) for name in found]
            if not tabs:
                raise ServiceError(400, f"{bad} (no sheets)")
            out = []
            for number, tab in enumerate(tabs, start=1):
                sheet = f"xl/worksheets/sheet{number}.xml"
                rows = len(_ROW_RE.findall(archive.read(sheet))) if sheet in names else 0
                out.append((tab, rows))
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, OSError, EOFError) as exc:
        raise ServiceError(400, f"{bad} ({exc})") from None


def _link_id(link: str | None, kind: str) -> int | None:
    """The id at the end of a ``.../<kind>/<id>`` link (absolute or relative), else None."""
    if not link:
        return None
    match = re.search(rf"/{kind}/(\d+)/?$", urlsplit(link).path)
    return int(match.group(1)) if match else None


class DataService:
    """The data service's state and its ASGI app; the sandbox mounts it under :data:`PREFIX`."""

    def __init__(self, sandbox_config: SandboxConfig, config: DataServiceConfig | None = None):
        self.sandbox_config = sandbox_config
        self.config = config or DataServiceConfig()
        self.data_sources: dict[int, DataSource] = {}
        self.data_sets: dict[int, DataSet] = {}
        self.requests: list[RequestRecord] = []
        self._ids = {kind: itertools.count(1) for kind in ("source", "collection", "grant", "set")}
        self._gate = FaultGate(sandbox_config)
        self._nonces: dict[tuple[str, str, str], float] = {}
        self._calls: dict[str, deque[float]] = {}
        #: refusals that protect the service, by rule: "refresh" (hard refresh interval),
        #: "locked" (423), "user_rate" and "account_rate" (429)
        self.refused: dict[str, int] = {}
        self._app = Starlette(routes=self._routes(), exception_handlers=ERROR_HANDLERS)
        self._route_key = RouteKeys((route, route_key(route, PREFIX)) for route in self._app.routes)

    # ------------------------------------------------------------------------- for tests

    @property
    def faults(self) -> Faults:
        """The main sandbox's live fault settings."""
        return self.sandbox_config.faults

    @property
    def gate(self) -> FaultGate:
        """The data service's fault draws (a test reseeds them for a reproducible run)."""
        return self._gate

    def by_name(self) -> dict[str, list[DataSource]]:
        """Data source name → the data sources of that name (to check "exactly one")."""
        out: dict[str, list[DataSource]] = {}
        for source in list(self.data_sources.values()):
            out.setdefault(source.name, []).append(source)
        return out

    def add_data_set(self, name: str) -> DataSet:
        """Create a data set directly (as if made in the web app); returns it."""
        data_set = DataSet(id=next(self._ids["set"]), name=name)
        self.data_sets[data_set.id] = data_set
        return data_set

    def refresh(self, collection_id: int, seconds: float) -> None:
        """Lock a collection for ``seconds`` as a refresh would (the web app refreshing it)."""
        self._collection(collection_id).lock(seconds)

    def _refuse(self, rule: str, error: ServiceError) -> ServiceError:
        self.refused[rule] = self.refused.get(rule, 0) + 1
        return error

    # --------------------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        route = self._route_key(scope)
        with recorded(scope, send, self.requests, kind="data-service", route=route) as (
            headers,
            ctl,
            sender,
        ):
            early = self._check(scope, method, path, route, headers, ctl)
            if early is not None:
                await early(scope, receive, sender)
                return
            await self._app(scope, receive, sender)

    def _check(
        self,
        scope: Scope,
        method: str,
        path: str,
        route: str | None,
        headers: Headers,
        ctl: Control,
    ) -> Response | None:
        """Faults, OAuth, the call rate and the version header; the early answer, if any."""
        fault = self._gate.api_fault((f"{method} {path.removeprefix(PREFIX)}", route or ""), ctl)
        if fault is not None:
            return fault
        try:
            token = self._verify_oauth(scope, method, headers)
            self._count_call(token)
        except ServiceError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        if not _accepts_version(headers.get("accept")):
            return JSONResponse(
                {"error": f"Not Acceptable: send the header 'Accept: {VERSION_MEDIA_TYPE}'"},
                status_code=406,
            )
        return None

    def _verify_oauth(self, scope: Scope, method: str, headers: Headers) -> str:
        """Check the request's OAuth 1.0 signature; returns the token it was made with."""
        cfg = self.config
        challenge = {"WWW-Authenticate": f'OAuth realm="{_REALM}"'}

        def refuse(message: str) -> ServiceError:
            return ServiceError(401, f"Unauthorized: {message}", challenge)

        header = headers.get("authorization")
        if not header:
            raise refuse("no OAuth Authorization header")
        try:
            params = parse_oauth_header(header)
        except ServiceError as exc:
            raise refuse(exc.message) from None
        required = (
            "oauth_consumer_key",
            "oauth_token",
            "oauth_signature_method",
            "oauth_signature",
            "oauth_timestamp",
            "oauth_nonce",
        )
        missing = [name for name in required if not params.get(name)]
        if missing:
            raise refuse(f"missing {', '.join(missing)}")
        if params["oauth_signature_method"] != "HMAC-SHA1":
            raise refuse(f"unsupported signature method {params['oauth_signature_method']!r}")
        if params.get("oauth_version", "1.0") != "1.0":
            raise refuse("oauth_version must be 1.0")
        if not hmac.compare_digest(params["oauth_consumer_key"], cfg.consumer_key):
            raise refuse("unknown consumer key")
        if not hmac.compare_digest(params["oauth_token"], cfg.token):
            raise refuse("invalid or revoked token")
        try:
            stamp = int(params["oauth_timestamp"])
        except ValueError:
            raise refuse("oauth_timestamp is not a number") from None
        now = time.time()
        if abs(now - stamp) > cfg.timestamp_skew:
            raise refuse("oauth_timestamp is too far from the server's clock")
        server = scope.get("server") or ("localhost", 80)
        host = headers.get("host") or f"{server[0]}:{server[1]}"
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        uri = base_string_uri(scope.get("scheme", "http"), host, path)
        query = scope.get("query_string", b"").decode("latin-1")
        expected = hmac_sha1_signature(
            signature_base_string(method, uri, query, params), cfg.consumer_secret, cfg.token_secret
        )
        if not hmac.compare_digest(expected, params["oauth_signature"]):
            raise refuse("invalid signature")
        # Only a request that proved itself uses up its nonce, so forged ones cannot burn them.
        for key, seen in list(self._nonces.items()):
            if now - seen > 2 * cfg.timestamp_skew:
                del self._nonces[key]
        nonce_key = (params["oauth_consumer_key"], params["oauth_token"], params["oauth_nonce"])
        if nonce_key in self._nonces:
            raise refuse("oauth_nonce was used before (replayed request)")
        self._nonces[nonce_key] = now
        return params["oauth_token"]

    def _count_call(self, token: str) -> None:
        """Enforce userApiCallRate (per token) and accountApiCallRate (all tokens together)
        over the sliding window; 429 with Retry-After past either. A refused call counts
        against neither."""
        cfg = self.config
        now = time.monotonic()
        windows = []
        for key, rate, rule in (
            (f"user:{token}", cfg.user_api_call_rate, "user_rate"),
            ("account", cfg.account_api_call_rate, "account_rate"),
        ):
            if rate <= 0:
                continue  # 0: no limit of this kind
            allowed = max(1, math.floor(rate * cfg.rate_window / 60.0))
            calls = self._calls.setdefault(key, deque())
            while calls and now - calls[0] >= cfg.rate_window:
                calls.popleft()
            if len(calls) >= allowed:
                wait = max(1, math.ceil(calls[0] + cfg.rate_window - now))
                who = "per minute" if rule == "user_rate" else "per minute for the account"
                raise self._refuse(
                    rule,
                    ServiceError(
                        429,
                        f"Too Many Requests: more than {rate:g} requests {who}",
                        {"Retry-After": str(wait)},
                    ),
                )
            windows.append(calls)
        for calls in windows:
            calls.append(now)

    def _routes(self) -> list[BaseRoute]:
        Endpoint = Callable[[Request], Awaitable[Response]]

        def at(path: str, endpoint: Endpoint, *methods: str) -> Route:
            return Route(PREFIX + path, endpoint, methods=list(methods))

        routes = [
            at("/", self._bootstrap, "GET"),
            at("/rateLimits", self._rate_limits, "GET"),
            at("/dataSources", self._list_sources, "GET"),
            at("/dataSources/{id:int}", self._get_source, "GET"),
            at("/dataSources/{id:int}", self._patch_source, "PATCH"),
            at("/dataSources/{id:int}", self._delete_source, "DELETE"),
            at("/collections", self._list_collections, "GET"),
            at("/collections/{id:int}", self._get_collection, "GET"),
            at("/collections/{id:int}/items", self._list_items, "GET"),
            at("/collections/{id:int}/schema", self._get_schema, "GET"),
            at("/collections/{id:int}/properties", self._get_properties, "GET"),
            at("/collections/{id:int}/properties", self._patch_properties, "PATCH"),
            at("/collections/{id:int}/properties", self._delete_properties, "DELETE"),
            at("/sourceGrants", self._list_grants, "GET"),
            at("/sourceGrants", self._create_grant, "POST"),
            at("/sourceGrants/{id:int}", self._get_grant, "GET"),
            at("/sourceGrants/{id:int}", self._delete_grant, "DELETE"),
            at("/dataSets", self._list_sets, "GET"),
            at("/dataSets", self._create_set, "POST"),
            at("/dataSets/{id:int}", self._get_set, "GET"),
            at("/dataSets/{id:int}", self._patch_set, "PATCH"),
            at("/dataSets/{id:int}", self._delete_set, "DELETE"),
            at("/dataSets/{id:int}/properties", self._get_set_properties, "GET"),
            at("/dataSets/{id:int}/properties", self._patch_set_properties, "PATCH"),
            at("/dataSets/{id:int}/properties", self._delete_set_properties, "DELETE"),
        ]
        for name in ADAPTERS:
            routes.append(at(f"/adapter/{name}", self._adapter_create, "POST"))
            routes.append(at(f"/adapter/{name}", self._adapter_overwrite, "PUT"))
        return list(routes)

    # ---------------------------------------------------------------------- JSON objects

    @staticmethod
    def _base(request: Request) -> str:
        # Links point where the client reached us (its Host header), whatever we are bound to.
        return str(request.base_url).rstrip("/") + PREFIX

    def _source_json(self, base: str, source: DataSource) -> dict[str, Any]:
        uri = f"{base}/dataSources/{source.id}"
        first = source.collections[0].id if source.collections else None
        return {
            "uri": uri,
            "name": source.name,
            "sourceGrants": f"{base}/sourceGrants?{urlencode({'dataSource': uri})}",
            "adapterType": source.adapter,
            "collections": f"{base}/collections/{first}" if first is not None else None,
            "linkParameters": dict(source.link_parameters),
            "created": iso8601(source.created),
            "lastModified": iso8601(source.last_modified),
            "deleted": None,
            "pending": source.pending,
            "dataSet": (
                f"{base}/dataSets/{source.data_set_id}" if source.data_set_id is not None else None
            ),
        }

    @staticmethod
    def _collection_json(base: str, collection: Collection) -> dict[str, Any]:
        uri = f"{base}/collections/{collection.id}"
        started = collection.sync_started if collection.locked else None
        return {
            "uri": uri,
            "dataSource": f"{base}/dataSources/{collection.data_source_id}",
            "name": collection.name,
            "lastSync": iso8601(collection.last_modified),
            "versionTimestamp": iso8601(collection.last_modified),
            "parent": None,
            "metadataType": None,
            "created": iso8601(collection.created),
            "deleted": None,
            "lastModified": iso8601(collection.last_modified),
            "items": f"{uri}/items",
            "schema": f"{uri}/schema",
            "properties": f"{uri}/properties",
            "metadata": f"{uri}/metadata",
            "syncStarted": iso8601(started) if started is not None else None,
        }

    @staticmethod
    def _grant_json(base: str, grant: SourceGrant) -> dict[str, Any]:
        return {
            "uri": f"{base}/sourceGrants/{grant.id}",
            "dataSource": f"{base}/dataSources/{grant.data_source_id}",
            "permissionType": grant.permission_type,
            "identifier": grant.identifier,
            "role": grant.role,
        }

    @staticmethod
    def _set_json(base: str, data_set: DataSet) -> dict[str, Any]:
        uri = f"{base}/dataSets/{data_set.id}"
        return {
            "uri": uri,
            "name": data_set.name,
            "properties": f"{uri}/properties",
            "created": iso8601(data_set.created),
            "modified": iso8601(data_set.modified),
            "creatorId": 1001,
            "dataSetGrants": f"{base}/dataSetGrants?{urlencode({'dataSet': uri})}",
            "dataSources": f"{base}/dataSources?{urlencode({'dataSet': uri})}",
        }

    # ---------------------------------------------------------------------------- helpers

    def _source(self, source_id: int | None, what: str = "data source") -> DataSource:
        source = self.data_sources.get(source_id) if source_id is not None else None
        if source is None:
            raise ServiceError(404, f"Not Found: no {what} {source_id}")
        return source

    def _source_from_link(self, link: str | None, param: str) -> DataSource:
        if not link:
            raise ServiceError(400, f"Bad Request: the {param} query parameter is required")
        source_id = _link_id(link, "dataSources")
        if source_id is None:
            raise ServiceError(400, f"Bad Request: {param} must be a DataSourceLink")
        return self._source(source_id)

    def _set_from_link(self, link: object) -> DataSet:
        set_id = _link_id(link, "dataSets") if isinstance(link, str) else None
        if set_id is None:
            raise ServiceError(400, "Bad Request: dataSet must be a DataSetLink")
        data_set = self.data_sets.get(set_id)
        if data_set is None:
            raise ServiceError(404, f"Not Found: no data set {set_id}")
        return data_set

    def _listing(
        self,
        request: Request,
        kind: str,
        items: list[_T],
        to_json: Callable[[str, _T], dict[str, Any]],
        extra: dict[str, str] | None = None,
    ) -> JSONResponse:
        """A paginated list answer: ``{kind: [...], "total", "prev", "next"}``."""
        page, total, prev, nxt = self._page(request, items, f"/{kind}", extra or {})
        base = self._base(request)
        return JSONResponse(
            {
                kind: [to_json(base, item) for item in page],
                "total": total,
                "prev": prev,
                "next": nxt,
            }
        )

    def _page(
        self, request: Request, items: list[Any], path: str, extra: dict[str, str]
    ) -> tuple[list[Any], int, str | None, str | None]:
        """Items ``[start, end)`` (at most ``page_size``) and the prev/next links."""
        size = max(1, self.config.page_size)
        try:
            start = int(request.query_params.get("start", 0))
            end = int(request.query_params.get("end", start + size))
        except ValueError:
            raise ServiceError(400, "Bad Request: start and end must be numbers") from None
        start = max(0, start)
        end = max(start, min(end, start + size))
        base = self._base(request)

        def link(a: int, b: int) -> str:
            return f"{base}{path}?{urlencode({**extra, 'start': a, 'end': b})}"

        prev = link(max(0, start - size), start) if start > 0 else None
        nxt = link(end, end + size) if end < len(items) else None
        return items[start:end], len(items), prev, nxt

    async def _read_file(self, request: Request) -> tuple[str, bytes]:
        """The one attached file of a multipart body: (file name, bytes); 400/413 otherwise."""
        try:
            parser = FormDataParser(boundary_from_content_type(request.headers.get("content-type")))
        except FormDataError as exc:
            raise ServiceError(
                400, f"Bad Request: the adapter expects multi-part form data with a file ({exc})"
            ) from exc
        limit = self.config.file_size_limit
        data = bytearray()
        filename: str | None = None
        in_file = done = too_big = False
        try:
            async for chunk in request.stream():
                for event in parser.feed(chunk):
                    if isinstance(event, PartStart):
                        # The first part that carries a file counts; plain fields are ignored.
                        in_file = event.filename is not None and filename is None
                        if in_file:
                            filename = event.filename
                    elif isinstance(event, PartData) and in_file and not too_big:
                        data += event.data
                        if len(data) > limit:
                            too_big = True  # keep reading, so the client gets our answer
                            data.clear()
                    elif isinstance(event, PartEnd) and in_file:
                        in_file = False
                        done = True
            parser.close()
        except FormDataError as exc:
            raise ServiceError(400, f"Bad Request: malformed multipart body ({exc})") from exc
        except ClientDisconnect:
            raise ServiceError(400, "Bad Request: the body ended early") from None
        if too_big:
            raise ServiceError(
                413, f"Payload Too Large: the file is larger than the {limit}-byte file size limit"
            )
        if filename is None or not done:
            raise ServiceError(400, "Bad Request: no file attached")
        return filename, bytes(data)

    def _collections_for(
        self, adapter: str, source_id: int, filename: str, content: bytes
    ) -> list[Collection]:
        if adapter == "CSV":
            rows = parse_csv(content)
            return [Collection(next(self._ids["collection"]), source_id, filename, rows)]
        return [
            Collection(next(self._ids["collection"]), source_id, tab, [[""]] * rows)
            for tab, rows in parse_xlsx(content)
        ]

    # ----------------------------------------------------------------------------- routes

    async def _bootstrap(self, request: Request) -> Response:
        base = self._base(request)
        return JSONResponse(
            {
                "dataSets": f"{base}/dataSets",
                "dataSources": f"{base}/dataSources",
                "collections": f"{base}/collections",
                "sourceGrants": f"{base}/sourceGrants",
                "dataSetGrants": f"{base}/dataSetGrants",
                "adapters": {name: f"{base}/adapter/{name}" for name in ADAPTERS},
            }
        )

    async def _rate_limits(self, request: Request) -> Response:
        cfg = self.config
        return JSONResponse(
            {
                "userHardRefreshInterval": cfg.user_hard_refresh_interval,
                "userSoftRefreshInterval": cfg.user_soft_refresh_interval,
                "userApiCallRate": cfg.user_api_call_rate,
                "accountApiCallRate": cfg.account_api_call_rate,
                "fileSizeLimit": cfg.file_size_limit,
                "adapterTypes": list(cfg.adapter_types),
            }
        )

    def _adapter_of(self, request: Request) -> str:
        name = request.url.path.rsplit("/", 1)[-1]
        adapter = ADAPTERS[name]
        offered = {t.replace(" ", "").upper() for t in self.config.adapter_types}
        if adapter not in offered:
            raise ServiceError(403, f"Forbidden: the {name} adapter is not part of this plan")
        return adapter

    async def _adapter_create(self, request: Request) -> Response:
        adapter = self._adapter_of(request)
        permission = request.query_params.get("permissionType", "user")
        if permission not in PERMISSION_TYPES:
            raise ServiceError(
                400, f"Bad Request: permissionType must be one of {', '.join(PERMISSION_TYPES)}"
            )
        filename, content = await self._read_file(request)
        source_id = next(self._ids["source"])
        collections = self._collections_for(adapter, source_id, filename, content)
        identifier = {
            "user": self.config.user_id,
            "account": self.config.account_id,
            "project": self.config.project_id,
        }[permission]
        grant = SourceGrant(next(self._ids["grant"]), source_id, permission, identifier, "edit")
        source = DataSource(source_id, filename, adapter, content, collections, [grant])
        seconds = self.config.import_seconds
        if seconds > 0:
            # The import runs: the data source exists but is pending, its collections locked.
            source.pending = True
            for collection in collections:
                collection.lock(seconds)
        self.data_sources[source_id] = source
        try:
            await self._import_time(collections)
        finally:
            source.pending = False  # also when the server stops: the import is not lost
        await self._hold_back()
        return JSONResponse(self._source_json(self._base(request), source), status_code=201)

    async def _adapter_overwrite(self, request: Request) -> Response:
        adapter = self._adapter_of(request)
        source = self._source_from_link(request.query_params.get("dataSource"), "dataSource")
        if source.adapter != adapter:
            raise ServiceError(
                400, f"Bad Request: data source {source.id} was made by another adapter"
            )
        collection_link = request.query_params.get("collection")
        target: Collection | None = None
        if collection_link is not None:
            wanted = _link_id(collection_link, "collections")
            target = next((c for c in source.collections if c.id == wanted), None)
            if target is None:
                raise ServiceError(
                    400, "Bad Request: the collection does not belong to the data source"
                )
        elif adapter == "CSV" and len(source.collections) > 1:
            raise ServiceError(
                400, "Bad Request: the data source has several collections; name one (collection)"
            )
        filename, content = await self._read_file(request)
        written = [target] if target is not None else list(source.collections)
        busy = [c.id for c in written if c.locked]
        if busy:
            raise self._refuse(
                "locked",
                ServiceError(
                    423, f"Locked: collection {busy[0]} is being refreshed; try again later"
                ),
            )
        interval = self.config.user_hard_refresh_interval
        since = time.monotonic() - source.last_write
        if interval > 0 and since < interval:
            wait = max(1, math.ceil(interval - since))
            raise self._refuse(
                "refresh",
                ServiceError(
                    429,
                    f"Too Many Requests: data source {source.id} was refreshed {since:.1f} s "
                    f"ago; the hard refresh interval is {interval:g} s",
                    {"Retry-After": str(wait)},
                ),
            )
        now = time.time()
        source.last_write = time.monotonic()
        fresh = self._collections_for(adapter, source.id, filename, content)
        if adapter == "CSV":
            kept = target or source.collections[0]
            kept.rows = fresh[0].rows
            kept.last_modified = now
            written = [kept]
        else:
            # Tabs keep the collection of the same name; others are deleted or created.
            old = {c.name: c for c in source.collections}
            merged = []
            for new in fresh:
                same = old.get(new.name)
                if same is not None:
                    same.rows, same.last_modified = new.rows, now
                    merged.append(same)
                else:
                    merged.append(new)
            source.collections = merged
            written = merged
        source.content = content
        source.last_modified = now
        source.writes += 1
        for collection in written:
            collection.lock(self.config.import_seconds)
        await self._import_time(written)
        await self._hold_back()
        return JSONResponse(self._source_json(self._base(request), source))

    async def _hold_back(self) -> None:
        if self.config.adapter_delay > 0:
            await anyio.sleep(self.config.adapter_delay)

    async def _import_time(self, collections: list[Collection]) -> None:
        """Wait while the import of ``collections`` runs; they are unlocked when it ends."""
        try:
            if self.config.import_seconds > 0:
                await anyio.sleep(self.config.import_seconds)
        finally:
            for collection in collections:
                collection.unlock()

    async def _list_sources(self, request: Request) -> Response:
        sources = [s for s in self.data_sources.values() if not s.pending]
        extra: dict[str, str] = {}
        set_link = request.query_params.get("dataSet")
        if set_link is not None:
            data_set = self._set_from_link(set_link)
            sources = [s for s in sources if s.data_set_id == data_set.id]
            extra["dataSet"] = set_link
        if request.method == "HEAD":
            return Response(headers={"Marq-DataSources-Total": str(len(sources))})
        return self._listing(request, "dataSources", sources, self._source_json, extra)

    async def _get_source(self, request: Request) -> Response:
        source = self._source(request.path_params["id"])
        return JSONResponse(self._source_json(self._base(request), source))

    async def _patch_source(self, request: Request) -> Response:
        source = self._source(request.path_params["id"])
        body = await read_json(request, _worded)
        if not isinstance(body, dict):
            raise ServiceError(400, "Bad Request: body must be a Data Source JSON Object")
        name = body.get("name", body.get("Name"))
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ServiceError(400, "Bad Request: name must be a non-empty string")
        if "dataSet" in body and body["dataSet"] is not None:
            data_set_id: int | None = self._set_from_link(body["dataSet"]).id
        else:
            data_set_id = source.data_set_id if "dataSet" not in body else None
        link_parameters = body.get("linkParameters")
        if link_parameters is not None and not (
            isinstance(link_parameters, dict)
            and all(isinstance(v, str) for v in link_parameters.values())
        ):
            raise ServiceError(400, "Bad Request: linkParameters must map strings to strings")
        pending = body.get("pending")
        if pending is not None and not isinstance(pending, bool):
            raise ServiceError(400, "Bad Request: pending must be a boolean")
        if name is not None:
            source.name = name
        if link_parameters is not None:
            source.link_parameters = dict(link_parameters)
        if pending is not None:
            source.pending = pending
        source.data_set_id = data_set_id
        source.last_modified = time.time()
        return JSONResponse(self._source_json(self._base(request), source))

    async def _delete_source(self, request: Request) -> Response:
        source = self._source(request.path_params["id"])
        del self.data_sources[source.id]
        return JSONResponse(f"Data source {source.id} deleted")

    def _collection(self, collection_id: int) -> Collection:
        for source in self.data_sources.values():
            for collection in source.collections:
                if collection.id == collection_id:
                    return collection
        raise ServiceError(404, f"Not Found: no collection {collection_id}")

    async def _get_collection(self, request: Request) -> Response:
        collection = self._collection(request.path_params["id"])
        return JSONResponse(self._collection_json(self._base(request), collection))

    async def _list_collections(self, request: Request) -> Response:
        # Every top-level collection the user can reach: those of pending data sources too
        # (the document hides pending data sources from GET /dataSources only).
        collections = [c for s in list(self.data_sources.values()) for c in s.collections]
        collections.sort(key=lambda c: c.id)
        total = {"Marq-Collections-Total": str(len(collections))}
        if request.method == "HEAD":
            return Response(headers=total)
        listing = self._listing(request, "collections", collections, self._collection_json)
        listing.headers.update(total)
        return listing

    def _unlocked(self, collection: Collection) -> Collection:
        if collection.locked:
            raise self._refuse(
                "locked",
                ServiceError(
                    423, f"Locked: collection {collection.id} is being refreshed; try again later"
                ),
            )
        return collection

    async def _list_items(self, request: Request) -> Response:
        collection = self._unlocked(self._collection(request.path_params["id"]))
        rows = collection.items()
        total = {"Marq-Items-Total": str(len(rows))}
        if request.method == "HEAD":
            return Response(headers=total)
        path = f"/collections/{collection.id}/items"
        page, count, prev, nxt = self._page(request, list(enumerate(rows)), path, {})
        base = self._base(request)
        names = collection.fields()
        items = [
            {
                "uri": f"{base}{path}/{number + 1}",
                "collection": f"{base}/collections/{collection.id}",
                "fields": dict(zip(names, row, strict=False)),
            }
            for number, row in page
        ]
        return JSONResponse(
            {"items": items, "total": count, "prev": prev, "next": nxt}, headers=total
        )

    async def _get_schema(self, request: Request) -> Response:
        collection = self._collection(request.path_params["id"])
        uri = f"{self._base(request)}/collections/{collection.id}"
        return JSONResponse(
            [
                {
                    "uri": f"{uri}/schema/{order}",
                    "name": name,
                    "fieldType": "STRING",
                    "collection": uri,
                    "isPrimary": False,
                    "order": order,
                    "default": None,
                }
                for order, name in enumerate(collection.fields(), start=1)
            ]
        )

    async def _get_properties(self, request: Request) -> Response:
        collection = self._collection(request.path_params["id"])
        return JSONResponse(dict(collection.properties))

    async def _patch_properties(self, request: Request) -> Response:
        collection = self._unlocked(self._collection(request.path_params["id"]))
        changes = _property_object(await read_json(request, _worded), "Collection Property")
        header = changes.get("headerRow")
        if header is not None and not (header.isdigit() and int(header) >= 1):
            raise ServiceError(400, "Bad Request: headerRow must be a row number (1 or more)")
        collection.properties.update(changes)
        collection.last_modified = time.time()
        return JSONResponse(changes)

    async def _delete_properties(self, request: Request) -> Response:
        collection = self._unlocked(self._collection(request.path_params["id"]))
        names = _property_names(request)
        for name in names:
            collection.properties.pop(name, None)
        collection.last_modified = time.time()
        return JSONResponse(f"Deleted {len(names)} properties")

    async def _list_grants(self, request: Request) -> Response:
        source = self._source_from_link(request.query_params.get("dataSource"), "dataSource")
        base = self._base(request)
        return JSONResponse([self._grant_json(base, g) for g in source.grants])

    def _grant(self, grant_id: int) -> tuple[DataSource, SourceGrant]:
        for source in self.data_sources.values():
            for grant in source.grants:
                if grant.id == grant_id:
                    return source, grant
        raise ServiceError(404, f"Not Found: no source grant {grant_id}")

    async def _get_grant(self, request: Request) -> Response:
        _, grant = self._grant(request.path_params["id"])
        return JSONResponse(self._grant_json(self._base(request), grant))

    async def _create_grant(self, request: Request) -> Response:
        body = await read_json(request, _worded)
        if not isinstance(body, dict):
            raise ServiceError(400, "Bad Request: body must be a JSON object")
        link = body.get("dataSource")
        source = self._source_from_link(link if isinstance(link, str) else None, "dataSource")
        permission, identifier, role = (
            body.get("permissionType"),
            body.get("identifier"),
            body.get("role"),
        )
        if permission not in PERMISSION_TYPES:
            raise ServiceError(
                400, f"Bad Request: permissionType must be one of {', '.join(PERMISSION_TYPES)}"
            )
        if not isinstance(identifier, str) or not identifier:
            raise ServiceError(400, "Bad Request: identifier must be a non-empty string")
        if role not in ROLES:
            raise ServiceError(400, f"Bad Request: role must be one of {', '.join(ROLES)}")
        assert isinstance(permission, str) and isinstance(role, str)
        grant = SourceGrant(next(self._ids["grant"]), source.id, permission, identifier, role)
        source.grants.append(grant)
        return JSONResponse(self._grant_json(self._base(request), grant), status_code=201)

    async def _delete_grant(self, request: Request) -> Response:
        source, grant = self._grant(request.path_params["id"])
        if len(source.grants) == 1:
            raise ServiceError(400, "Bad Request: the last source grant cannot be deleted")
        source.grants.remove(grant)
        return JSONResponse(f"Source grant {grant.id} deleted")

    async def _list_sets(self, request: Request) -> Response:
        return self._listing(request, "dataSets", list(self.data_sets.values()), self._set_json)

    async def _create_set(self, request: Request) -> Response:
        body = await read_json(request, _worded)
        if not isinstance(body, dict):
            raise ServiceError(400, "Bad Request: body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ServiceError(400, "Bad Request: name must be a non-empty string")
        properties = body.get("properties") or {}
        if not isinstance(properties, dict) or not all(
            isinstance(v, str) for v in properties.values()
        ):
            raise ServiceError(400, "Bad Request: properties must map strings to strings")
        data_set = self.add_data_set(name)
        data_set.properties = dict(properties)
        return JSONResponse(self._set_json(self._base(request), data_set), status_code=201)

    def _data_set(self, set_id: int) -> DataSet:
        data_set = self.data_sets.get(set_id)
        if data_set is None:
            raise ServiceError(404, f"Not Found: no data set {set_id}")
        return data_set

    async def _get_set(self, request: Request) -> Response:
        data_set = self._data_set(request.path_params["id"])
        return JSONResponse(self._set_json(self._base(request), data_set))

    async def _patch_set(self, request: Request) -> Response:
        data_set = self._data_set(request.path_params["id"])
        body = await read_json(request, _worded)
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ServiceError(400, "Bad Request: name must be a non-empty string")
        data_set.name = name
        data_set.modified = time.time()
        return JSONResponse(self._set_json(self._base(request), data_set))

    async def _delete_set(self, request: Request) -> Response:
        data_set = self._data_set(request.path_params["id"])
        del self.data_sets[data_set.id]
        # Its data sources leave the set but are otherwise kept, as the document says.
        for source in self.data_sources.values():
            if source.data_set_id == data_set.id:
                source.data_set_id = None
        return JSONResponse(f"Data set {data_set.id} deleted")

    async def _get_set_properties(self, request: Request) -> Response:
        data_set = self._data_set(request.path_params["id"])
        return JSONResponse(dict(data_set.properties))

    async def _patch_set_properties(self, request: Request) -> Response:
        data_set = self._data_set(request.path_params["id"])
        changes = _property_object(await read_json(request, _worded), "Data Set Property")
        data_set.properties.update(changes)
        data_set.modified = time.time()
        return JSONResponse(changes)

    async def _delete_set_properties(self, request: Request) -> Response:
        data_set = self._data_set(request.path_params["id"])
        names = _property_names(request)
        for name in names:
            data_set.properties.pop(name, None)
        data_set.modified = time.time()
        return JSONResponse(f"Deleted {len(names)} properties")


def _property_object(body: Any, what: str) -> dict[str, str]:
    """A property JSON object: names to strings (the document types every value a String)."""
    if not isinstance(body, dict):
        raise ServiceError(400, f"Bad Request: body must be a {what} JSON Object")
    for name, value in body.items():
        if not name.strip():
            raise ServiceError(400, "Bad Request: property names must not be empty")
        if not isinstance(value, str):
            raise ServiceError(400, f"Bad Request: property {name!r} must be a string")
    return dict(body)


def _property_names(request: Request) -> list[str]:
    raw = request.query_params.get("properties")
    names = [n for n in (raw or "").split(",") if n]
    if not names:
        raise ServiceError(400, "Bad Request: the properties query parameter is required")
    return names
