"""Bandwidth limits for PCs on shared or metered links: a global upload rate and time windows.

* :class:`RateLimiter` is one token bucket for the whole process. Every chunk read from disk for
  any upload (all workers, all parts, every mode) awaits :meth:`RateLimiter.consume` before it
  is sent, so the limit holds for the sum of everything in flight.
* :class:`UploadWindows` says when uploads may run at all (e.g. only ``19:00-07:00``); outside
  a window the workers wait and ``status`` says until when.

Config values are parsed with :func:`parse_rate` and :func:`parse_windows`, which raise
``ValueError`` with a message that names the accepted forms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Final

import anyio
import anyio.lowlevel

from daemon.compat import UTC

__all__ = [
    "RateLimiter",
    "UploadWindows",
    "Window",
    "format_rate",
    "parse_rate",
    "parse_windows",
]

# ---------------------------------------------------------------------------------------------
# Rate limit

#: A full bucket holds this many seconds' worth of bytes (see RateLimiter for why it is small).
BURST_SECONDS: Final = 0.1


class RateLimiter:
    """A token bucket shared by every upload in the process.

    ``bytes_per_second <= 0`` means unlimited: :meth:`consume` returns at once.

    Each call *reserves* its bytes at once, taking the bucket into debt if need be, and then
    sleeps until the debt it left behind has drained at ``bytes_per_second``. So:

    * a request larger than the burst simply waits proportionally (no deadlock, no splitting);
    * callers are served in call order: concurrent consumers interleave chunk by chunk and
      all progress;
    * the long-run rate is exact; the only excess is one ``burst`` after an idle period.

    ``burst`` (bytes a full bucket holds) defaults to :data:`BURST_SECONDS` of traffic. It need
    not hold a whole chunk because of the debt, and a small burst is what keeps a measurement
    over a few seconds within a few % of the setting (a burst of ``rate/4`` would add 8 % over
    3 s). The bucket starts full, so a lone small upload is never delayed.

    A consumer cancelled while waiting gives its reservation back (its bytes were not sent).
    Uses only anyio primitives; the clock is the event loop's (monotonic).
    """

    def __init__(self, bytes_per_second: float, *, burst: int | None = None) -> None:
        """A limiter at ``bytes_per_second`` (<= 0: unlimited) holding at most ``burst`` bytes."""
        if math.isnan(bytes_per_second):
            raise ValueError("bytes_per_second must be a number")
        if burst is not None and burst <= 0:
            raise ValueError(f"burst must be a positive number of bytes, not {burst}")
        self._rate = float(bytes_per_second) if math.isfinite(bytes_per_second) else 0.0
        if self._rate > 0:
            self._burst = float(burst) if burst is not None else self._rate * BURST_SECONDS
        else:
            self._burst = math.inf
        self._tokens = self._burst
        self._stamp: float | None = None  # loop time of the last refill; None until first use
        self._waiting = 0
        self._consumed = 0

    @property
    def rate(self) -> float:
        """Bytes per second; 0.0 when unlimited."""
        return self._rate

    @property
    def burst(self) -> float:
        """Bytes a full bucket holds (``inf`` when unlimited)."""
        return self._burst

    @property
    def unlimited(self) -> bool:
        """True when no limit is set."""
        return self._rate <= 0

    @property
    def waiting(self) -> int:
        """How many consumers are waiting right now (for status: "uploads are throttled")."""
        return self._waiting

    @property
    def consumed(self) -> int:
        """Total bytes let through since creation (for metrics)."""
        return self._consumed

    def _refill(self, now: float) -> None:
        if self._stamp is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def consume(self, n: int) -> None:
        """Wait until ``n`` more bytes may be sent, then return (they count as sent)."""
        if n <= 0:
            return
        if self._rate <= 0:
            self._consumed += n
            return
        # Yield once first, even when the bucket has room: otherwise a consumer whose chunks
        # fit in the burst would take them all back to back before its peers even ran.
        await anyio.lowlevel.checkpoint()
        # No await between the refill and the reservation: with one event loop thread that
        # makes the reservation atomic, so no lock is needed and the order is the call order.
        self._refill(anyio.current_time())
        self._tokens -= n
        self._consumed += n
        if self._tokens >= 0:
            return
        delay = -self._tokens / self._rate
        self._waiting += 1
        try:
            await anyio.sleep(delay)
        except BaseException:
            # Cancelled (or the loop is going away): these bytes will not be sent, so give
            # them back. Reservations made after ours keep their (now pessimistic) times;
            # the link is under-used for a moment, never over-used.
            self._refill(anyio.current_time())
            self._tokens = min(self._burst, self._tokens + n)
            self._consumed -= n
            raise
        finally:
            self._waiting -= 1


_RATE_RE: Final = re.compile(
    r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)\s*(?:/\s*s(?:ec)?)?\s*$",
    re.IGNORECASE,
)
_UNIT_RE: Final = re.compile(r"^(?P<prefix>ki|mi|gi|k|m|g)?(?P<kind>bytes?|b|bits?|bps)?$")
_PREFIX: Final = {
    None: 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
}
_RATE_FORMS: Final = (
    'a number of bytes per second (e.g. 500000), "0" for unlimited, or a number with a unit:'
    ' "500KB", "20MB", "1.5MiB", "1GB" (bytes; KiB/MiB/GiB are powers of 1024) or'
    ' "100Mbit", "100Mbps", "512kbit" (bits); case-insensitive, "/s" optional'
)


def parse_rate(text: str | int | float) -> float:
    """Bytes per second from a config value; 0.0 means unlimited.

    Plain numbers are bytes per second. Units (case-insensitive, optional ``/s``): ``K``/``KB``,
    ``M``/``MB``, ``G``/``GB`` (powers of 1000), ``KiB``/``MiB``/``GiB`` (powers of 1024), and
    ``kbit``/``Mbit``/``Gbit`` or ``kbps``/``Mbps``/``Gbps`` for *bits* per second.
    """
    if isinstance(text, bool):  # bool is an int; `rate = true` is a mistake, not 1 B/s
        raise ValueError(f"upload rate {text!r}: expected {_RATE_FORMS}")
    if isinstance(text, int | float):
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"upload rate {text!r}: expected {_RATE_FORMS}")
        return value
    match = _RATE_RE.match(text)
    unit = _UNIT_RE.match(match["unit"].lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"upload rate {text!r}: expected {_RATE_FORMS}")
    value = float(match["num"]) * _PREFIX[unit["prefix"]]
    if unit["kind"] in ("bit", "bits", "bps"):
        value /= 8
    return value


def format_rate(bytes_per_second: float) -> str:
    """A rate for people, e.g. ``"1.5 MiB/s"``; ``"unlimited"`` for <= 0."""
    if bytes_per_second <= 0:
        return "unlimited"
    value = float(bytes_per_second)
    for unit in ("B/s", "KiB/s", "MiB/s", "GiB/s"):
        if value < 1024 or unit == "GiB/s":
            return f"{value:.0f} {unit}" if unit == "B/s" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# Upload windows

_DAY: Final = 86_400
_WEEK: Final = 7 * _DAY
_US: Final = 1_000_000
_DAY_NAMES: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAY_ALIASES: Final = {
    **{name.lower(): i for i, name in enumerate(_DAY_NAMES)},
    **{
        full: i
        for i, full in enumerate(
            ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
        )
    },
    "tues": 1,
    "wednes": 2,
    "thur": 3,
    "thurs": 3,
}
_TIME_RANGE_RE: Final = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")
_WINDOW_FORMS: Final = (
    'expected "HH:MM-HH:MM", optionally after days, e.g. "19:00-07:00" (crosses midnight),'
    ' "Mon-Fri 19:00-07:00", "Sat,Sun 00:00-24:00"'
)


@dataclass(frozen=True)
class Window:
    """One parsed window: open from ``start`` to ``end`` minutes after midnight on ``days``.

    ``end <= start`` means it crosses midnight and closes on the next day; the days are the
    days it *opens* on ("Fri 22:00-06:00" runs from Friday night into Saturday morning).
    """

    days: frozenset[int]  # 0 = Monday … 6 = Sunday
    start: int  # minutes after midnight, 0..1439
    end: int  # minutes after midnight, 1..1440
    text: str  # normalised spec, for describe()

    def spans(self) -> list[tuple[int, int]]:
        """``[open, close)`` in seconds from Monday 00:00; close may pass the week's end."""
        length = (self.end - self.start) % (24 * 60) or 24 * 60
        return [
            (day * _DAY + self.start * 60, day * _DAY + (self.start + length) * 60)
            for day in sorted(self.days)
        ]


