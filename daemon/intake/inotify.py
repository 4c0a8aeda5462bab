"""A minimal inotify watcher for one folder tree that never follows a symlink (Linux only).

Why no library: ``watchfiles`` follows symlinked folders, and ``inotify_simple``/``asyncinotify``
only wrap the three system calls (``_Libc`` below); what this module is for — watching only
folders a scan vetted, and what the events say about writers — none of them offers.

``watchfiles.awatch(recursive=True)`` (the notify crate) walks the tree itself and follows
symlinked folders: ``inbox/x -> /`` would make it list and watch the whole file system, and
watchfiles has no option to stop that. Here nothing walks the tree: the caller says which
folders to watch. The watcher's scanner calls :meth:`InotifyTree.watch` for each real folder it
is about to list, so a folder is watched only after it was seen as a real folder inside the
inbox, and ``IN_DONT_FOLLOW | IN_ONLYDIR`` make the kernel refuse it if a symlink has taken its
place since. Watching *before* listing closes the race with files written into a new folder:
what the listing misses produces an event.

A folder renamed or moved away loses its watches at once (``IN_MOVED_FROM``/``IN_MOVE_SELF``):
a watch follows the inode, so one moved out of the inbox would otherwise keep reporting from
outside. If it was moved within the inbox, the caller's scan of its new name watches it again.

Events come out as watchfiles-style ``(Change, absolute path)`` sets, coalesced the way the
watcher asked watchfiles to (quiet for ``step`` seconds, held for at most ``debounce``). With
each set, :meth:`InotifyTree.take_writes` gives what the events said about writers: a file
opened and then modified, not closed since (``WRITING``); modified with no open seen in the
same batch (``MODIFIED``: ``truncate(2)`` by path modifies without any open file, or the open
came in an earlier batch); closed after writing (``CLOSED``); opened by someone since its last
close (``OPENED``: the open does not say whether for writing); a read-only descriptor closed
(``READ_CLOSED``: the last open was a reader's, perhaps our own upload's, so an earlier
modify was not necessarily through an open file); or a new inode under that name (``RESET``:
created, moved in or away). inotify reports these for every process, whichever user it runs
as.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
import threading
from collections.abc import Callable
from typing import Final

import anyio
import structlog
from watchfiles import Change

__all__ = [
    "CLOSED",
    "MODIFIED",
    "OPENED",
    "READ_CLOSED",
    "RESET",
    "WRITING",
    "InotifyTree",
    "available",
]

log = structlog.get_logger(__name__)

# <sys/inotify.h>; the values are the same on every Linux architecture.
IN_MODIFY: Final = 0x00000002
IN_ATTRIB: Final = 0x00000004
IN_CLOSE_WRITE: Final = 0x00000008
IN_CLOSE_NOWRITE: Final = 0x00000010
IN_OPEN: Final = 0x00000020
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_UNMOUNT: Final = 0x00002000
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_DONT_FOLLOW: Final = 0x02000000
IN_EXCL_UNLINK: Final = 0x04000000
IN_ISDIR: Final = 0x40000000

_EVENTS: Final = (
    IN_MODIFY
    | IN_ATTRIB  # touch, chmod: the identity includes mtime
    | IN_CLOSE_WRITE
    | IN_OPEN  # a reopen (append) before the first write: only the open says so
    | IN_CLOSE_NOWRITE  # ... and a reader's close says that open was not a writer's
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
# IN_EXCL_UNLINK: a deleted file that a logger still writes to is nobody's business.
_FOLDER_MASK: Final = _EVENTS | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
# The inbox itself is configured by the operator and may be reached through a symlink.
_ROOT_MASK: Final = _EVENTS | IN_ONLYDIR | IN_EXCL_UNLINK

#: What the events since the last batch said about a path's writers (see the module docstring).
WRITING: Final = 1
CLOSED: Final = 2
OPENED: Final = 3
RESET: Final = 4
MODIFIED: Final = 5
READ_CLOSED: Final = 6

_HEADER: Final = struct.Struct("iIII")  # wd, mask, cookie, len
_READ_SIZE: Final = 256 * 1024  # ~8,000 events per read; the pump yields to the loop between reads
# Refused because the path is gone or is no longer a real folder: the scan that asked will
# find out what it is; unreadable folders are reported by the scan as well.
_QUIET_ERRORS: Final = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM}
)


class _Libc:
    """The three inotify calls, typed (glibc and musl both export them)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        self.init1 = lib.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch = lib.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = lib.inotify_rm_watch
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.rm_watch.restype = ctypes.c_int


