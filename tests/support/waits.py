"""Waiting on a condition: one blocking ``wait_for`` and one async ``wait_until``.

Tests wait on conditions with generous timeouts, never on fixed sleeps: a loaded machine
makes everything slower, and a condition that holds holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """A condition did not hold in time: a test failure (AssertionError) and a TimeoutError,
    so a helper starting a server can clean up on ``except TimeoutError``."""


def wait_for(
    cond: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str] = "a condition",
    step: float = 0.05,
) -> T:
    """Poll ``cond`` until it returns something truthy and return that; raise
    :class:`WaitTimeout` after ``timeout`` seconds. ``what`` names the awaited event in the
    message; a callable is called on timeout, so it can describe the state then."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {text}")
        time.sleep(step)


async def wait_until(cond: Callable[[], Any], timeout: float = 30.0, step: float = 0.05) -> Any:
    """Poll ``cond`` (sync or async) until truthy and return the value; fail after
    ``timeout`` seconds (anyio's TimeoutError)."""
    with anyio.fail_after(timeout):
        while True:
            value = cond()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await anyio.sleep(step)
