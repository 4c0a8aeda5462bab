"""Build the configured target (``[api] kind``) with its own HTTP client(s)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from daemon.config import Settings
from daemon.delivery import Target
from daemon.delivery.flow import UploadOptions
from daemon.delivery.marple_db.client import MarpleClient
from daemon.errors import ConfigError
from daemon.extras import require_for_kind


@asynccontextmanager
async def open_target(settings: Settings, options: UploadOptions) -> AsyncIterator[Target]:
    """The target for ``settings.api.kind``; its connections close when the block ends."""
    kind = settings.api.kind
    if kind == "marple-db":
        from daemon.delivery.marple_db.target import MarpleDbTarget

        async with MarpleClient.from_settings(settings.api, settings.upload) as client:
            yield MarpleDbTarget(
                client,
                options,
                on_name_clash=settings.upload.on_name_clash,
                plugin_args=settings.upload.plugin_args,
                batch_size=settings.poll.batch_size,
            )
        return
    if kind == "marple":
        from daemon.delivery.marple_legacy.target import MarpleLegacyTarget

        # The same [api] url and token; MarpleClient carries the transport and error mapping.
        async with MarpleClient.from_settings(settings.api, settings.upload) as client:
            yield MarpleLegacyTarget(
                client, options, settings.marple, batch_size=settings.poll.batch_size
            )
        return
    if kind == "data-service":
        require_for_kind(kind)  # authlib is an extra: one line naming it, not an ImportError
        from daemon.delivery.data_service.target import DataServiceTarget

        # Its own client: OAuth 1.0 signing, the version header and the call-rate limiter.
        async with DataServiceTarget.open(
            settings.api, settings.data_service, options, routes=settings.routes
        ) as target:
            yield target
        return
    raise ConfigError(f"api.kind = {kind!r}: not available in this build of inboxd")
