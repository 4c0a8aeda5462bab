"""The spreadsheet data service's API client: OAuth 1.0a-signed requests (one attempt per
call; retries are the target's), the call-rate gate every worker shares (the service's rate
limits, and a hold after a 429), and the models of its answers."""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import Generator, Mapping, Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
from authlib.oauth1 import ClientAuth  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from daemon.compat import UTC, fromisoformat
from daemon.config import ApiSettings, DataServiceGrant, DataServiceSettings
from daemon.delivery.files import FileSlice, Progress, multipart_file_body
from daemon.errors import (
    AuthError,
    ConfigError,
    LockedError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RejectedError,
)
from daemon.net.answers import parse_answer, send_request
from daemon.net.bandwidth import RateLimiter
from daemon.net.clients import ACCEPT_ENCODING, USER_AGENT, build_client, tls_verify

_M = TypeVar("_M", bound=BaseModel)


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


Adapter = Literal["csv", "excel"]


#: adapterTypes spellings (normalised: upper case, no spaces/underscores) per adapter
_ADAPTER_TYPES: dict[str, set[str]] = {"csv": {"CSV"}, "excel": {"EXCEL", "XLSX"}}


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
        return link_id(self.uri, "dataSources") or 0

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


def property_value(value: Any) -> str | None:
    """A metadata value as the string a property holds (None: no value, not sent)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def link_id(link: str, kind: str) -> int | None:
    match = re.search(rf"/{kind}/(\d+)/?$", urlsplit(link).path)
    return int(match.group(1)) if match else None


def _source(data: Any, endpoint: str) -> DataSourceInfo:
    source = parse_answer(DataSourceInfo, data, endpoint)
    if link_id(source.uri, "dataSources") is None:
        raise ProtocolError(f"the data source link {source.uri!r} ends in no id", endpoint=endpoint)
    return source


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
        return parse_answer(RateLimits, body, "GET /rateLimits")

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
        page = parse_answer(_Page, await self._send("GET", target, endpoint=ep), ep)
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
        return [parse_answer(SourceGrantInfo, item, ep) for item in body]

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
        page = parse_answer(_CollectionPage, await self._send("GET", target, endpoint=ep), ep)
        return page.collections, page.next

    async def data_sets_page(self, url: str | None = None) -> tuple[list[DataSetInfo], str | None]:
        """One page of ``GET /dataSets``: its data sets and the next page's link."""
        ep = "GET /dataSets"
        target = self._own(url, ep) if url is not None else "/dataSets"
        page = parse_answer(_DataSetPage, await self._send("GET", target, endpoint=ep), ep)
        return page.data_sets, page.next

    async def create_data_set(self, name: str, properties: Mapping[str, str]) -> DataSetInfo:
        """``POST /dataSets {"name", "properties"}``."""
        ep = "POST /dataSets"
        body = await self._send(
            "POST", "/dataSets", endpoint=ep, json={"name": name, "properties": dict(properties)}
        )
        data_set = parse_answer(DataSetInfo, body, ep)
        if link_id(data_set.uri, "dataSets") is None:
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
