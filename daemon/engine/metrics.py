"""What the engine counts, as an interface the engine owns.

The service's :class:`daemon.service.metrics.Metrics` (prometheus_client) implements it; the
workers and the poller take any such object, so the engine imports nothing from the service.
"""

from __future__ import annotations

from typing import Protocol


class EngineMetrics(Protocol):
    """The counters the workers and the poller move."""

    def upload_succeeded(self, size: int, seconds: float) -> None:
        """A file was delivered: ``size`` bytes in ``seconds``."""

    def retried(self, reason: str) -> None:
        """A job goes back to the queue for another attempt (``reason``: the error kind)."""

    def failed(self, reason: str) -> None:
        """A job ended failed (``reason``: the error kind)."""

    def import_finished(self, ok: bool) -> None:
        """The server finished importing a delivered file (``ok``: it succeeded)."""

    def set_upload_window_open(self, is_open: bool) -> None:
        """Uploads are inside (True) or outside (False) the configured upload windows."""
