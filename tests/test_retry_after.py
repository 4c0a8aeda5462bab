"""``Retry-After`` is read once, whatever a server sends, and bounded by one cap."""

from __future__ import annotations

import pytest

from daemon.retry import RETRY_AFTER_CEILING, RetryPolicy, backoff_delay, parse_retry_after

NOW = 1_800_000_000.0  # 2027-01-15


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 1.5 ", 1.5),
        ("-5", 0.0),
        ("0", 0.0),
        ("inf", RETRY_AFTER_CEILING),
        ("1e400", RETRY_AFTER_CEILING),
        ("Fri, 31 Dec 9999 23:59:59 GMT", RETRY_AFTER_CEILING),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
        ("Fri, 15 Jan 2027 08:00:30 GMT", 30.0),
        ("nan", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    got = parse_retry_after(header, now=NOW)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("retry_after", "wait"), [(None, 0.0), (-1.0, 0.0), (10.0, 10.0), (86400.0, 300.0)]
)
def test_the_policy_caps_what_a_server_asks(retry_after: float | None, wait: float) -> None:
    assert RetryPolicy(max_retry_after=300.0).server_wait(retry_after) == wait
    # A step waits at least what was asked (capped), whatever its own backoff says.
    assert RetryPolicy(base=0.0001, cap=0.0001).delay(1, retry_after) >= wait


def test_one_backoff_formula_doubles_up_to_the_cap_with_its_jitter() -> None:
    # No jitter: exactly base * 2**(attempt-1), then the cap (the poller's and watcher's loops).
    assert [backoff_delay(n, 0.1, 1.0, jitter="none") for n in range(1, 7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    )
    assert backoff_delay(10_000, 0.5, 60.0, jitter="none") == 60.0  # no overflow, capped
    for attempt, ceiling in [(1, 0.5), (3, 2.0), (9, 60.0)]:
        full = [backoff_delay(attempt, 0.5, 60.0, jitter="full") for _ in range(200)]
        half = [backoff_delay(attempt, 0.5, 60.0, jitter="half") for _ in range(200)]
        assert all(0 <= d <= ceiling for d in full) and min(full) < ceiling / 2
        assert all(ceiling / 2 <= d <= ceiling for d in half) and len(set(half)) > 1
    # The step policy is this formula with full jitter.
    assert all(RetryPolicy(base=0.5, cap=60.0).delay(3) <= 2.0 for _ in range(50))