_libc: _Libc | None = None


def _lib() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


def available() -> bool:
    """Whether this platform has inotify (Linux with a C library that exports it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        _lib()
    except (OSError, AttributeError):
        return False
    return True


class InotifyTree:
    """One inotify instance watching the folders of one tree that the caller names.

    ``watch()`` may be called from any thread (scans run in worker threads); ``pump()`` runs as
    a task for as long as the tree is used and iterating gives batches of changes. Raises
    ``OSError`` from the constructor if inotify or the root watch cannot be set up, and from
    ``pump()`` when the root itself goes away (deleted, moved, unmounted).
    """

    def __init__(
        self, root: str, *, on_overflow: Callable[[], None], debounce: float, step: float
    ) -> None:
        self._root = root
        self._on_overflow = on_overflow
        self._debounce = debounce
        self._step = step
        self._lock = threading.Lock()  # the maps below and the fd's life
        self._rel_of: dict[int, str] = {}  # wd -> folder relative to the root ("" = the root)
        self._wd_of: dict[str, int] = {}
        self._pending: set[tuple[Change, str]] = set()
        self._writes: dict[str, int] = {}  # absolute path -> WRITING, CLOSED, … (see above)
        self._batch_writes: dict[str, int] = {}  # what came with the last batch
        self._lost: str | None = None  # why the root watch ended
        self._limit_warned = False
        self._arrived = anyio.Event()
        lib = _lib()
        fd = lib.init1(os.O_NONBLOCK | os.O_CLOEXEC)  # == IN_NONBLOCK | IN_CLOEXEC
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        wd = lib.add_watch(fd, os.fsencode(root), _ROOT_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"cannot watch the inbox: {os.strerror(err)}", root)
        self._root_wd = wd
        self._rel_of[wd] = ""
        self._wd_of[""] = wd

    @property
    def lost(self) -> str | None:
        """Why the root watch ended ("removed", "moved away", "unmounted"), or None."""
        return self._lost

    @property
    def watches(self) -> int:
        """Number of folders currently watched."""
        return len(self._rel_of)

    def watch(self, rel: str) -> None:
        """Watch the folder ``rel`` (relative to the root) unless it is not a real folder.

        Call it *before* listing the folder. Never raises: a refused watch only means events
        from there are missed, and the periodic rescan is the safety net for that.
        """
        if not rel:
            return  # watched since the start, following a symlink unlike anything under it
        path = os.fsencode(os.path.join(self._root, rel))
        with self._lock:
            if self._fd < 0:
                return  # a scan outliving a restarted tree: the next rescan watches it again
            wd = _lib().add_watch(self._fd, path, _FOLDER_MASK)
            if wd < 0:
                self._refused(rel, ctypes.get_errno())
                return
            old_rel = self._rel_of.get(wd)
            if old_rel is not None and old_rel != rel and self._wd_of.get(old_rel) == wd:
                del self._wd_of[old_rel]  # renamed without us seeing it: the new name wins
            old_wd = self._wd_of.get(rel)
            if old_wd is not None and old_wd != wd:
                # Another folder had this name: it was replaced. Drop its watch rather than
                # trust that it was deleted: it may now be outside the inbox.
                self._rel_of.pop(old_wd, None)
                _lib().rm_watch(self._fd, old_wd)
            self._rel_of[wd] = rel
            self._wd_of[rel] = wd

    def _refused(self, rel: str, err: int) -> None:
        if err == errno.ENOSPC:
            if not self._limit_warned:
                self._limit_warned = True
                log.warning(
                    "watcher.watch_limit",
                    watches=len(self._rel_of),
                    hint="raise fs.inotify.max_user_watches; until then the periodic rescan "
                    "finds files in folders beyond the limit",
                )
        elif err not in _QUIET_ERRORS:
            log.debug("watcher.watch_failed", rel=rel, error=os.strerror(err))

    def close(self) -> None:
        """Release the inotify instance (and every watch with it). Call after ``pump()`` ended."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                self._rel_of.clear()
                self._wd_of.clear()

    async def pump(self) -> None:
        """Read events whenever the loop is free, so a slow consumer does not overflow the
        kernel's queue. Runs until cancelled; raises ``OSError`` when the root goes away."""
        while True:
            await anyio.wait_readable(self._fd)
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                continue
            before = len(self._pending), len(self._writes)
            with self._lock:
                self._parse(data)
            if self._lost is not None:
                raise OSError(errno.ENOENT, f"the inbox folder was {self._lost}", self._root)
            if (len(self._pending), len(self._writes)) != before:
                self._arrived.set()

    def _parse(self, data: bytes) -> None:
        root, pending, rel_of, writes = self._root, self._pending, self._rel_of, self._writes
        pos, end = 0, len(data)
        while pos < end:
            wd, mask, _cookie, length = _HEADER.unpack_from(data, pos)
            name = data[pos + 16 : pos + 16 + length].split(b"\0", 1)[0]
            pos += 16 + length
            if mask & IN_Q_OVERFLOW:
                self._on_overflow()
                continue
            rel = rel_of.get(wd)
            if rel is None:
                continue  # a watch we already dropped
            if mask & IN_IGNORED:
                del rel_of[wd]
                if self._wd_of.get(rel) == wd:
                    del self._wd_of[rel]
                if wd == self._root_wd:
                    self._lost = self._lost or "removed"
                continue
            if not name:  # about the watched folder itself
                if wd == self._root_wd:
                    if mask & IN_MOVE_SELF:
                        self._lost = "moved away"
                    elif mask & IN_UNMOUNT:
                        self._lost = "unmounted"
                elif mask & IN_MOVE_SELF:
                    # Moved without its parent telling us (the parent is not watched): it may
                    # be outside the inbox now. Its new name, if inside, is scanned again.
                    self._unwatch_tree(rel)
                    pending.add((Change.deleted, os.path.join(root, rel)))
                elif mask & IN_UNMOUNT:
                    pending.add((Change.added, os.path.join(root, rel)))  # look at it afresh
                continue
            child = os.fsdecode(name)
            child = f"{rel}/{child}" if rel else child
            path = os.path.join(root, child)
            if mask & (IN_OPEN | IN_CLOSE_NOWRITE):
                if mask & IN_ISDIR:
                    continue  # folders listed (by our own scans, among others)
                if mask & IN_CLOSE_NOWRITE:
                    writes[path] = READ_CLOSED
                elif writes.get(path) != WRITING:
                    writes[path] = OPENED
                continue  # nothing changed: only worth knowing while the file settles
            if mask & (IN_CREATE | IN_MOVED_TO):
                change = Change.added
                writes[path] = RESET
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                change = Change.deleted
                writes[path] = RESET
                if mask & IN_MOVED_FROM and mask & IN_ISDIR:
                    self._unwatch_tree(child)
            else:
                change = Change.modified
                if mask & IN_MODIFY:
                    writes[path] = WRITING if writes.get(path) in (OPENED, WRITING) else MODIFIED
                elif mask & IN_CLOSE_WRITE:
                    writes[path] = CLOSED
            pending.add((change, path))

    def _unwatch_tree(self, rel: str) -> None:
        prefix = rel + "/"
        for r in [r for r in self._wd_of if r == rel or r.startswith(prefix)]:
            wd = self._wd_of.pop(r)
            del self._rel_of[wd]
            _lib().rm_watch(self._fd, wd)

    def __aiter__(self) -> InotifyTree:
        return self

    def take_writes(self) -> dict[str, int]:
        """What the events of the batch just returned said about writers: absolute path ->
        ``WRITING``, ``MODIFIED``, ``CLOSED``, ``OPENED``, ``READ_CLOSED`` or ``RESET`` (the
        last thing said, per path)."""
        writes, self._batch_writes = self._batch_writes, {}
        return writes

    async def __anext__(self) -> set[tuple[Change, str]]:
        """The next batch: waits for a change, then until none arrived for ``step`` seconds
        (at most ``debounce`` seconds after the first). A batch may be empty when files were
        only opened (see :meth:`take_writes`)."""
        while not self._pending and not self._writes:
            self._arrived = arrived = anyio.Event()
            await arrived.wait()
        deadline = anyio.current_time() + self._debounce
        while (left := deadline - anyio.current_time()) > 0:
            self._arrived = arrived = anyio.Event()
            with anyio.move_on_after(min(self._step, left)):
                await arrived.wait()
            if not arrived.is_set():
                break
        with self._lock:
            batch, self._pending = self._pending, set()
            self._batch_writes, self._writes = self._writes, {}
        return batch
