"""The one place HTTP clients are built: TLS (verify, a private CA, one default context per
process), no cookies, a pool sized for what can be in flight, timeouts, no redirects followed,
and the asyncio network backend (see backend.py). Used by every target's API client and by the
sandbox's storage helpers."""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from daemon import __version__
from daemon.config import UploadSettings
from daemon.net import backend

# Only what answers.py decodes (with its cap): httpx would also offer br/zstd if those
# packages were installed.
ACCEPT_ENCODING = "gzip, deflate"
USER_AGENT = f"inboxd/{__version__}"


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing and sends nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass


def forget_cookies(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """Make ``client`` ignore cookies: none of our APIs uses them, and a storage server's
    cookie has no business in our next request. It also saves httpx's urllib-based cookie
    handling, ~40 us of CPU per request (a tenth of a small request's cost). httpx has no
    switch for it and copies any jar it is given into a plain one, hence the attribute.
    """
    client._cookies = _NoCookies()
    return client


def pool_size(upload: UploadSettings) -> int:
    """Connections a pool may keep for ``[upload]``: a part of every large file, every small
    file, and a few for the poller, the probe and part-URL requests."""
    return upload.workers * upload.part_concurrency + upload.small_files + 8


def tls_verify(verify: bool, ca_file: Path | None) -> ssl.SSLContext | bool:
    """httpx's ``verify`` for ``[api] verify_tls`` and ``ca_file``."""
    if not verify:
        return False
    if ca_file is None:
        return _default_ssl(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    # The usual trust store plus the private CA: storage URLs of a public cloud must still
    # verify when the API itself uses a private CA.
    ctx = httpx.create_ssl_context()
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


@functools.cache
def _default_ssl(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """httpx's default trust (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), loaded once per process
    rather than once per client (~20 ms of CPU each); keyed by those variables."""
    return httpx.create_ssl_context()


def build_client(
    *,
    timeout: float,
    verify: ssl.SSLContext | bool = True,
    base_url: str = "",
    headers: Mapping[str, str] | None = None,
    connections: int | None = None,
    auth: httpx.Auth | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
) -> httpx.AsyncClient:
    """An AsyncClient set up the one way: ``timeout`` per socket operation (connect at most
    15 s), ``verify`` from :func:`tls_verify`, ``connections`` kept alive in the pool (httpx's
    default when None), redirects not followed, no cookies, and the asyncio network backend
    unless a test ``transport`` is given."""
    limits = (
        httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        if connections is not None
        else httpx.Limits(max_connections=100, max_keepalive_connections=20)
    )
    client = httpx.AsyncClient(
        base_url=base_url,
        headers=dict(headers or {}),
        auth=auth,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
        verify=verify,
        limits=limits,
        transport=transport,
        follow_redirects=False,
        event_hooks={k: list(v) for k, v in (event_hooks or {}).items()},
    )
    if transport is None:
        # A fifth less CPU per small request than httpcore's anyio streams (see backend.py).
        backend.adopt(client)
    return forget_cookies(client)


def build_sync_client(*, timeout: float) -> httpx.Client:
    """A blocking client (the sandbox's set-up calls to a storage emulator): ``timeout``,
    redirects not followed, no cookies kept."""
    return httpx.Client(timeout=timeout, follow_redirects=False, cookies=_NoCookies())