def _bad_window(spec: str, problem: str) -> ValueError:
    return ValueError(f"upload window {spec!r}: {problem}; {_WINDOW_FORMS}")


def _parse_days(spec: str, text: str) -> tuple[frozenset[int], str]:
    days: set[int] = set()
    canonical: list[str] = []
    for item in text.split(","):
        ends = item.split("-")
        if len(ends) > 2 or not all(ends):
            raise _bad_window(spec, f"cannot read the days {text!r}")
        try:
            first, last = (_DAY_ALIASES[end.lower()] for end in (ends[0], ends[-1]))
        except KeyError:
            raise _bad_window(
                spec, f"unknown day in {text!r} (use Mon, Tue, Wed, Thu, Fri, Sat, Sun)"
            ) from None
        # A range may wrap past Sunday: "Fri-Mon" is Fri, Sat, Sun, Mon.
        days.update((first + i) % 7 for i in range((last - first) % 7 + 1))
        canonical.append(_DAY_NAMES[first] + (f"-{_DAY_NAMES[last]}" if len(ends) == 2 else ""))
    return frozenset(days), ",".join(canonical)


def _parse_window(spec: str) -> Window:
    if not isinstance(spec, str):
        raise ValueError(f"upload window {spec!r}: must be a string; {_WINDOW_FORMS}")
    # Tolerate spaces around "-" and ",": "Mon - Fri 19:00 - 07:00".
    text = re.sub(r"\s*([-,])\s*", r"\1", spec.strip())
    parts = text.split()
    if not parts or len(parts) > 2:
        raise _bad_window(spec, "expected at most one day list and one time range")
    days, day_text = _parse_days(spec, parts[0]) if len(parts) == 2 else (frozenset(range(7)), "")
    match = _TIME_RANGE_RE.match(parts[-1])
    if match is None:
        raise _bad_window(spec, f"cannot read the time range {parts[-1]!r}")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    for hours, minutes in ((h1, m1), (h2, m2)):
        if minutes > 59 or hours > 24 or (hours == 24 and minutes != 0):
            raise _bad_window(spec, f"{hours:02d}:{minutes:02d} is not a time of day")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == 24 * 60:
        raise _bad_window(spec, "a window cannot start at 24:00 (use 00:00)")
    if start == end:
        raise _bad_window(spec, "the window is empty (start equals end)")
    if end == 0:
        end = 24 * 60  # "19:00-00:00" closes at midnight, same as "19:00-24:00"
    times = f"{start // 60:02d}:{start % 60:02d}-{h2:02d}:{m2:02d}"
    return Window(days, start, end, f"{day_text} {times}".strip())


