"""Files as the delivery flows read them: slices of a file streamed as request bodies, with
the checks that the file is still the one that was queued (same inode, not truncated), read in
the event loop while reads are fast and in a thread once they are slow."""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import xxhash

from daemon.errors import FileChangedError, FileProblem

# 2 MiB: larger chunks cost fewer event-loop turns per byte; memory stays at
# part_concurrency x chunk (8 MiB by default) whatever the file or part size.
CHUNK_SIZE = 2 * 1024 * 1024


#: bytes read and sent at a time to an ``https://`` URL (at most). asyncio's TLS layer
#: encrypts each chunk into a buffer of its own size and copies it out again: chunks that stay
#: in the CPU's cache cost far less per byte (bench/run.sh --tls, 1 GiB over 4 connections:
#: 2 MiB chunks 2.1-2.8 s of CPU, 512 KiB 2.3, 256 KiB 1.7, 128 KiB 1.8, 64 KiB 2.1; curl 1.7).
#: Plain HTTP keeps CHUNK_SIZE: there larger chunks mean fewer event-loop turns per byte.
TLS_CHUNK_SIZE = 256 * 1024


_SLOW_READ = 0.02  # seconds; a read slower than this moves to a thread


Progress = Callable[[int], None]


Throttle = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class FileSlice:
    """Bytes ``[offset, offset + length)`` of a file, read lazily in bounded chunks.

    ``inode``/``min_size`` pin the file we mean: if the path now names another file, or the
    file got shorter, reading raises FileChangedError instead of sending other bytes.
    """

    path: Path
    offset: int
    length: int
    inode: int | None = None
    min_size: int | None = None
    #: awaited with each chunk's size before it is sent (the shared bandwidth limit)
    throttle: Throttle | None = None
    chunk_size: int = CHUNK_SIZE
    #: the version read must still be this one once its last byte is read (mtime and ctime,
    #: in ns): a rewrite during the read raises FileChangedError instead of mixing versions
    pinned: tuple[int, int] | None = None
    #: called with the xxh3_128 digest of the slice once a pass has read its last byte (and
    #: passed the ``pinned`` check): what was sent is hashed while it streams, no second read
    #: (``daemon.delivery.content``). Each pass (a retry reads the slice again) hashes afresh.
    on_digest: Callable[[bytes], None] | None = None

    async def chunks(self, progress: Progress | None = None) -> AsyncIterator[bytes]:
        """Yield the slice chunk by chunk; memory use is one chunk whatever the length."""
        chunk_size = self.chunk_size
        hasher = xxhash.xxh3_128() if self.on_digest is not None else None
        fd = await _open_slice(self.path, self.inode, self.min_size)
        try:
            pos, end = self.offset, self.offset + self.length
            # Reading in the event loop saves a thread round trip per chunk (a third of the
            # CPU per byte): right for page-cached and local files. A read that is slow (a
            # cold disk, a network filesystem) switches this slice to a worker thread so the
            # loop never stalls on it again.
            in_loop = True
            while pos < end:
                want = min(chunk_size, end - pos)
                if in_loop:
                    started = time.perf_counter()
                    data = os.pread(fd, want, pos)
                    in_loop = time.perf_counter() - started < _SLOW_READ
                else:
                    data = await anyio.to_thread.run_sync(os.pread, fd, want, pos)
                if not data:
                    raise FileChangedError(
                        f"{self.path.name}: file ended at byte {pos}, expected {end} bytes — "
                        "it was truncated while being uploaded"
                    )
                pos += len(data)
                if hasher is not None:
                    hasher.update(data)
                if pos >= end:
                    if self.pinned is not None:
                        _check_pinned(fd, self.path, self.pinned)
                    if hasher is not None and self.on_digest is not None:
                        self.on_digest(hasher.digest())
                if self.throttle is not None:
                    await self.throttle(len(data))
                if progress is not None:
                    progress(len(data))
                yield data
        finally:
            os.close(fd)


def sized_for(source: FileSlice, url: str) -> FileSlice:
    """``source`` with chunks of at most ``TLS_CHUNK_SIZE`` when ``url`` is ``https://``."""
    if source.chunk_size > TLS_CHUNK_SIZE and url[:6].lower() == "https:":
        return dataclasses.replace(source, chunk_size=TLS_CHUNK_SIZE)
    return source


