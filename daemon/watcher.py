"""Find complete files in the inbox folder and hand them over, without ever reading them.

The watcher is the daemon's eyes: it notices files appearing in the inbox (a start-up scan,
then file events, plus a periodic safety-net rescan), waits until each one has *settled* (nobody
is writing to it any more), and reports it through the ``on_ready`` callback. It only ever calls
``lstat``/``stat``/``readlink`` and lists folders: it never opens a file, never touches the
network or the database.

Nothing outside the inbox is ever listed or watched: scans never enter a symlinked folder (a
folder is opened with ``O_NOFOLLOW``), and on Linux events come from ``daemon.inotify``, which
watches exactly the folders the scans enter (``watchfiles`` follows symlinked folders and
cannot be told not to). Polling (``force_polling``) is done by our own scans for the same
reason. ``watchfiles`` is only used on other platforms.

Settle rule: a file is ready when a fresh ``lstat`` at its due time shows the same
``(size, mtime_ns, ctime_ns, inode)`` as the previous look, and the due time
``max(mtime, ctime) + settle_seconds`` has passed. ctime matters because ``cp -p``,
``shutil.copy2`` and renames give a file an old mtime while ctime shows the recent change. A file
found by a directory scan (start-up, rescan, a folder moved in) whose mtime and ctime are both
older than ``settle_seconds`` is ready on that one look. Two guards against clock skew between
the writer and us (network shares): timestamps in the future count as "now", and a file that an
event just reported as changed counts from "now" if its timestamps claim it is already old.

Each waiting file has one due time in a heap; a single timer task sleeps until the earliest one,
re-stats, and either reports the file or moves its due time. Everything that becomes ready in
the same wake-up is handed over together (at most ``MAX_BATCH`` per ``on_ready`` call).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import heapq
import itertools
import math
import os
import platform
import re
import stat
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
import anyio.lowlevel
import structlog
import watchfiles

from daemon import inotify
from daemon.compat import BaseExceptionGroup
from daemon.queue import FileIdentity

__all__ = ["DEFAULT_EXCLUDES", "MAX_BATCH", "WatchRules", "Watcher"]

log = structlog.get_logger(__name__)

DEFAULT_EXCLUDES: Final[tuple[str, ...]] = (
    ".*",  # dotfiles and dot-folders (a pattern without '/' is tried on every path component)
    "*.tmp",
    "*.part",
    "*.partial",
    "~$*",  # Office lock files
    "*.swp",
    "*.crdownload",
    "*.meta.json",  # sidecar metadata: read together with its data file, never uploaded alone
)

MAX_BATCH: Final = 1000
"""Most files handed to one ``on_ready`` call."""

# watchfiles' defaults (debounce 1600 ms, step 50 ms) hold a burst of events back for up to
# 1.6 s before yielding. We do our own "is it finished?" logic (settling), so debouncing buys
# nothing and only adds latency on top of settle_seconds: yield once the stream has been quiet
# for 20 ms, and never hold events longer than 100 ms.
_DEBOUNCE_MS: Final = 100
_STEP_MS: Final = 20

# Directory entries per worker-thread hop: scans never block the loop the uploader runs on.
_SCAN_CHUNK: Final = 2000
_INLINE_STATS: Final = 16  # a few lstat calls are cheaper inline than a thread hop
_EPSILON: Final = 0.002  # timer wake-ups may come a hair early; do not go back to sleep for that
# Re-read the clock at least this often while files wait (wall-clock steps, injected clocks).
_MAX_TIMER_SLEEP: Final = 1.0
_MIN_RESCAN_GAP: Final = 0.05  # seconds; the real gap is max(this, 2 x last scan duration)
_MAX_RESTART_DELAY: Final = 5.0
_POLL_SECONDS: Final = 0.3  # force_polling: a full scan this often (watchfiles' own default)

# Folders are listed through an fd opened with O_NOFOLLOW: a folder swapped for a symlink
# between its parent's listing and its own is refused by the kernel instead of followed.
_SCANDIR_FD: Final = os.scandir in os.supports_fd
_OPEN_DIR: Final = (
    os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
)  # the inbox itself: the configured path may go through a symlink
_OPEN_SUBDIR: Final = _OPEN_DIR | getattr(os, "O_NOFOLLOW", 0)

# Observation kinds, produced by the (thread-safe) stat/scan helpers and applied on the loop.
_FILE: Final = 0
_DIR: Final = 1
_SKIP: Final = 2
_GONE: Final = 3
_IGNORE: Final = 4

# (kind, rel, reason, size, mtime_ns, ctime_ns, inode): one flat shape for every kind so that
# a 50,000-file scan is 50,000 small tuples, not 50,000 objects.
_Obs = tuple[int, str, str, int, int, int, int]


@dataclass(frozen=True)
class WatchRules:
    """What the watcher looks at and how long a file must be quiet before it counts as complete.

    ``include``/``exclude`` are ``fnmatch`` globs, matched case-insensitively (logging PCs are
    mostly Windows machines writing ``RUN_01.MF4`` next to ``run_02.mf4``). Each pattern is tried
    on the relative path (``/``-separated; ``*`` also matches ``/``; ``**/`` may also match no
    folder at all, so ``runs/**/*.mf4`` matches ``runs/a.mf4``) and on the file name.
    ``exclude`` is also tried on every parent folder, like ``.gitignore``: ``.*`` excludes
    dotfiles *and* everything inside dot-folders, and excluded folders are never entered.
    """

    settle_seconds: float = 5.0
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDES
    follow_symlinks: bool = False
    ignore_dirs: tuple[Path, ...] = ()
    rescan_seconds: float = 600.0
    force_polling: bool | None = None


class _Pending:
    """A file waiting to settle: the last stat seen and when to look again."""

    __slots__ = (
        "announced",
        "ctime_ns",
        "due",
        "inode",
        "mtime_ns",
        "queued",
        "recheck",
        "size",
        "version",
    )

    def __init__(self, size: int, mtime_ns: int, ctime_ns: int, inode: int, due: float) -> None:
        self.size = size
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.inode = inode
        self.due = due  # earliest moment the file may be reported
        self.queued = math.inf  # due time of this file's live heap entry (inf: none)
        self.recheck = False  # re-stat at the next heap pop even if `due` is later
        self.announced = False  # on_settling(rel, size) was sent
        self.version = 0  # bumped on every change, so stale thread results can be recognised

    def same(self, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> bool:
        return (
            self.size == size
            and self.mtime_ns == mtime_ns
            and self.ctime_ns == ctime_ns
            and self.inode == inode
        )


def _compile_globs(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex for a list of fnmatch globs (``None`` if there are none)."""
    parts: list[str] = []
    for pattern in patterns:
        # "**/" may stand for no folder at all: add every variant with some of them removed.
        pieces = pattern.split("**/")
        for keep in itertools.product(("**/", ""), repeat=min(len(pieces) - 1, 6)):
            variant = pieces[0] + "".join(k + p for k, p in zip(keep, pieces[1:], strict=False))
            parts.append(fnmatch.translate(variant))
    if not parts:
        return None
    return re.compile("|".join(dict.fromkeys(parts)), re.IGNORECASE)


