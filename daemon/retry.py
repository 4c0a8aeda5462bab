"""The one retry policy: exponential backoff with full jitter, a cap, and ``Retry-After``.

Steps are retried, not whole jobs: each call site wraps exactly one request whose repetition
is known to be safe (see the table in ``daemon.delivery.marple_db.client``).

Every wait a server can ask for goes through two functions here: :func:`parse_retry_after`
reads the header once, whatever it holds (seconds, an HTTP date, garbage, ``inf``, a date in
year 9999), and :meth:`RetryPolicy.server_wait` bounds the result by ``max_retry_after``
(``[retry] max_retry_after_seconds``, 300 s by default): the one cap for single requests and
for the hold of every worker alike.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, TypeVar

import anyio
import structlog

from daemon.compat import UTC
from daemon.config import RetrySettings
from daemon.errors import InboxdError, TransientApiError, TransportError

T = TypeVar("T")
_log = structlog.get_logger(__name__)

#: A parsed ``Retry-After`` never exceeds this (a day); the policy's cap then applies. Keeps
#: every consumer's arithmetic finite, even one that does not know the policy.
RETRY_AFTER_CEILING = 86400.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for: finite, in [0, RETRY_AFTER_CEILING].

    Delta-seconds (``"120"``, also ``"1.5"``) or an HTTP date (``"Fri, 31 Dec 9999 23:59:59
    GMT"``); negative values and dates in the past mean 0; ``inf`` and far-future dates mean
    the ceiling; NaN, empty or unreadable values mean None (no server-requested wait).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _http_date_delta(text, time.time() if now is None else now)
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CEILING)


def _http_date_delta(text: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110: HTTP dates are GMT; a date without a zone is read as such.
        when = when.replace(tzinfo=UTC)
    try:
        return when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return RETRY_AFTER_CEILING


#: how :func:`backoff_delay` spreads a delay: ``full`` uniform in [0, d] (clients that failed
#: together retry apart), ``half`` uniform in [d/2, d] (never much shorter than planned),
#: ``none`` exactly d (a single local loop: nobody to spread from)
Jitter = Literal["full", "half", "none"]

#: exponents beyond this change nothing (the cap applies long before) and keep floats finite
_MAX_EXPONENT = 60


def backoff_delay(attempt: int, base: float, cap: float, *, jitter: Jitter = "full") -> float:
    """The one backoff formula: seconds to wait after the ``attempt``-th failure in a row.

    ``attempt`` counts from 1: the delay is ``base * 2**(attempt - 1)``, at most ``cap``, then
    jittered as ``jitter`` says. Every retry loop of inboxd (a step, the service hold, a job's
    next try, the poller, the watcher's event source) takes its delay from here.
    """
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    ceiling = min(cap, base * 2.0**exponent)
    if jitter == "full":
        return random.uniform(0, ceiling)
    if jitter == "half":
        return random.uniform(ceiling / 2, ceiling)
    return ceiling


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one step is retried."""

    attempts: int = 6
    base: float = 0.5
    cap: float = 60.0
    #: the longest ``Retry-After`` obeyed; a confused or hostile header cannot stall us longer
    max_retry_after: float = 300.0

    @classmethod
    def from_settings(cls, r: RetrySettings) -> RetryPolicy:
        """The per-step policy of a ``[retry]`` section."""
        return cls(
            attempts=r.attempts,
            base=r.base_seconds,
            cap=r.cap_seconds,
            max_retry_after=r.max_retry_after_seconds,
        )

    def server_wait(self, retry_after: float | None) -> float:
        """The wait a server asked for, bounded: 0 without one, at most ``max_retry_after``."""
        return bounded_wait(retry_after, self.max_retry_after)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 1).

        Full jitter (uniform in [0, min(cap, base * 2**(attempt-1))]) spreads clients that failed
        together; a server's ``Retry-After`` is a floor, itself bounded by ``max_retry_after``.
        """
        wait = backoff_delay(attempt, self.base, self.cap, jitter="full")
        return max(wait, self.server_wait(retry_after))


def bounded_wait(retry_after: float | None, cap: float) -> float:
    """``retry_after`` within [0, ``cap``]; 0 when there is none (or it is NaN)."""
    if retry_after is None or not retry_after > 0:
        return 0.0
    return min(retry_after, cap)


def retry_after_of(exc: BaseException) -> float | None:
    """The server-requested wait carried by ``exc``, if any."""
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


#: told the error ``kind`` of every retry (metrics count retries by reason)
OnRetry = Callable[[str], None]


def is_service_trouble(exc: BaseException) -> bool:
    """Whether ``exc`` says the service as a whole is not answering (no answer, 5xx, 429),
    rather than that this one request or file is wrong."""
    return isinstance(exc, TransportError | TransientApiError)


class ServiceHold:
    """The hold of every request to the service while it does not answer.

    ``trouble`` (a request got no answer, a 5xx or a 429) starts or extends it: a jittered
    wait growing exponentially with the failures in a row up to ``cap``, or what the server
    asked for (``Retry-After``, at most ``max_retry_after``). While it lasts, workers claim
    no job and a step's retry waits for it too (``backoff`` finds the hold of the task it
    runs in through ``CURRENT_HOLD``), so an outage costs the service a few requests, not
    one per worker, per step and per queued file. ``end`` (a probe found the service back)
    releases everyone at once; ``succeeded`` resets the growth.

    A hold that runs out by itself (no probe said the service is back) lets one task through
    (a trial) and the others only once a request succeeded (``succeeded``, ``end``), once the
    trial failed (``trouble``: the next hold), or after ``trial_every`` seconds (the next
    trial): with dozens of files in flight (the small-file lane) they would otherwise all
    send their retry in the same instant, every time a hold ran out.
    """

    def __init__(
        self, *, base: float, cap: float, max_retry_after: float, trial_every: float = 3.0
    ) -> None:
        self.base = base
        self.cap = cap
        self.max_retry_after = max_retry_after
        self.trial_every = trial_every
        self.failures = 0
        self.until = 0.0  # time.monotonic()
        self._over = anyio.Event()
        self._over.set()
        self._begun = anyio.Event()
        #: trouble was seen and no request succeeded since: after the hold, one trial at a time
        self.suspect = False
        #: set while the service is known to answer: a file succeeded since the start and
        #: since the last trouble (the small-file lane starts only then: ``wait_proven``)
        self._proven = anyio.Event()
        self._trial_at = -math.inf  # time.monotonic() the last trial was let through
        self._settled = anyio.Event()

    @property
    def left(self) -> float:
        """Seconds the hold still lasts (0 when there is none)."""
        return max(0.0, self.until - time.monotonic())

    def _settle(self) -> None:
        """The trial (if any) is over: wake the tasks waiting for its outcome."""
        self._trial_at = -math.inf
        self._settled.set()
        self._settled = anyio.Event()

    @property
    def proven(self) -> bool:
        """Whether a file succeeded since the start and since the last trouble."""
        return self._proven.is_set()

    async def wait_proven(self) -> None:
        """Return once the service is known to answer (see ``proven``)."""
        await self._proven.wait()

    def trouble(self, exc: InboxdError) -> None:
        """Start or extend the hold after ``exc`` (see the class docstring)."""
        self.suspect = True
        self._settle()
        if self._proven.is_set():
            self._proven = anyio.Event()
        now = time.monotonic()
        if self.until <= now:
            # Requests in flight together fail together: the hold grows once per hold (a
            # failed trial, a retry after it), not once per request that was in flight.
            self.failures += 1
        delay = max(
            backoff_delay(self.failures, self.base, self.cap, jitter="half"),
            bounded_wait(retry_after_of(exc), self.max_retry_after),
        )
        if now + delay <= self.until:
            return
        if self.until <= now:
            self._over = anyio.Event()
            self._begun.set()
        self.until = now + delay
        _log.warning(
            "service.unreachable",
            hold_seconds=round(delay, 2),
            reason=str(exc),
            action="nothing: uploads resume by themselves when the service answers; if it "
            "lasts, check the network and the service",
        )

    def succeeded(self) -> None:
        """A request went through: the next trouble starts small again, everyone may send."""
        self.failures = 0
        self._proven.set()
        if self.suspect:
            self.suspect = False
            self._settle()

    def end(self) -> None:
        """The service answers again: release everyone now."""
        self.until = 0.0
        self._over.set()
        self.suspect = False
        self._settle()

    async def wait(self) -> None:
        """Return once no hold is in force and this task may send: everyone, or after trouble
        that no success has cleared yet, one trial at a time (see the class docstring)."""
        while True:
            await self.wait_over()
            if not self.suspect:
                return
            now = time.monotonic()
            if now - self._trial_at >= self.trial_every:
                self._trial_at = now
                return  # this task is the trial
            settled = self._settled
            with anyio.move_on_after(self._trial_at + self.trial_every - now):
                await settled.wait()

    async def wait_over(self) -> None:
        """Return once no hold is in force (the timer only: for the probe and the poller)."""
        while (left := self.left) > 0:
            with anyio.move_on_after(left):
                await self._over.wait()

    async def wait_over_or(self, seconds: float) -> None:
        """Return when the hold ends, or after ``seconds``, whichever is first."""
        with anyio.move_on_after(seconds):
            await self._over.wait()

    async def begun(self) -> None:
        """Return when a hold begins (at once if one began since the last call)."""
        await self._begun.wait()
        self._begun = anyio.Event()


#: the hold of the service the current task talks to (set by the upload workers)
CURRENT_HOLD: ContextVar[ServiceHold | None] = ContextVar("inboxd_service_hold", default=None)


async def backoff(
    policy: RetryPolicy,
    attempt: int,
    exc: InboxdError,
    *,
    what: str,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> None:
    """Wait before try ``attempt + 1`` of ``what`` after ``exc``; log it and report it.

    Inside a worker (``CURRENT_HOLD`` set) service trouble also starts the hold of every
    worker, and the retry waits until that hold is over.
    """
    hold = CURRENT_HOLD.get()
    if hold is not None and is_service_trouble(exc):
        hold.trouble(exc)
    wait = policy.delay(attempt, retry_after_of(exc))
    # The message is ours and never holds a URL or token (see daemon.errors).
    _log.info("retry", step=what, attempt=attempt, wait=round(wait, 3), error=str(exc))
    if on_retry is not None:
        on_retry(exc.kind)
    await sleep(wait)
    if hold is not None:
        await hold.wait()


async def call(
    step: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    what: str,
    retry_if: Callable[[InboxdError], bool] | None = None,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> T:
    """Run ``step`` until it succeeds, a non-retryable error occurs, or attempts run out.

    ``retry_if`` narrows which retryable errors are retried here (e.g. leave expired URLs to the
    caller). The last error is re-raised unchanged, so callers see our exception types.
    """
    attempt = 1
    while True:
        try:
            return await step()
        except InboxdError as exc:
            if not exc.retryable or (retry_if is not None and not retry_if(exc)):
                raise
            if attempt >= policy.attempts:
                raise
            await backoff(policy, attempt, exc, what=what, on_retry=on_retry, sleep=sleep)
            attempt += 1