def _check_pinned(fd: int, path: Path, pinned: tuple[int, int]) -> None:
    """Raise FileChangedError unless the open file still has the pinned mtime and ctime.

    Checked after the last byte of a slice is read and before it is sent: every byte read
    came from one version only if nothing wrote to the file before this moment (a write
    moves the ctime even when a tool restores the mtime afterwards).
    """
    st = os.fstat(fd)
    mtime_ns, ctime_ns = pinned
    if st.st_mtime_ns != mtime_ns or (ctime_ns and st.st_ctime_ns != ctime_ns):
        raise FileChangedError(f"{path.name}: the file was written to while it was being read")


def multipart_file_body(
    source: FileSlice, *, filename: str, progress: Progress | None = None
) -> tuple[AsyncIterator[bytes], dict[str, str]]:
    """A streamed ``multipart/form-data`` body whose one field ``file`` holds ``source``.

    Returns the body and its headers. The length is computed up front, so the request carries a
    ``Content-Length`` (servers that refuse chunked uploads accept it) while memory stays at one
    chunk whatever the file size. Shared by every API that takes a file as a form field.
    """
    boundary = os.urandom(16).hex()
    safe = filename.encode("utf-8", "replace").decode("utf-8")
    safe = safe.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{safe}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def body() -> AsyncIterator[bytes]:
        yield head
        async for chunk in source.chunks(progress=progress):
            yield chunk
        yield tail

    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + source.length + len(tail)),
    }
    return body(), headers


#: False once an open in the event loop was slow: from then on files are opened in a thread
_open_in_loop = True


async def _open_slice(path: Path, inode: int | None, min_size: int | None) -> int:
    """``_open_for_read`` in the event loop while opens are fast, else in a worker thread.

    A thread round trip costs more than the open of a local, cached file (most uploads are
    small files just written); the first open that stalls the loop (a network filesystem,
    a cold disk) sends every later one to a thread, as reads do per slice.
    """
    global _open_in_loop
    if not _open_in_loop:
        return await anyio.to_thread.run_sync(_open_for_read, path, inode, min_size)
    started = time.perf_counter()
    try:
        return _open_for_read(path, inode, min_size)
    finally:
        if time.perf_counter() - started >= _SLOW_READ:
            _open_in_loop = False


def _open_for_read(path: Path, inode: int | None, min_size: int | None) -> int:
    try:
        # O_NONBLOCK: a FIFO or device swapped in for the file must not block the open (in
        # the event loop, that would stall the daemon); it changes nothing for regular files.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileChangedError(f"{path.name}: the file vanished before it was uploaded") from None
    except PermissionError:
        raise FileProblem(
            f"{path.name}: permission denied",
            advice="make the file readable by the inboxd user (e.g. chmod g+r, or a group ACL)",
        ) from None
    except OSError as exc:
        raise FileProblem(f"{path.name}: cannot open it ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileChangedError(f"{path.name}: is no longer a regular file")
    if (inode is not None and st.st_ino != inode) or (
        min_size is not None and st.st_size < min_size
    ):
        os.close(fd)
        raise FileChangedError(f"{path.name}: the file was replaced or truncated during the upload")
    return fd


@dataclass(frozen=True)
class FileRef:
    """The file to upload, pinned to the identity it had when it was taken."""

    path: Path
    size: int
    mtime_ns: int
    inode: int
    #: 0 = unknown (a job queued before ctime was recorded): not compared
    ctime_ns: int = 0

    @classmethod
    def stat(cls, path: Path) -> FileRef:
        """Pin ``path`` as it is now."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            raise FileChangedError(
                f"{path.name}: the file vanished before it was uploaded"
            ) from None
        except OSError as exc:
            raise FileProblem(f"{path.name}: cannot stat it ({exc.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(
                f"{path.name}: not a regular file", advice="only plain files are uploaded"
            )
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def check_unchanged(self) -> None:
        """Raise FileChangedError unless the path still names this very file, unmodified.

        The ctime is compared too (when known): a rewrite that restores the mtime (``rsync
        --inplace -t``, ``touch -r``) still moves it.
        """
        now = FileRef.stat(self.path)
        same = (now.size, now.mtime_ns, now.inode) == (self.size, self.mtime_ns, self.inode)
        if same and self.ctime_ns and now.ctime_ns != self.ctime_ns:
            raise FileChangedError(
                f"{self.path.name}: was rewritten in place (its change time moved, the "
                "modification time was restored)"
            )
        if not same:
            raise FileChangedError(
                f"{self.path.name}: was {self.size} bytes (inode {self.inode}), now "
                f"{now.size} bytes (inode {now.inode}) with another modification time"
            )
