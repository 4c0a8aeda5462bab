"""Bandwidth limits: rate parsing, the shared token bucket on a real clock, upload windows,
and the rate limit measured over a real upload to the sandbox."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.delivery.files import FileRef
from daemon.delivery.flow import UploadOptions
from daemon.delivery.marple_db.client import MarpleClient, Stream
from daemon.delivery.marple_db.upload import UploadRequest, upload_file
from daemon.net.bandwidth import (
    BURST_SECONDS,
    RateLimiter,
    UploadWindows,
    format_rate,
    parse_rate,
    parse_windows,
)
from daemon.retry import RetryPolicy
from daemon.sandbox import Sandbox
from tests.support.data import MiB, write_file

KiB = 1024

# ---------------------------------------------------------------------------------------------
# parse_rate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0.0),
        (0, 0.0),
        (0.0, 0.0),
        (1500, 1500.0),
        (2.5, 2.5),
        ("1500", 1500.0),
        (" 1500 ", 1500.0),
        ("1500/s", 1500.0),
        ("1500 B/s", 1500.0),
        ("500KB", 500_000.0),
        ("500kb", 500_000.0),
        ("500 KB/s", 500_000.0),
        ("500K", 500_000.0),
        ("20MB", 20_000_000.0),
        ("20mb/sec", 20_000_000.0),
        ("1GB", 1e9),
        ("1.5MiB", 1.5 * MiB),
        ("1.5mib/s", 1.5 * MiB),
        ("64KiB", 64 * KiB),
        ("2GiB", 2 * 1024**3),
        ("100Mbit", 100e6 / 8),
        ("100mbit/s", 100e6 / 8),
        ("100Mbps", 100e6 / 8),
        ("100 MBPS", 100e6 / 8),
        ("512kbit", 512e3 / 8),
        ("1Gbps", 1e9 / 8),
        ("800bit", 100.0),
        (".5MB", 500_000.0),
    ],
)
def test_parse_rate_accepts(text: str | int | float, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["", "fast", "-1", -5, "10 parsecs", "1e6", "MB", "5 MB/h", "1,5MB", True, float("nan")]
)
def test_parse_rate_rejects_with_the_accepted_forms(text: str | int | float) -> None:
    with pytest.raises(ValueError, match=r"upload rate .*20MB.*100Mbit") as info:
        parse_rate(text)
    assert "unlimited" in str(info.value)


def test_format_rate() -> None:
    assert format_rate(0) == "unlimited"
    assert format_rate(500) == "500 B/s"
    assert format_rate(1.5 * MiB) == "1.5 MiB/s"
    assert format_rate(parse_rate("100Mbit")) == "11.9 MiB/s"


# ---------------------------------------------------------------------------------------------
# RateLimiter on the real clock


async def test_unlimited_never_waits() -> None:
    limiter = RateLimiter(0)
    assert limiter.unlimited
    start = time.monotonic()
    for _ in range(1000):
        await limiter.consume(100 * MiB)
    assert time.monotonic() - start < 0.5
    assert limiter.consumed == 1000 * 100 * MiB


def test_bad_burst_is_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(1000, burst=0)


async def test_default_burst_is_a_tenth_of_a_second() -> None:
    limiter = RateLimiter(2 * MiB)
    assert limiter.burst == pytest.approx(2 * MiB * BURST_SECONDS)
    # A full bucket lets a small first chunk through at once.
    start = time.monotonic()
    await limiter.consume(100 * KiB)
    assert time.monotonic() - start < 0.05


async def test_request_larger_than_the_burst_waits_proportionally() -> None:
    limiter = RateLimiter(1 * MiB, burst=64 * KiB)
    start = time.monotonic()
    await limiter.consume(512 * KiB)  # 8x the burst: must not deadlock
    elapsed = time.monotonic() - start
    expected = (512 - 64) / 1024
    assert expected * 0.9 < elapsed < expected * 1.1 + 0.05


async def test_concurrent_consumers_share_the_rate_and_all_progress() -> None:
    rate = 2 * MiB
    limiter = RateLimiter(rate)
    # Different chunk sizes, 1 MiB (the client's chunk) included.
    chunk_sizes = [64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB]
    per_consumer = 1 * MiB
    grants: dict[int, list[float]] = {i: [] for i in range(len(chunk_sizes))}
    timeline: list[tuple[float, int]] = []

    async def consumer(index: int, chunk: int) -> None:
        sent = 0
        while sent < per_consumer:
            await limiter.consume(chunk)
            sent += chunk
            now = time.monotonic() - start
            grants[index].append(now)
            timeline.append((now, chunk))

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for i, chunk in enumerate(chunk_sizes):
            tg.start_soon(consumer, i, chunk)
    elapsed = time.monotonic() - start

    total = per_consumer * len(chunk_sizes)
    expected = (total - limiter.burst) / rate  # ≈ 2.45 s
    assert abs(elapsed - expected) / expected < 0.10, (elapsed, expected)
    measured = total / elapsed
    assert abs(measured - rate) / rate < 0.10, measured
    # Steady state: what went through in the second second is the rate, give or take the
    # granularity of one 1 MiB chunk (each entry is recorded when its wait ends).
    in_second = sum(n for t, n in timeline if 1.0 <= t < 2.0)
    assert abs(in_second - rate) <= 1 * MiB + 0.1 * rate, in_second
    # Served in call order, one request each in turn: every consumer gets its first chunk
    # within the first round (all chunk sizes once ≈ 1 s) and is still sending in the first
    # half, whatever its chunk size; nobody is starved until the others are done.
    round_seconds = sum(chunk_sizes) / rate
    assert all(g[0] < round_seconds + 0.1 for g in grants.values()), grants
    assert all(any(t < elapsed / 2 for t in g) for g in grants.values()), grants
    assert limiter.consumed == total
    assert limiter.waiting == 0


async def test_equal_consumers_finish_together() -> None:
    rate = 4 * MiB
    limiter = RateLimiter(rate)
    finished: list[float] = []

    async def consumer() -> None:
        for _ in range(8):
            await limiter.consume(128 * KiB)
        finished.append(time.monotonic() - start)

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(consumer)
    # 4 MiB at 4 MiB/s ≈ 1 s: interleaved, the first one finishes close to the last.
    assert min(finished) > 0.75 * max(finished), finished


async def test_cancelled_consumer_gives_its_bytes_back() -> None:
    limiter = RateLimiter(1 * MiB, burst=64 * KiB)
    await limiter.consume(64 * KiB)  # empty the bucket
    with anyio.move_on_after(0.05):
        await limiter.consume(10 * MiB)  # would wait ~10 s
    assert limiter.waiting == 0
    start = time.monotonic()
    await limiter.consume(32 * KiB)  # only its own ~31 ms (the bucket refilled meanwhile)
    assert time.monotonic() - start < 0.1
    assert limiter.consumed == 96 * KiB


# ---------------------------------------------------------------------------------------------
# Upload windows (2024-01-01 is a Monday)


def at(day: int, hh: int, mm: int = 0) -> datetime:
    """A naive local time on Monday 2024-01-01 + ``day`` days."""
    return datetime(2024, 1, 1 + day, hh, mm)


MON, TUE, WED, THU, FRI, SAT, SUN = range(7)


def test_no_windows_is_always_open() -> None:
    windows = parse_windows([])
    assert windows.always_open
    assert windows.is_open(at(MON, 12))
    assert windows.next_open(at(MON, 12)) == at(MON, 12)
    assert windows.seconds_until_open(at(MON, 12)) == 0.0
    assert windows.describe() == "always"
    assert parse_windows(None).always_open


def test_window_across_midnight() -> None:
    windows = parse_windows(["19:00-07:00"])
    assert windows.describe() == "19:00-07:00"
    assert windows.is_open(at(MON, 19))
    assert windows.is_open(at(MON, 23, 59))
    assert windows.is_open(at(TUE, 0))
    assert windows.is_open(at(TUE, 6, 59))
    assert not windows.is_open(at(TUE, 7))
    assert not windows.is_open(at(TUE, 18, 59))
    # Sunday night runs into Monday morning (across the week boundary too).
    assert windows.is_open(at(MON, 3))
    assert windows.next_open(at(TUE, 12)) == at(TUE, 19)
    assert windows.seconds_until_open(at(TUE, 12)) == 7 * 3600
    assert windows.next_open(at(TUE, 20)) == at(TUE, 20)


def test_a_lone_string_is_one_window() -> None:
    assert parse_windows("19:00-07:00").describe() == "19:00-07:00"


def test_weekday_windows_belong_to_the_day_they_open() -> None:
    windows = parse_windows(["Mon-Fri 19:00-07:00"])
    assert windows.describe() == "Mon-Fri 19:00-07:00"
    assert windows.is_open(at(FRI, 22))
    assert windows.is_open(at(SAT, 6))  # Friday's window
    assert not windows.is_open(at(SAT, 20))
    assert not windows.is_open(at(SUN, 22))
    assert not windows.is_open(at(MON, 3))  # no window opened on Sunday
    assert windows.next_open(at(SAT, 8)) == at(MON + 7, 19)
    assert windows.next_open(at(MON, 3)) == at(MON, 19)


def test_weekend_all_day_plus_weeknights() -> None:
    windows = parse_windows(["Sat,Sun 00:00-24:00", "mon - fri 19:00-07:00"])
    assert windows.describe() == "Sat,Sun 00:00-24:00, Mon-Fri 19:00-07:00"
    for t in (at(SAT, 0), at(SAT, 12), at(SUN, 23, 59), at(FRI, 23), at(TUE, 6)):
        assert windows.is_open(t), t
    for t in (at(MON, 6), at(WED, 12), at(FRI, 18, 59)):
        assert not windows.is_open(t), t
    assert windows.next_open(at(FRI, 12)) == at(FRI, 19)


def test_day_range_may_wrap_and_take_full_names() -> None:
    windows = parse_windows(["Friday-Monday 09:00-17:00"])
    assert windows.describe() == "Fri-Mon 09:00-17:00"
    assert [windows.is_open(at(d, 10)) for d in range(7)] == [
        True,
        False,
        False,
        False,
        True,
        True,
        True,
    ]
    assert windows.next_open(at(TUE, 10)) == at(FRI, 9)


def test_window_ending_at_midnight() -> None:
    windows = parse_windows(["22:00-00:00"])
    assert windows.is_open(at(MON, 23, 59))
    assert not windows.is_open(at(TUE, 0))
    assert windows.next_open(at(TUE, 0)) == at(TUE, 22)


def test_seconds_are_respected() -> None:
    windows = parse_windows(["19:00-07:00"])
    almost = at(MON, 18, 59) + timedelta(seconds=59.5)
    assert not windows.is_open(almost)
    assert windows.seconds_until_open(almost) == pytest.approx(0.5)


WINDOW_SETS = [
    ["19:00-07:00"],
    ["Mon-Fri 19:00-07:00", "Sat,Sun 00:00-24:00"],
    ["Sun 23:30-00:30"],
    ["Wed 12:00-12:01", "Fri-Mon 22:00-06:00"],
    ["00:00-24:00"],
]


@settings(max_examples=300, deadline=None)
@given(
    specs=st.sampled_from(WINDOW_SETS),
    now=st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2025, 12, 31)),
)
def test_next_open_is_the_first_open_moment(specs: list[str], now: datetime) -> None:
    windows = parse_windows(specs)
    opens = windows.next_open(now)
    assert windows.is_open(opens)
    assert (opens == now) == windows.is_open(now)
    assert windows.seconds_until_open(now) == (opens - now).total_seconds()
    if opens > now:
        tick = timedelta(microseconds=1)
        assert not windows.is_open(opens - tick)
        # Nothing in between is open either (sampled).
        for fraction in (0.25, 0.5, 0.75):
            assert not windows.is_open(now + (opens - now) * fraction)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("25:00-07:00", "25:00 is not a time of day"),
        ("19:60-20:00", "19:60 is not a time of day"),
        ("24:30-07:00", "not a time of day"),
        ("24:00-07:00", "cannot start at 24:00"),
        ("19-07", "cannot read the time range '19-07'"),
        ("19:00", "cannot read the time range"),
        ("19:00-19:00", "empty"),
        ("00:00-00:00", "empty"),
        ("Mon-Fri", "cannot read the time range"),
        ("Funday 19:00-07:00", "unknown day"),
        ("Mon--Fri 19:00-07:00", "cannot read the days"),
        ("Mon Fri 19:00-07:00", "at most one day list"),
        ("", "at most one day list"),
    ],
)
def test_bad_windows_are_refused_clearly(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match="HH:MM-HH:MM") as info:
        parse_windows([spec])
    message = str(info.value)
    assert problem in message
    assert repr(spec) in message


def test_a_non_string_window_is_refused() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_windows([1900])  # type: ignore[list-item]


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError:  # pragma: no cover - depends on the machine's tz database
        pytest.skip(f"time zone {name} is not installed")


def test_aware_times_are_read_in_the_given_zone() -> None:
    berlin = _zone("Europe/Berlin")
    windows = UploadWindows(["19:00-07:00"], tz=berlin)
    utc = ZoneInfo("UTC")
    # 17:30 UTC is 18:30 in Berlin in winter: closed, opens at 19:00 Berlin = 18:00 UTC.
    now = datetime(2024, 1, 10, 17, 30, tzinfo=utc)
    assert not windows.is_open(now)
    assert windows.seconds_until_open(now) == 1800
    opens = windows.next_open(now)
    assert opens == datetime(2024, 1, 10, 18, 0, tzinfo=utc)
    assert opens.tzinfo is utc
    assert windows.is_open(datetime(2024, 1, 10, 18, 0, tzinfo=utc))


def test_dst_spring_forward_counts_real_seconds_and_never_spins() -> None:
    berlin = _zone("Europe/Berlin")
    # 2024-03-31: 02:00 CET → 03:00 CEST; 01:00 → 08:00 wall is 7 h but only 6 h real.
    windows = UploadWindows(["08:00-09:00"], tz=berlin)
    now = datetime(2024, 3, 31, 1, 0, tzinfo=berlin)
    assert windows.seconds_until_open(now) == 6 * 3600
    assert windows.next_open(now) == datetime(2024, 3, 31, 8, 0, tzinfo=berlin)
    # A window starting inside the skipped hour opens right after it (at the latest 1 h late).
    gap = UploadWindows(["02:30-04:00"], tz=berlin)
    wait = gap.seconds_until_open(now)
    assert 0 < wait <= 2.5 * 3600
    assert gap.is_open(gap.next_open(now))


def test_dst_fall_back_never_returns_a_past_opening() -> None:
    berlin = _zone("Europe/Berlin")
    # 2024-10-27: 03:00 CEST → 02:00 CET; 02:30 happens twice. In the second pass (fold=1)
    # the window's 02:45 as fold=0 would be in the past: the answer must still be > 0.
    windows = UploadWindows(["02:45-03:00"], tz=berlin)
    second_pass = datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=berlin)
    wait = windows.seconds_until_open(second_pass)
    assert wait == 15 * 60
    assert windows.is_open(windows.next_open(second_pass))


async def test_wait_open_sleeps_in_steps_and_reports_the_opening() -> None:
    windows = parse_windows(["19:00-07:00"])
    fake = [at(MON, 18, 59) + timedelta(seconds=59.9)]
    told: list[datetime] = []

    def clock() -> datetime:
        value = fake[0]
        fake[0] = value + timedelta(seconds=0.05)  # each look moves the clock on
        return value

    with anyio.fail_after(2):
        await windows.wait_open(clock, max_sleep=0.01, on_wait=told.append)
    assert told and told[0] == at(MON, 19)
    assert windows.is_open(fake[0])
    # Open: returns at once without calling on_wait.
    told.clear()
    await windows.wait_open(lambda: at(MON, 20), on_wait=told.append)
    assert told == []


# ---------------------------------------------------------------------------------------------
# The rate limit over a real upload to the sandbox


async def test_rate_limit_holds_over_a_real_multipart_upload(
    sandbox: Sandbox, client_factory: Callable[[], MarpleClient], tmp_path: Path
) -> None:
    rate = 1 * MiB
    size = 3 * MiB
    path = tmp_path / "metered.mf4"
    data = write_file(path, size, seed=42)
    limiter = RateLimiter(rate)
    called: list[float] = []
    granted: list[float] = []

    async def throttle(n: int) -> None:
        called.append(time.monotonic())
        await limiter.consume(n)
        granted.append(time.monotonic())

    options = UploadOptions(
        policy=RetryPolicy(attempts=3, base=0.01, cap=0.1),
        part_concurrency=3,
        throttle=throttle,
        abort_on_give_up=True,
    )
    request = UploadRequest(
        file=FileRef.stat(path),
        dataset_name=path.name,
        stream=Stream(id=1, name="inbox", datapool="default"),
        metadata={},
        upload_key=uuid.uuid4().hex,
    )
    async with client_factory() as client:
        start = time.monotonic()
        result = await upload_file(client, request, options=options)
        elapsed = time.monotonic() - start

    assert result.mode == "multipart"
    assert sandbox.dataset_bytes(result.dataset_id) == data
    assert limiter.consumed == size  # every byte went through the limiter once
    expected = (size - limiter.burst) / rate  # a full bucket's burst goes at once
    # The whole upload, API calls included, never went faster than the rate allows (how much
    # slower it is depends on the machine's load: that is the benchmarks' business)...
    assert elapsed > expected * 0.95, (elapsed, expected)
    # ...and the limiter itself, from the first chunk asked for to the last one let through,
    # within 5 %.
    throttled = granted[-1] - called[0]
    assert abs(throttled - expected) / expected < 0.05, (throttled, expected)