class UploadWindows:
    """When uploads may run, in the machine's local wall-clock time.

    Specs: ``"19:00-07:00"`` (every day, crossing midnight), ``"Mon-Fri 19:00-07:00"``,
    ``"Sat,Sun 00:00-24:00"``. A window that crosses midnight belongs to the day it opens on.
    An empty list means always open.

    Times are compared as naive wall-clock times: an aware ``now`` is first converted to
    ``tz`` (default: the system's local zone; the systemd unit runs with it), a naive ``now``
    is taken as local wall-clock time already. Across a DST change a window opens when the wall
    clock shows its start; if that time does not exist that day, it opens up to an hour late
    (the worst case, and no loop is needed to find it). Callers should re-check at least every
    minute or so (see :meth:`wait_open`) so clock and zone changes are noticed.
    """

    def __init__(self, specs: Sequence[str], *, tz: tzinfo | None = None) -> None:
        """Parse ``specs``; raises ValueError naming the bad one and the accepted forms."""
        if isinstance(specs, str):
            specs = [specs]  # a lone string is one window, not a sequence of characters
        self._windows = tuple(_parse_window(spec) for spec in specs)
        self._tz = tz
        self._spans = sorted(
            (opens * _US, closes * _US)
            for window in self._windows
            for opens, closes in window.spans()
        )

    @property
    def windows(self) -> tuple[Window, ...]:
        """The parsed windows, in the order given."""
        return self._windows

    @property
    def always_open(self) -> bool:
        """True when no window is configured."""
        return not self._windows

    def describe(self) -> str:
        """The windows for people, e.g. ``"19:00-07:00"`` or ``"always"``."""
        if not self._windows:
            return "always"
        return ", ".join(window.text for window in self._windows)

    def __repr__(self) -> str:
        return f"UploadWindows({self.describe()!r})"

    def _wall(self, now: datetime) -> datetime:
        if now.tzinfo is None:
            return now
        return now.astimezone(self._tz).replace(tzinfo=None)

    @staticmethod
    def _week_us(wall: datetime) -> int:
        # Whole microseconds: float seconds could put next_open a microsecond early.
        seconds = wall.weekday() * _DAY + wall.hour * 3600 + wall.minute * 60 + wall.second
        return seconds * _US + wall.microsecond

    def _wall_delay(self, wall: datetime) -> int:
        """Wall-clock microseconds from ``wall`` until a window is open; 0 if one is."""
        if not self._spans:
            return 0
        t = self._week_us(wall)
        best = _WEEK * _US
        for opens, closes in self._spans:
            # The span may be the one that began last week and runs into this one.
            if opens <= t < closes or opens <= t + _WEEK * _US < closes:
                return 0
            best = min(best, (opens - t) % (_WEEK * _US))
        return best

    def _until_open(self, now: datetime) -> timedelta:
        wall = self._wall(now)
        delay = timedelta(microseconds=self._wall_delay(wall))
        if not delay or now.tzinfo is None:
            return delay
        # Aware: turn the wall-clock opening into an instant, which accounts for a DST change
        # in between. A non-existent wall time (spring forward) maps past the gap (fold=0);
        # an ambiguous or odd answer that is not in the future falls back to wall time.
        opening = (wall + delay).replace(tzinfo=self._tz)
        if self._tz is None:
            opening = opening.astimezone()  # naive → the system's local zone
        # Via UTC: Python subtracts two datetimes sharing a tzinfo as wall-clock times.
        real = opening.astimezone(UTC) - now.astimezone(UTC)
        return real if real > timedelta(0) else delay

    def is_open(self, now: datetime) -> bool:
        """Whether uploads may run at ``now``."""
        return self._wall_delay(self._wall(now)) == 0

    def seconds_until_open(self, now: datetime) -> float:
        """Real seconds from ``now`` until a window opens; 0.0 if one is open now.

        Always > 0 when closed, so a caller that sleeps this long never spins.
        """
        return self._until_open(now).total_seconds()

    def next_open(self, now: datetime) -> datetime:
        """When uploads may next run: ``now`` itself if a window is open.

        Naive in, naive wall-clock time out; aware in, aware out (in ``now``'s zone).
        """
        delay = self._until_open(now)
        if not delay:
            return now
        if now.tzinfo is None:
            return now + delay
        # Aware datetimes add in real time once in UTC.
        return (now.astimezone(UTC) + delay).astimezone(now.tzinfo)

    async def wait_open(
        self,
        now: Callable[[], datetime] | None = None,
        *,
        max_sleep: float = 60.0,
        on_wait: Callable[[datetime], None] | None = None,
    ) -> None:
        """Return once a window is open (at once if one is).

        Sleeps in steps of at most ``max_sleep`` seconds and re-checks, so a clock, zone or
        suspend/resume change is noticed. ``on_wait(next_open)`` is called before each sleep
        (e.g. to tell ``status`` that uploads wait for a window).
        """
        clock = now if now is not None else _aware_now
        while True:
            current = clock()
            delay = self.seconds_until_open(current)
            if delay <= 0:
                return
            if on_wait is not None:
                on_wait(self.next_open(current))
            await anyio.sleep(min(delay, max_sleep))


def _aware_now() -> datetime:
    return datetime.now().astimezone()


def parse_windows(specs: Sequence[str] | str | None) -> UploadWindows:
    """:class:`UploadWindows` from a config value (None or empty: always open)."""
    if specs is None:
        return UploadWindows([])
    return UploadWindows(specs)
