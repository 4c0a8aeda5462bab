"""Disk helpers for the local storage: streamed writes with atomic publish, and assembly.

Request bodies arrive in small chunks on the event loop. Writing each one from a worker thread
would cost a thread hop per 64 KiB, so chunks are gathered into ~1 MiB blocks first; memory per
upload stays at one block whatever the body size. Files are written under a temporary name and
renamed into place only when complete, so a cut-off upload never leaves a partial part behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread

BLOCK = 1024 * 1024


class AtomicSink:
    """Write a stream to `target` via a temporary file; `commit()` publishes it atomically."""

    def __init__(self, target: Path, *, md5: bool = False) -> None:
        self.target = target
        self.tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
        self.size = 0
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._file: BinaryIO | None = None
        # S3's ETag of a plain PUT is the MD5 of the body; not used for security.
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None

    async def open(self) -> None:
        """Create the temporary file (and its directory)."""
        self._file = await anyio.to_thread.run_sync(self._open_sync)

    def _open_sync(self) -> BinaryIO:
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp.open("wb")

    async def write(self, chunk: bytes) -> None:
        """Queue `chunk`; flush to disk once a block has gathered."""
        if not chunk:
            return
        self._pending.append(chunk)
        self._pending_len += len(chunk)
        self.size += len(chunk)
        if self._pending_len >= BLOCK:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_len = 0
        await anyio.to_thread.run_sync(self._write_sync, data)

    def _write_sync(self, data: bytes) -> None:
        assert self._file is not None
        if self._md5 is not None:
            self._md5.update(data)
        self._file.write(data)

    def etag(self) -> str:
        """The quoted MD5 hex digest of what was written (S3-style ETag)."""
        digest = self._md5.hexdigest() if self._md5 is not None else uuid.uuid4().hex
        return f'"{digest}"'

    async def commit(self) -> None:
        """Flush, close and rename the temporary file onto the target."""
        await self._flush()
        await anyio.to_thread.run_sync(self._commit_sync)

    def _commit_sync(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        os.replace(self.tmp, self.target)

    async def discard(self) -> None:
        """Drop everything written so far (safe to call more than once, and after commit)."""
        self._pending.clear()
        await anyio.to_thread.run_sync(self._discard_sync)

    def _discard_sync(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


def concat_files(sources: Sequence[Path], target: Path) -> None:
    """Concatenate `sources` into `target` block by block (blocking; run it in a thread)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        with tmp.open("wb") as out:
            for source in sources:
                with source.open("rb") as src:
                    shutil.copyfileobj(src, out, BLOCK)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def move_file(source: Path, target: Path) -> None:
    """Move `source` onto `target`, replacing it (blocking)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists (blocking)."""
    shutil.rmtree(path, ignore_errors=True)


def file_size(path: Path) -> int | None:
    """Size of `path`, or None when it does not exist (blocking)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
