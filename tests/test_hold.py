"""The outage hold of every worker (``daemon.retry.ServiceHold``): after a hold runs out by
itself, one task at a time tries (a trial) until a request succeeds, so dozens of files in
flight do not all send their retry in the same instant."""

from __future__ import annotations

import time

import anyio
from anyio.abc import TaskGroup

from daemon.errors import TransportError
from daemon.retry import ServiceHold


def _hold(trial_every: float = 0.5) -> ServiceHold:
    return ServiceHold(base=0.1, cap=0.1, max_retry_after=1.0, trial_every=trial_every)


def _start_waiters(tg: TaskGroup, hold: ServiceHold, n: int, through: list[int]) -> None:
    """``n`` tasks that each wait for the hold, then note their number in ``through``."""

    async def waiter(i: int) -> None:
        await hold.wait()
        through.append(i)

    for i in range(n):
        tg.start_soon(waiter, i)


async def _passed_within(hold: ServiceHold, n: int, seconds: float) -> list[int]:
    """Start ``n`` waiters; which of them got through ``hold.wait()`` within ``seconds``."""
    through: list[int] = []
    async with anyio.create_task_group() as tg:
        _start_waiters(tg, hold, n, through)
        await anyio.sleep(seconds)
        tg.cancel_scope.cancel()
    return through


async def test_no_trouble_no_waiting() -> None:
    assert len(await _passed_within(_hold(), 10, 0.05)) == 10


async def test_after_the_hold_one_trial_then_everyone_once_it_succeeds() -> None:
    hold = _hold(trial_every=5.0)
    hold.trouble(TransportError("no answer"))
    started = time.monotonic()
    through: list[int] = []
    async with anyio.create_task_group() as tg:
        _start_waiters(tg, hold, 10, through)
        with anyio.fail_after(5):
            while not through:
                await anyio.sleep(0.01)
        assert time.monotonic() - started >= 0.04  # the hold (0.05-0.1 s) came first
        await anyio.sleep(0.2)
        assert len(through) == 1  # the trial alone
        hold.succeeded()
        with anyio.fail_after(5):
            while len(through) < 10:
                await anyio.sleep(0.01)


async def test_a_failed_trial_holds_again_and_a_silent_one_times_out() -> None:
    hold = _hold(trial_every=0.3)
    hold.trouble(TransportError("no answer"))
    # Over 0.55 s: the first trial after the hold (~0.1 s), a second once trial_every passed
    # (~0.4 s), a third not yet (~0.7 s).
    assert len(await _passed_within(hold, 10, 0.55)) == 2
    hold.trouble(TransportError("still no answer"))  # the trial failed: a new hold
    assert hold.left > 0
    assert await _passed_within(hold, 10, 0.04) == []


async def test_a_probe_that_finds_the_service_back_releases_everyone() -> None:
    hold = _hold(trial_every=60.0)
    hold.trouble(TransportError("no answer"))
    through: list[int] = []
    async with anyio.create_task_group() as tg:
        _start_waiters(tg, hold, 10, through)
        await anyio.sleep(0.01)
        hold.end()
        with anyio.fail_after(5):
            while len(through) < 10:
                await anyio.sleep(0.01)
    # The timer part alone (the probe's and the poller's wait) never gates.
    hold.trouble(TransportError("again"))
    with anyio.fail_after(5):
        await hold.wait_over()
    assert hold.suspect


async def test_proven_once_a_file_succeeds_and_until_the_next_trouble() -> None:
    hold = _hold()
    assert not hold.proven  # at start-up nothing is known about the service
    hold.succeeded()
    assert hold.proven
    with anyio.fail_after(1):
        await hold.wait_proven()
    hold.trouble(TransportError("no answer"))
    assert not hold.proven
    with anyio.move_on_after(0.2) as scope:
        await hold.wait_proven()
    assert scope.cancelled_caught
    hold.end()  # a probe answered: the service is back, but no file went through yet
    assert not hold.proven
    hold.succeeded()
    assert hold.proven
