"""SIGTERM/SIGINT that arrive before the service listens for them (no heavy imports here)."""

from __future__ import annotations

import signal

#: signals received before the service's own receiver was installed
early: list[int] = []


def catch_early_signals() -> None:
    """Record SIGTERM/SIGINT from now on; the service acts on them once it listens.

    systemd may stop a unit while it is still starting; without this the default action would
    kill the process mid-way instead of letting it stop cleanly (exit 0).
    """

    def record(signum: int, _frame: object) -> None:
        early.append(signum)

    signal.signal(signal.SIGTERM, record)
    signal.signal(signal.SIGINT, record)
