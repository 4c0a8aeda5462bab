"""Build the configured target (``[api] kind``) with its own HTTP client(s)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from daemon.client import MarpleClient
from daemon.config import Settings
from daemon.errors import ConfigError
from daemon.targets import Target
from daemon.upload import UploadOptions


@asynccontextmanager
async def open_target(settings: Settings, options: UploadOptions) -> AsyncIterator[Target]:
    """The target for ``settings.api.kind``; its connections close when the block ends."""
    kind = settings.api.kind
    if kind == "marple-db":
        from daemon.targets.marple_db import MarpleDbTarget

        async with MarpleClient.from_settings(settings.api) as client:
            yield MarpleDbTarget(
                client,
                options,
                on_name_clash=settings.upload.on_name_clash,
                plugin_args=settings.upload.plugin_args,
                batch_size=settings.poll.batch_size,
            )
        return
    raise ConfigError(f"api.kind = {kind!r}: not available in this build of inboxd")
