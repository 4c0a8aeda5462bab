"""What the sandbox's three APIs share: the request log, fault gates, route keys, JSON bodies
and error answers.

The Marple DB API (``app.py``), the older Marple API (``legacy.py``) and the spreadsheet data
service (``dataservice.py``) differ in their routes, their authentication and how they word an
error; everything else about receiving a request is here, once. This module imports none of
the three, so each of them can be imported first.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeGuard

import anyio
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope, Send

from daemon.sandbox.config import Faults, MiB, SandboxConfig
from daemon.sandbox.injection import DROPPING, Control, Sender, retry_after_header
from daemon.sandbox.models import RequestRecord

#: JSON request bodies are small; refusing big ones keeps a broken client from eating memory.
MAX_JSON_BODY: Final = 1 * MiB


class SandboxError(Exception):
    """An error answer: ``status``, a one-line ``message`` and extra ``headers``.

    The Marple DB API and the data service answer it as ``{"error": message}``; the older API
    wraps it in its envelope.
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def is_int(value: object) -> TypeGuard[int]:
    """An integer id from a JSON body (JSON true/false decode to bool, a subclass of int)."""
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------- the request log


@contextmanager
def recorded(
    scope: Scope, send: Send, log: list[RequestRecord], *, kind: str, route: str | None
) -> Iterator[tuple[Headers, Control, Sender]]:
    """Log the request in ``log`` and give its headers, its fault switches and the ``send``
    that records the status (and cuts the answer off when told to); says so when it did."""
    headers = Headers(scope=scope)
    authorization = headers.get("authorization")
    record = RequestRecord(
        method=scope["method"],
        path=scope["path"],
        query=scope.get("query_string", b"").decode("latin-1"),
        has_authorization=authorization is not None,
        authorization=authorization,
        kind=kind,
        route=route,
        headers=dict(headers.items()),
    )
    log.append(record)
    ctl = Control()
    try:
        yield headers, ctl, Sender(send, record, ctl)
    finally:
        if ctl.dropped:
            DROPPING.set(True)
            logging.getLogger("inboxd.sandbox").info(
                "cut off the response to %s %s (injected fault)", record.method, record.path
            )


# ------------------------------------------------------------------------------ route keys


def route_key(route: BaseRoute, prefix: str) -> str:
    """The key faults are matched on: the route's first method (HEAD aside) and its path
    template below ``prefix``, e.g. ``"POST /ingestion/{id}/abort"``."""
    assert isinstance(route, Route)
    method = sorted((route.methods or {"GET"}) - {"HEAD"})[0]
    template = re.sub(r":\w+}", "}", route.path.removeprefix(prefix)) or "/"
    return f"{method} {template}"


class RouteKeys:
    """Finds the key of the route a request goes to (None when no route matches)."""

    def __init__(self, keyed: Iterable[tuple[BaseRoute, str]]) -> None:
        self._keyed = list(keyed)

    def __call__(self, scope: Scope) -> str | None:
        for route, key in self._keyed:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return key
        return None


# ------------------------------------------------------------------------------ fault gates


class FaultGate:
    """A server's injected faults, drawn from its own generator seeded with ``faults.seed``."""

    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self._rng = random.Random(config.faults.seed)

    @property
    def faults(self) -> Faults:
        """The live fault settings (a test may replace them while the server runs)."""
        return self._config.faults

    def reseed(self, seed: int | None) -> None:
        """Set ``faults.seed`` and start the draws over from it (a test's reproducible run)."""
        self.faults.seed = seed
        self._rng.seed(seed)

    def roll(self, rate: float) -> bool:
        """True with probability ``rate``."""
        return rate > 0 and self._rng.random() < rate

    def next_forced(self, keys: Iterable[str]) -> int | None:
        """Pop the next scripted status for the first key with one queued (``fail_next``)."""
        plan = self.faults.fail_next
        for key in keys:
            queue = plan.get(key)
            if queue:
                return queue.pop(0)
        return None

    def api_fault(self, keys: Iterable[str], ctl: Control) -> Response | None:
        """A scripted or random 503/429 answer for an API request; without one, maybe mark the
        answer to be cut off (a scripted 0, or ``drop_response_rate``)."""
        faults = self.faults
        forced = self.next_forced(keys)
        status = forced
        if status is None and self.roll(faults.api_503_rate):
            status = 503
        if status is None and self.roll(faults.api_429_rate):
            status = 429
        if status:
            message = {
                429: "Too many requests (injected fault)",
                503: "Service unavailable (injected fault)",
            }.get(status, f"Injected fault {status}")
            return JSONResponse(
                {"error": message},
                status_code=status,
                headers=retry_after_header(status, faults.retry_after),
            )
        if forced == 0 or self.roll(faults.drop_response_rate):
            ctl.drop = True
        return None


async def storage_delay(faults: Faults, owed: float, received: int) -> float:
    """Sleep ``storage_delay_per_mib`` for ``received`` more bytes, in slices of 5 ms or more
    rather than per chunk; returns the delay still owed."""
    delay = faults.storage_delay_per_mib
    if delay > 0:
        owed += received / MiB * delay
        if owed >= 0.005:
            await anyio.sleep(owed)
            return 0.0
    return owed


# ---------------------------------------------------------------------------- request bodies


async def read_json(
    request: Request,
    error: Callable[[int, str], Exception],
    *,
    too_large: int = 400,
    optional: bool = False,
) -> Any:
    """The JSON body, at most :data:`MAX_JSON_BODY` bytes; ``error(status, message)`` is
    raised for a larger or malformed one. With ``optional`` an empty body is None."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise error(too_large, "request body too large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if optional and not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(400, f"invalid JSON body: {exc}") from exc


async def drain(request: Request) -> None:
    """Read the body before answering an error, so the client reads our answer instead of
    failing to write into a connection we closed."""
    try:
        async for _ in request.stream():
            pass
    except ClientDisconnect:
        pass


# ---------------------------------------------------------------------------- error answers


def internal_error_message(exc: Exception) -> str:
    """What a client is told about the sandbox's own bug."""
    return f"internal sandbox error: {exc!r}"


async def _error_answer(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SandboxError)
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": exc.detail}, status_code=exc.status_code, headers=dict(exc.headers or {})
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": internal_error_message(exc)}, status_code=500)


#: Starlette's ``exception_handlers`` for an API whose errors are ``{"error": message}``.
ERROR_HANDLERS: Final = {
    SandboxError: _error_answer,
    HTTPException: _http_error,
    Exception: _internal_error,
}
