"""The one retry policy: exponential backoff with full jitter, a cap, and ``Retry-After``.

Steps are retried, not whole jobs: each call site wraps exactly one request whose repetition
is known to be safe (see the table in ``daemon.client``).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio
import structlog

from daemon.config import RetrySettings
from daemon.errors import InboxdError

T = TypeVar("T")
_log = structlog.get_logger(__name__)


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
        return cls(attempts=r.attempts, base=r.base_seconds, cap=r.cap_seconds)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 1).

        Full jitter (uniform in [0, min(cap, base * 2**(attempt-1))]) spreads clients that failed
        together; a server's ``Retry-After`` is a floor, itself bounded by ``max_retry_after``.
        """
        ceiling = min(self.cap, self.base * (2 ** max(attempt - 1, 0)))
        wait = random.uniform(0, ceiling)
        if retry_after is not None and retry_after > 0:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


def retry_after_of(exc: BaseException) -> float | None:
    """The server-requested wait carried by ``exc``, if any."""
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


#: told the error ``kind`` of every retry (metrics count retries by reason)
OnRetry = Callable[[str], None]


async def backoff(
    policy: RetryPolicy,
    attempt: int,
    exc: InboxdError,
    *,
    what: str,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> None:
    """Wait before try ``attempt + 1`` of ``what`` after ``exc``; log it and report it."""
    wait = policy.delay(attempt, retry_after_of(exc))
    # The message is ours and never holds a URL or token (see daemon.errors).
    _log.info("retry", step=what, attempt=attempt, wait=round(wait, 3), error=str(exc))
    if on_retry is not None:
        on_retry(exc.kind)
    await sleep(wait)


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