def _display(text: str) -> str:
    """A path made safe for logs and messages: undecodable bytes shown as ``\\xNN``."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _describe(exc: BaseException) -> str:
    """The useful part of an error: awatch() wraps its errors in single-item ExceptionGroups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _kind_reason(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "is a FIFO, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    if stat.S_ISBLK(mode):
        return "is a block device, not a regular file"
    if stat.S_ISCHR(mode):
        return "is a character device, not a regular file"
    return f"is not a regular file (mode {stat.filemode(mode)})"


def _obs(kind: int, rel: str, reason: str = "") -> _Obs:
    return (kind, rel, reason, 0, 0, 0, 0)


def _events_kind(force_polling: bool | None) -> str:
    """Where file events come from: "inotify", "polling" (our own scans) or "watchfiles"."""
    if force_polling is None:
        # Unset: watchfiles' rule, so configurations written for it keep working.
        env = os.environ.get("WATCHFILES_FORCE_POLLING")
        if env:
            force_polling = env.lower() not in {"false", "disable", "disabled"}
        else:
            uname = platform.uname()
            # WSL's inotify does not see changes made from Windows.
            force_polling = (
                uname.system.lower() == "linux" and "microsoft-standard" in uname.release.lower()
            )
    if force_polling:
        return "polling"
    if sys.platform.startswith("linux") and inotify.available():
        return "inotify"
    return "watchfiles"


class _Never:
    """An event stream that never yields: when polling, rescans find every change."""

    def __aiter__(self) -> _Never:
        return self

    async def __anext__(self) -> set[tuple[watchfiles.Change, str]]:
        await anyio.sleep_forever()
        raise StopAsyncIteration


class _Scanner:
    """An iterative ``os.scandir`` walk that a worker thread advances one chunk at a time.

    It only reads the watcher's immutable configuration, so it is safe to run off the loop.
    """

    __slots__ = ("_dir_rel", "_fd", "_it", "_stack", "_w", "failed")

    def __init__(self, watcher: Watcher, starts: Iterable[str]) -> None:
        self._w = watcher
        # (rel, verify): a start point other than the inbox itself must be lstat-ed first, so a
        # symlink to a folder is never entered.
        self._stack: list[tuple[str, bool]] = [(rel, True) for rel in starts]
        self._it: os._ScandirIterator[str] | None = None
        self._fd = -1  # the listed folder's, when listing by fd (entries stat relative to it)
        self._dir_rel = ""
        self.failed: list[str] = []  # folders that could not be listed

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def take(self, limit: int) -> list[_Obs]:
        """Up to about ``limit`` observations; an empty list means the walk is complete."""
        w = self._w
        out: list[_Obs] = []
        while len(out) < limit:
            if self._it is None:
                if not self._stack:
                    break
                self._open_next(out)
                continue
            try:
                entry = next(self._it)
            except StopIteration:
                self.close()
                continue
            except OSError as exc:  # the folder went away or became unreadable mid-listing
                self.close()
                self.failed.append(self._dir_rel)
                out.append(_obs(_SKIP, self._dir_rel, f"cannot list folder: {exc.strerror}"))
                continue
            name = entry.name
            rel = f"{self._dir_rel}/{name}" if self._dir_rel else name
            # d_type tells us this without a syscall on most file systems; it never follows links.
            if entry.is_dir(follow_symlinks=False):
                if not w._prune_dir(rel, name):
                    self._stack.append((rel, False))
                continue
            if w._excluded_file(rel, name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted between listing and stat: nothing to report
            except OSError as exc:
                out.append(_obs(_SKIP, rel, f"cannot stat: {exc.strerror}"))
                continue
            obs = w._classify(rel, st)
            if obs[0] != _IGNORE:
                out.append(obs)
        return out

    def _open_next(self, out: list[_Obs]) -> None:
        rel, verify = self._stack.pop()
        w = self._w
        if verify and rel:
            obs = w._probe(rel)
            if obs[0] != _DIR:
                if obs[0] != _IGNORE:
                    out.append(obs)
                return
        tree = w._tree
        if tree is not None:
            # Watched before it is listed: whatever the listing misses produces an event.
            tree.watch(rel)
        try:
            self._it, self._fd = w._list(rel)
        except FileNotFoundError:
            out.append(_obs(_GONE, rel))
            return
        except OSError as exc:
            if rel and exc.errno in (errno.ELOOP, errno.ENOTDIR):
                # No longer a real folder (a symlink took its place?): say what it is now.
                obs = w._probe(rel)
                if obs[0] not in (_DIR, _IGNORE):
                    out.append(obs)
                return
            if exc.errno == errno.ENOTDIR:
                out.append(_obs(_GONE, rel))
                return
            self.failed.append(rel)
            out.append(_obs(_SKIP, rel, f"cannot list folder: {exc.strerror}"))
            return
        self._dir_rel = rel
        out.append(_obs(_DIR, rel))


class Watcher:
    """Watch an inbox folder and report every complete regular file in it, once per identity.

    All reporting goes through the callbacks, which are only ever called from one task at a
    time and never concurrently with each other:

    * ``on_ready(files)``: files that have settled, in batches of at most ``MAX_BATCH``;
    * ``on_skip(rel, reason)``: something that will not be reported, with a reason a person
      understands (symlink, FIFO, unreadable folder...), once per ``(rel, reason)``;
    * ``on_settling(rel, size)``: a file started waiting to settle (once, with the size seen
      then); ``size=None`` when it stops waiting (reported, or vanished).

    A file is reported again only when its identity (size, mtime, inode) changes. Excluded
    files are ignored silently: they never reach any callback.
    """

    # Created in run(): older anyio versions cannot create events outside an event loop.
    _wake: anyio.Event  # tells the timer task that something changed
    _drained: anyio.Event  # set by the dispatcher whenever it has nothing left to deliver
    _rescan_wanted: anyio.Event

    def __init__(
        self,
        inbox: Path,
        rules: WatchRules,
        *,
        on_ready: Callable[[list[FileIdentity]], Awaitable[None]],
        on_skip: Callable[[str, str], Awaitable[None]] | None = None,
        on_settling: Callable[[str, int | None], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rules = rules
        self._on_ready = on_ready
        self._on_skip = on_skip
        self._on_settling = on_settling
        self._clock = clock
        self._settle = max(0.0, float(rules.settle_seconds))
        self._follow = rules.follow_symlinks

        self._root = os.path.abspath(os.fspath(inbox))
        self._root_real = os.path.realpath(self._root)
        self._include = _compile_globs(rules.include)
        self._exclude = _compile_globs(rules.exclude)
        self._ignored = self._ignored_rels(rules.ignore_dirs)

        # Bounded by the number of files in the inbox: rel -> (size, mtime_ns, inode).
        self._reported: dict[str, tuple[int, int, int, int]] = {}
        self._settling: dict[str, _Pending] = {}
        self._heap: list[tuple[float, str]] = []
        self._skipped: dict[str, str] = {}  # rel -> the last reason reported for it
        self._dirs: set[str] = set()  # folders entered without following a symlink
        self._gone_dirs: list[str] = []  # known folders that vanished, for _flush_gone()

        self._ready_buf: list[FileIdentity] = []
        self._notes: deque[tuple[str, str | None, int | None]] = deque()  # (rel, reason, size)
        self._dispatching = False
        self._scan_count = 0  # completed full scans, start-up included (tests and logs)
        self._scans_begun = 0
        self._running = False
        self._events_kind = _events_kind(rules.force_polling)
        # The inotify watcher while one is open: scans (in worker threads) add folders to it.
        self._tree: inotify.InotifyTree | None = None

    # ------------------------------------------------------------------ public API

    def pending(self) -> int:
        """Number of files currently waiting to settle."""
        return len(self._settling)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start-up scan, then file events (or polling scans) until cancelled.

        Calls ``task_status.started()`` once the start-up scan has registered every existing
        file: files already complete have been handed to ``on_ready`` and the others are
        waiting to settle (so the service can send READY). Raises if the inbox is missing.
        """
        if self._running:
            raise RuntimeError("Watcher.run() is already running")
        if not stat.S_ISDIR(os.stat(self._root).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "inbox is not a folder", self._root)
        self._running = True
        self._wake = anyio.Event()
        self._drained = anyio.Event()
        self._rescan_wanted = anyio.Event()
        stop = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                try:
                    tg.start_soon(self._event_loop, stop)
                    tg.start_soon(self._timer_loop)
                    # Let the event task take its first step: it opens the inotify instance
                    # (which the scan then adds each folder to before listing it), or awatch()
                    # sets up its watches, synchronously before it first suspends, so nothing
                    # falls between scan and watch. If that ever changed, the inotify source
                    # asks for a rescan once it is open, and the periodic rescan is still there.
                    await anyio.lowlevel.checkpoint()
                    started = time.monotonic()
                    await self._full_scan()
                    await self._wait_drained()
                    log.info(
                        "watcher.started",
                        inbox=_display(self._root),
                        reported=len(self._reported),
                        settling=len(self._settling),
                        events=self._events_kind,
                        watches=self._tree.watches if self._tree is not None else None,
                        seconds=round(time.monotonic() - started, 3),
                    )
                    task_status.started()
                    tg.start_soon(self._rescan_loop)
                    await anyio.sleep_forever()
                finally:
                    # Set before the task group waits for its children: the watchfiles worker
                    # thread checks this event every step and cannot be interrupted otherwise
                    # (it would hold cancellation up for its 5 s timeout).
                    stop.set()
        finally:
            self._running = False

    # ------------------------------------------------------------------ configuration helpers

    def _ignored_rels(self, dirs: Sequence[Path]) -> frozenset[str]:
        out: set[str] = set()
        for d in dirs:
            for base, path in (
                (self._root, os.path.abspath(d)),
                (self._root_real, os.path.realpath(d)),
            ):
                rel = os.path.relpath(path, base)
                if rel != "." and rel != os.pardir and not rel.startswith(os.pardir + os.sep):
                    out.add(rel.replace(os.sep, "/"))
        return frozenset(out)

    def _abs(self, rel: str) -> str:
        return os.path.join(self._root, rel) if rel else self._root

    def _list(self, rel: str) -> tuple[os._ScandirIterator[str], int]:
        """An iterator over the folder ``rel`` and the fd to close after it (-1: none).

        A symlink is refused (but the inbox itself may be reached through one).
        """
        path = self._abs(rel)
        if not _SCANDIR_FD:
            return os.scandir(path), -1
        fd = os.open(path, _OPEN_SUBDIR if rel else _OPEN_DIR)
        try:
            # The iterator reads a duplicate of fd, but its entries stat relative to fd itself.
            return os.scandir(fd), fd
        except BaseException:
            os.close(fd)
            raise

    def _is_ignored(self, rel: str) -> bool:
        return any(rel == d or rel.startswith(d + "/") for d in self._ignored)

    def _included(self, rel: str) -> bool:
        inc = self._include
        if inc is None:
            return False
        return inc.match(rel) is not None or inc.match(rel.rpartition("/")[2]) is not None

    def _prune_dir(self, rel: str, name: str) -> bool:
        """Whether a folder found by a scan must not be entered."""
        if rel in self._ignored:
            return True
        exc = self._exclude
        return exc is not None and (exc.match(name) is not None or exc.match(rel) is not None)

    def _excluded_file(self, rel: str, name: str) -> bool:
        """Exclusion for a file whose parent folders are already known not to be excluded."""
        exc = self._exclude
        return exc is not None and (exc.match(name) is not None or exc.match(rel) is not None)

    def _excluded_path(self, rel: str) -> bool:
        """Exclusion for an arbitrary path (events): every ancestor and component is tried."""
        exc = self._exclude
        if exc is None:
            return False
        prefix = ""
        for part in rel.split("/"):
            prefix = f"{prefix}/{part}" if prefix else part
            if exc.match(part) is not None or exc.match(prefix) is not None:
                return True
        return False

    def _rel_of(self, path: str) -> str | None:
        for base in (self._root, self._root_real):
            if path.startswith(base) and path[len(base) : len(base) + 1] == os.sep:
                rel = path[len(base) + 1 :]
                return rel.replace(os.sep, "/") if os.sep != "/" else rel
        return None

    # ------------------------------------------------------------------ stat helpers (thread-safe)

    def _probe(self, rel: str) -> _Obs:
        """lstat one path and classify it. Never opens anything."""
        try:
            st = os.lstat(self._abs(rel))
        except (FileNotFoundError, NotADirectoryError):
            return _obs(_GONE, rel)
        except OSError as exc:
            return _obs(_SKIP, rel, f"cannot stat: {exc.strerror}")
        return self._classify(rel, st)

    def _probe_many(self, rels: Sequence[str]) -> list[_Obs]:
        return [self._probe(rel) for rel in rels]

    def _classify(self, rel: str, st: os.stat_result) -> _Obs:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return _obs(_DIR, rel)
        if not self._included(rel):
            return _obs(_IGNORE, rel)
        if stat.S_ISREG(mode):
            return (_FILE, rel, "", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if stat.S_ISLNK(mode):
            return self._classify_symlink(rel)
        return _obs(_SKIP, rel, _kind_reason(mode))

    def _classify_symlink(self, rel: str) -> _Obs:
        if not self._follow:
            return _obs(_SKIP, rel, "symlink (follow_symlinks is off)")
        path = self._abs(rel)
        try:
            target = _display(os.readlink(path))
        except OSError as exc:
            return _obs(_SKIP, rel, f"cannot read symlink: {exc.strerror}")
        try:
            real = os.path.realpath(path, strict=True)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return _obs(_SKIP, rel, f"symlink loop (points to {target})")
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return _obs(
                    _SKIP, rel, f"dangling symlink: points to {target}, which does not exist"
                )
            return _obs(_SKIP, rel, f"cannot resolve symlink to {target}: {exc.strerror}")
        base = self._root_real
        if not real.startswith(base + os.sep):
            return _obs(_SKIP, rel, f"symlink points outside the inbox (to {_display(real)})")
        if self._is_ignored(real[len(base) + 1 :].replace(os.sep, "/")):
            return _obs(_SKIP, rel, f"symlink points into an ignored folder (to {_display(real)})")
        try:
            st = os.stat(real)
        except OSError as exc:
            return _obs(_SKIP, rel, f"cannot stat symlink target {target}: {exc.strerror}")
        if stat.S_ISREG(st.st_mode):
            return (_FILE, rel, "", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            return _obs(
                _SKIP, rel, f"symlink points to a folder ({target}); only files are followed"
            )
        return _obs(_SKIP, rel, f"symlink target {target} {_kind_reason(st.st_mode)}")

    async def _probe_io(self, rels: Sequence[str]) -> list[_Obs]:
        if len(rels) <= _INLINE_STATS:
            return self._probe_many(rels)
        # Many stats (or a slow network share) must not stall the loop the uploader runs on.
        return await anyio.to_thread.run_sync(self._probe_many, rels)

    # ------------------------------------------------------------------ state changes (loop only)

    def _settle_at(self, mtime_ns: int, ctime_ns: int, now: float, *, trust_old: bool) -> float:
        """When a file first seen at ``now`` with these timestamps may be reported."""
        touched = max(mtime_ns, ctime_ns) / 1e9
        if touched > now:
            # Timestamps in the future (clock skew on a share): count from our own first look.
            touched = now
        elif not trust_old and touched < now - self._settle:
            # An event (or a re-stat) just told us the file changed, yet its stamps are old:
            # the writer's clock is behind ours. Don't let that make a growing file "old".
            touched = now
        return touched + self._settle

    def _push(self, rel: str, p: _Pending, when: float) -> None:
        if when < p.queued:
            p.queued = when
            heapq.heappush(self._heap, (when, rel))
            if len(self._heap) > 4 * len(self._settling) + 1024:
                # Stale entries (due times moved earlier) are dropped lazily: bound them.
                self._heap = [
                    (q.queued, r) for r, q in self._settling.items() if q.queued < math.inf
                ]
                heapq.heapify(self._heap)
            self._wake.set()

    def _note(self, rel: str, reason: str | None, size: int | None) -> None:
        if reason is None and self._on_settling is None:
            return
        if reason is not None and self._on_skip is None:
            return
        self._notes.append((rel, reason, size))
        self._wake.set()

    def _drop_pending(self, rel: str) -> None:
        p = self._settling.pop(rel, None)
        if p is not None and p.announced:
            self._note(rel, None, None)

    def _ready(self, rel: str, size: int, mtime_ns: int, inode: int, ctime_ns: int) -> None:
        self._drop_pending(rel)
        self._reported[rel] = (size, mtime_ns, inode, ctime_ns)
        self._ready_buf.append(
            FileIdentity(rel=rel, size=size, mtime_ns=mtime_ns, inode=inode, ctime_ns=ctime_ns)
        )
        self._wake.set()

    def _skip(self, rel: str, reason: str) -> None:
        self._drop_pending(rel)
        self._reported.pop(rel, None)
        if self._skipped.get(rel) != reason:
            self._skipped[rel] = reason
            # Whoever receives on_skip tells the person; log it ourselves only if nobody does.
            emit = log.info if self._on_skip is None else log.debug
            emit("watcher.skip", rel=_display(rel), reason=reason)
            self._note(rel, reason, None)

    def _forget(self, rel: str) -> None:
        """``rel`` no longer exists: drop what we know about it (see ``_flush_gone``)."""
        self._reported.pop(rel, None)
        self._skipped.pop(rel, None)
        self._drop_pending(rel)
        if rel in self._dirs:
            self._dirs.discard(rel)
            self._gone_dirs.append(rel)

    def _flush_gone(self) -> None:
        """Drop everything under folders that vanished.

        A folder moved out of the inbox produces one event, for the folder, not one per file.
        Finding what was under it is a pass over every table, so it is done once per batch of
        events rather than once per folder (``rm -rf`` of a big tree deletes many folders).
        """
        if not self._gone_dirs:
            return
        prefixes = tuple(d + "/" for d in self._gone_dirs)
        self._gone_dirs.clear()
        # Stale folders under a vanished one must go too: a same-named folder (or a symlink)
        # may take its place, and it must be scanned (or refused) afresh.
        self._dirs = {d for d in self._dirs if not d.startswith(prefixes)}
        for table in (self._reported, self._skipped):
            for r in [r for r in table if r.startswith(prefixes)]:
                del table[r]
        for r in [r for r in self._settling if r.startswith(prefixes)]:
            self._drop_pending(r)

    def _observe(self, obs: _Obs, now: float, *, from_scan: bool) -> None:
        kind, rel = obs[0], obs[1]
        if kind == _FILE:
            self._observe_file(rel, obs[3], obs[4], obs[5], obs[6], now, from_scan=from_scan)
        elif kind == _DIR:
            if rel:
                self._dirs.add(rel)
        elif kind == _SKIP:
            if rel:
                self._skip(rel, obs[2])
            else:  # the inbox itself: nothing a per-file skip could express
                log.error("watcher.inbox_unreadable", inbox=_display(self._root), reason=obs[2])
        elif kind == _GONE:
            self._forget(rel)

    def _observe_file(
        self,
        rel: str,
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        inode: int,
        now: float,
        *,
        from_scan: bool,
    ) -> None:
        self._skipped.pop(rel, None)
        reported = self._reported.get(rel)
        # ctime too: an in-place rewrite that restores the mtime is a new version.
        if reported == (size, mtime_ns, inode, ctime_ns):
            self._drop_pending(rel)  # changed and changed back
            return
        p = self._settling.get(rel)
        if p is not None and p.same(size, mtime_ns, ctime_ns, inode):
            return
        if from_scan and (p is not None or reported is not None):
            # A scan's stat may be older than what an event already told us: never act on it
            # directly, ask for a fresh look instead.
            if p is None:
                p = self._settling[rel] = _Pending(size, mtime_ns, ctime_ns, inode, now)
                p.due = self._settle_at(mtime_ns, ctime_ns, now, trust_old=True)
            p.recheck = True
            self._push(rel, p, now)
            return
        due = self._settle_at(mtime_ns, ctime_ns, now, trust_old=from_scan)
        if p is None:
            if due <= now + _EPSILON:
                self._ready(rel, size, mtime_ns, inode, ctime_ns)  # old file found by a scan
                return
            p = self._settling[rel] = _Pending(size, mtime_ns, ctime_ns, inode, due)
            self._announce(rel, p)
            self._push(rel, p, due)
            return
        p.size, p.mtime_ns, p.ctime_ns, p.inode = size, mtime_ns, ctime_ns, inode
        p.due = due
        p.version += 1
        # Announced once, not on every write: the service records each call in SQLite, and a
        # file being logged to changes many times a second.
        if not p.announced:
            self._announce(rel, p)
        self._push(rel, p, due)

    def _announce(self, rel: str, p: _Pending) -> None:
        p.announced = True
        self._note(rel, None, p.size)

    # ------------------------------------------------------------------ timer + dispatch

    async def _timer_loop(self) -> None:
        """The one task that re-stats due files and calls the callbacks."""
        while True:
            self._wake = wake = anyio.Event()
            await self._process_due()
            await self._dispatch()
            if wake.is_set():
                continue
            if not self._heap:
                await wake.wait()
                continue
            delay = min(max(self._heap[0][0] - self._clock(), 0.0), _MAX_TIMER_SLEEP)
            with anyio.move_on_after(delay):
                await wake.wait()

    async def _process_due(self) -> None:
        now = self._clock()
        due: list[tuple[str, int]] = []
        # self._heap, not a local alias: _push() may rebuild the list.
        while self._heap and self._heap[0][0] <= now + _EPSILON:
            when, rel = heapq.heappop(self._heap)
            p = self._settling.get(rel)
            if p is None or p.queued != when:
                continue  # stale entry: the file was reported, dropped, or rescheduled earlier
            p.queued = math.inf
            if p.due > now + _EPSILON and not p.recheck:
                self._push(rel, p, p.due)  # it changed since: its due time moved later
                continue
            due.append((rel, p.version))
        if not due:
            return
        results = await self._probe_io([rel for rel, _ in due])
        now = self._clock()
        for (rel, version), obs in zip(due, results, strict=True):
            p = self._settling.get(rel)
            if p is None or p.version != version:
                continue  # an event got there while we were stat-ing; its schedule stands
            self._recheck(rel, p, obs, now)
        self._flush_gone()

    def _recheck(self, rel: str, p: _Pending, obs: _Obs, now: float) -> None:
        kind = obs[0]
        if kind != _FILE:
            if kind == _GONE:
                log.debug("watcher.vanished", rel=_display(rel))
                self._forget(rel)
            elif kind == _SKIP:
                self._skip(rel, obs[2])
            else:
                self._drop_pending(rel)  # replaced by a folder: its events will bring it back
            return
        size, mtime_ns, ctime_ns, inode = obs[3], obs[4], obs[5], obs[6]
        if p.same(size, mtime_ns, ctime_ns, inode):
            p.recheck = False
            if p.due <= now + _EPSILON:
                self._ready(rel, size, mtime_ns, inode, ctime_ns)
            else:
                if not p.announced:
                    self._announce(rel, p)
                self._push(rel, p, p.due)
            return
        p.recheck = False
        self._observe_file(rel, size, mtime_ns, ctime_ns, inode, now, from_scan=False)

    async def _dispatch(self) -> None:
        self._dispatching = True
        try:
            while self._ready_buf or self._notes:
                if self._ready_buf:
                    batch = self._ready_buf[:MAX_BATCH]
                    del self._ready_buf[:MAX_BATCH]
                    log.info("watcher.ready", count=len(batch), first=_display(batch[0].rel))
                    await self._on_ready(batch)
                    continue
                rel, reason, size = self._notes.popleft()
                if reason is not None:
                    if self._on_skip is not None:
                        await self._on_skip(rel, reason)
                elif self._on_settling is not None:
                    await self._on_settling(rel, size)
        finally:
            self._dispatching = False
        self._drained.set()

    async def _wait_drained(self) -> None:
        while self._ready_buf or self._notes or self._dispatching:
            self._drained = drained = anyio.Event()
            self._wake.set()
            await drained.wait()

    # ------------------------------------------------------------------ scans

    async def _full_scan(self) -> None:
        self._scans_begun += 1
        seen: set[str] = set()
        started = time.monotonic()
        failed = await self._scan([""], seen)
        self._scan_count += 1
        # Deletions whose events were lost (overflow, watcher restart): confirm with lstat,
        # because files created while the scan ran are legitimately missing from `seen`.
        gone_candidates = [
            rel
            for rel in itertools.chain(self._reported, self._skipped, self._dirs)
            if rel not in seen
        ]
        forgotten = 0
        if gone_candidates and "" not in failed:  # an unreadable inbox says nothing about files
            for obs in await self._probe_io(gone_candidates):
                if obs[0] == _GONE:
                    self._forget(obs[1])
                    forgotten += 1
            self._flush_gone()
        log.debug(
            "watcher.scan_done",
            files=len(seen),
            failed_folders=len(failed),
            forgotten=forgotten,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _scan(self, starts: list[str], seen: set[str] | None = None) -> list[str]:
        """Walk folders in a worker thread, a chunk at a time, applying results on the loop."""
        scanner = _Scanner(self, starts)
        try:
            while True:
                chunk = await anyio.to_thread.run_sync(scanner.take, _SCAN_CHUNK)
                if not chunk:
                    return scanner.failed
                now = self._clock()
                for obs in chunk:
                    self._observe(obs, now, from_scan=True)
                self._flush_gone()
                if seen is not None:
                    seen.update(obs[1] for obs in chunk)
        finally:
            scanner.close()

    async def _rescan_loop(self) -> None:
        period = self._rules.rescan_seconds
        while True:
            with anyio.move_on_after(period if period > 0 else math.inf):
                await self._rescan_wanted.wait()
            self._rescan_wanted = anyio.Event()
            started = time.monotonic()
            await self._full_scan()
            # Back-to-back requests (a watcher that keeps failing) must not turn into a busy
            # loop of full scans: at most about a third of the time is spent scanning.
            await anyio.sleep(max(_MIN_RESCAN_GAP, 2 * (time.monotonic() - started)))

    # ------------------------------------------------------------------ events

    @contextlib.asynccontextmanager
    async def _events(
        self, stop: anyio.Event
    ) -> AsyncGenerator[AsyncIterator[set[tuple[watchfiles.Change, str]]], None]:
        """The raw event stream (a separate method so tests can replace it)."""
        if self._events_kind == "watchfiles":
            changes = watchfiles.awatch(
                self._root,
                watch_filter=None,  # the default filter drops e.g. "*~" names; we filter ourselves
                debounce=_DEBOUNCE_MS,
                step=_STEP_MS,
                stop_event=stop,
                recursive=True,
                force_polling=False,
                # An unreadable subfolder must not take the whole watcher down; scans report it.
                ignore_permission_denied=True,
            )
            # aclosing: if we are cancelled while handling a batch, the generator is suspended
            # at its yield and must be closed to release its watches and worker thread.
            async with contextlib.aclosing(changes):
                yield changes
            return
        if self._events_kind == "polling":
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._poll_loop)
                yield _Never()
                tg.cancel_scope.cancel()
            return
        tree = inotify.InotifyTree(
            self._root,
            on_overflow=self._overflowed,
            debounce=_DEBOUNCE_MS / 1000,
            step=_STEP_MS / 1000,
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tree.pump)
                self._tree = tree
                if self._scans_begun:
                    # A scan ran without this instance (start-up order, or a restart): the
                    # folders it listed are not watched until a scan adds them again.
                    self._rescan_wanted.set()
                yield tree
                tg.cancel_scope.cancel()
        finally:
            self._tree = None
            tree.close()

    def _overflowed(self) -> None:
        log.warning("watcher.events_overflow", hint="the kernel dropped events; rescanning")
        self._rescan_wanted.set()

    async def _poll_loop(self) -> None:
        while True:
            await anyio.sleep(_POLL_SECONDS)
            self._rescan_wanted.set()

    async def _event_loop(self, stop: anyio.Event) -> None:
        failures = 0
        while not stop.is_set():
            started = time.monotonic()
            handler_error: Exception | None = None
            try:
                async with self._events(stop) as changes:
                    async for batch in changes:
                        try:
                            await self._handle_changes(batch)
                        except Exception as exc:
                            handler_error = exc
                            raise
                return  # the stream ended: stop was set
            except Exception as exc:
                if handler_error is not None:
                    raise  # our own bug: restarting the event source would not help
                # watchfiles raises (inside an ExceptionGroup) on any name that is not valid
                # UTF-8 and loses the whole batch; it also fails when inotify runs out of
                # watches. The inotify source fails when the inbox itself goes away. Restart it
                # below, then rescan to recover what was lost.
                failures = 1 if time.monotonic() - started > 30 else failures + 1
                delay = min(_MAX_RESTART_DELAY, 0.05 * 2 ** min(failures, 10))
                log.warning("watcher.events_failed", error=_describe(exc), retry_in=delay)
            await anyio.sleep(delay)
            # The rescan task only runs once we suspend, which is after the event source has
            # been set up again (see run()), so nothing falls between the two.
            self._rescan_wanted.set()

    async def _handle_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        probe: set[str] = set()
        added: set[str] = set()
        scan_roots: set[str] = set()
        for change, path in changes:
            rel = self._rel_of(path)
            if not rel or self._is_ignored(rel) or self._excluded_path(rel):
                continue
            if change == watchfiles.Change.added:
                added.add(rel)
            parent = rel.rpartition("/")[0]
            if parent and parent not in self._dirs:
                # A folder we have not entered (new, moved in, or behind a symlink): scan it from
                # its topmost unknown ancestor, which the scanner lstat-s before entering.
                scan_roots.add(self._top_unknown(rel))
            else:
                # The change type does not matter: a fresh lstat says what is there now.
                probe.add(rel)
        results = await self._probe_io(sorted(probe))
        now = self._clock()
        for obs in results:
            if obs[0] == _DIR:
                # A known folder that was "added" was replaced (deleted and re-created, or
                # another tree moved in under its name, within one batch): walk it again.
                if obs[1] not in self._dirs or obs[1] in added:
                    scan_roots.add(obs[1])
            elif obs[0] != _IGNORE:
                self._observe(obs, now, from_scan=False)
        self._flush_gone()
        if scan_roots:
            ordered = sorted(scan_roots)
            # Nested roots are covered by their ancestor's walk.
            roots = [r for r in ordered if not any(r.startswith(o + "/") for o in ordered)]
            await self._scan(roots)

    def _top_unknown(self, rel: str) -> str:
        parts = rel.split("/")
        prefix = ""
        for part in parts[:-1]:
            prefix = f"{prefix}/{part}" if prefix else part
            if prefix not in self._dirs:
                return prefix
        return rel
