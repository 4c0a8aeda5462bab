"""Stream references (ids or names) resolved against the server, once, lazily.

The daemon must start while the API is unreachable: numeric ids need no lookup to be queued,
and a worker asks for the full stream (its datapool) only when it uploads, so an outage only
delays uploads. Names are resolved on first use.
"""

from __future__ import annotations

import anyio

from daemon.delivery.marple_db.client import MarpleClient, Stream
from daemon.errors import NotFoundError


class StreamDirectory:
    """A cache of ``GET /streams``, refreshed when an unknown id or name is asked for."""

    def __init__(self, client: MarpleClient) -> None:
        self._client = client
        self._by_id: dict[int, Stream] = {}
        self._lock = anyio.Lock()

    async def _refresh(self) -> None:
        streams = await self._client.streams()
        self._by_id = {s.id: s for s in streams}

    async def refresh(self) -> None:
        """Read ``GET /streams`` again (raises our errors when the API does not answer)."""
        async with self._lock:
            await self._refresh()

    async def get(self, stream_id: int) -> Stream:
        """The stream with this id; NotFoundError when the server (for this token) has none."""
        known = self._by_id.get(stream_id)
        if known is not None:
            return known  # every file asks: no lock (and no event-loop turn) when cached
        async with self._lock:
            if stream_id not in self._by_id:
                await self._refresh()
            stream = self._by_id.get(stream_id)
        if stream is None:
            raise NotFoundError(
                f"stream {stream_id} does not exist or this token cannot see it",
                endpoint="GET /streams",
                advice="fix the stream in [upload] or [[routes]], then `inboxd retry --all-failed`",
            )
        return stream

    async def resolve(self, ref: int | str) -> int:
        """The id for a configured reference; a numeric one needs no network."""
        if isinstance(ref, int):
            return ref
        if ref.strip().isdigit():
            return int(ref)
        wanted = ref.strip().casefold()
        async with self._lock:
            for s in self._by_id.values():
                if s.name.casefold() == wanted:
                    return s.id
            stream = await self._client.resolve_stream(ref)
            self._by_id[stream.id] = stream
            return stream.id
