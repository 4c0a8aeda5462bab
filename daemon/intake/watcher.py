"""Find complete files in the inbox folder and hand them over, without ever reading them.

The watcher is the daemon's eyes: it notices files appearing in the inbox (a start-up scan,
then file events, plus a periodic safety-net rescan), waits until each one is *complete* (its
writer is done with it), and reports it through the ``on_ready`` callback. It only ever calls
``lstat``/``stat``/``readlink``, lists folders and reads ``/proc``: it never opens a file in the
inbox, never touches the network or the database.

Nothing outside the inbox is ever listed or watched: scans never enter a symlinked folder (a
folder is opened with ``O_NOFOLLOW``), and on Linux events come from ``daemon.intake.inotify``,
which watches exactly the folders the scans enter (``watchfiles`` follows symlinked folders and
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

Writer rule, on top of the settle rule: a file some process still holds open for writing is
not taken, however long its writer pauses. On Linux the inotify events say so for every
process: ``IN_MODIFY`` without a later ``IN_CLOSE_WRITE`` means a writer holds it; after the
close it must stay unchanged for ``settle_seconds`` more (a writer that closes and reopens to
append). Where the events cannot tell (a file found by a scan, moved in, or opened again since
its close), one pass over ``/proc`` per scan or per timer wake-up (``daemon.intake.writers``) looks
for a process holding it open for writing; where that cannot be seen either (other users'
processes, other machines), settle_seconds alone decides. A file held open but unchanged for
``writer_timeout`` seconds (a crashed or hung logger) is taken anyway, with a warning.

The inbox folder itself may go away (deleted, moved, unmounted, replaced by another folder): it
is then reported once (``watcher.inbox_missing``), looked for every second, and when it is back
(the same folder, or a new one at the same path) it is watched again and scanned in full.
Meanwhile :meth:`Watcher.inbox_trouble` says what is wrong, for the workers and ``status``.

Each waiting file has one due time in a heap; a single timer task sleeps until the earliest one,
re-stats, and either reports the file or moves its due time. Everything that becomes ready in
the same wake-up is handed over together (at most ``MAX_BATCH`` per ``on_ready`` call).

Why one module: the Watcher is one state machine run by one task: the pending files, their
timers, the scans and the event stream all change the same tables, and split up each part
would reach into the others' state. The glob dialect (globs.py), the writer check
(writers.py), the inotify binding (inotify.py) and routing (routing.py) live apart.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import math
import os
import platform
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

from daemon.compat import BaseExceptionGroup
from daemon.config import DEFAULT_EXCLUDES
from daemon.intake import inotify, writers
from daemon.intake.globs import compile_globs
from daemon.retry import backoff_delay
from daemon.state import FileIdentity, InboxTrouble

__all__ = [
    "MAX_BATCH",
    "REPLACED_GRACE_SECONDS",
    "InboxTrouble",
    "WatchRules",
    "Watcher",
    "completeness",
]

log = structlog.get_logger(__name__)

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
_RESTART_DELAY: Final = 0.1  # after the first failure in a row
_MAX_RESTART_DELAY: Final = 5.0
_POLL_SECONDS: Final = 0.3  # force_polling: a full scan this often (watchfiles' own default)
# A file /proc shows held open for writing is looked at again on this grid (seconds), so that
# many held files share one /proc pass; inotify's close event usually comes first.
_HELD_RECHECK: Final = 2.0
# A close this long after the last change restarts the settle time: the writer paused with the
# file open and may reopen it to append. A close right after the last write does not.
_CLOSE_SLACK: Final = 0.5
_ROOT_CHECK_SECONDS: Final = 1.0  # how often the inbox folder itself is looked at
#: After the inbox was replaced by another folder, uploads wait this long for files to be put
#: back into it before a file missing from it counts as gone.
REPLACED_GRACE_SECONDS: Final = 30.0
_IDLE_WAIT: Final = 5.0  # a job whose file is missing with the whole folder: looked at again

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

# (kind, rel, reason, size, mtime_ns, ctime_ns, inode, dev): one flat shape for every kind so
# that a 50,000-file scan is 50,000 small tuples, not 50,000 objects.
_Obs = tuple[int, str, str, int, int, int, int, int]

# What is known about a waiting file's writers.
_W_UNKNOWN: Final = 0  # no event said: ask /proc when it has settled
_W_WRITING: Final = 1  # inotify: opened and modified, not closed since
_W_CLOSED: Final = 2  # inotify: closed after its last write
_W_HELD: Final = 3  # /proc: a process holds it open for writing


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
    #: a file held open for writing but unchanged this long is taken anyway; 0 = writers are
    #: not waited for (settle_seconds alone decides)
    writer_timeout: float = 3600.0


class _Pending:
    """A file waiting to settle: the last stat seen and when to look again."""

    __slots__ = (
        "announced",
        "ctime_ns",
        "dev",
        "due",
        "inode",
        "mtime_ns",
        "opened",
        "queued",
        "recheck",
        "since",
        "size",
        "version",
        "warned",
        "writer",
    )

    def __init__(
        self, size: int, mtime_ns: int, ctime_ns: int, inode: int, due: float, dev: int = 0
    ) -> None:
        self.size = size
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.inode = inode
        self.dev = dev
        self.due = due  # earliest moment the file may be reported
        self.since = due  # when it last changed, as the settle rule counts (set by the caller)
        self.queued = math.inf  # due time of this file's live heap entry (inf: none)
        self.recheck = False  # re-stat at the next heap pop even if `due` is later
        self.announced = False  # on_settling(rel, size) was sent
        self.version = 0  # bumped on every change, so stale thread results can be recognised
        self.writer = _W_UNKNOWN
        self.opened = False  # inotify: opened since its last close (a modify then means a writer)
        self.warned = False  # "held open" was logged

    def same(self, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> bool:
        return (
            self.size == size
            and self.mtime_ns == mtime_ns
            and self.ctime_ns == ctime_ns
            and self.inode == inode
        )


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
    return (kind, rel, reason, 0, 0, 0, 0, 0)


def _file_obs(rel: str, st: os.stat_result) -> _Obs:
    return (_FILE, rel, "", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


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


def completeness(
    inbox: Path, force_polling: bool | None, writer_timeout: float
) -> writers.Visibility:
    """How this machine decides that a file in ``inbox`` is complete, in one line (the
    daemon logs it at start as ``watcher.completeness``; ``inboxd check`` prints it).

    Blocking (one pass over /proc): call it from a worker thread.
    """
    seen = writers.visibility(inbox, _events_kind(force_polling), writer_timeout)
    if os.path.isdir(inbox):
        return seen
    return writers.Visibility(
        False,
        f"inbox.path {os.fspath(inbox)!r} is not a folder (yet): the daemon starts anyway and"
        f" waits for it; {seen.text}",
    )


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
            if not rel:  # the inbox itself: the watcher's check of the folder says why
                self.failed.append(rel)
                return
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
    _root_back: anyio.Event  # set while the inbox folder is there and watched

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
        self._include = compile_globs(rules.include)
        self._exclude = compile_globs(rules.exclude)
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
        self._events_scope: anyio.CancelScope | None = None  # cancelled to re-arm the source

        self._writer_timeout = max(0.0, float(rules.writer_timeout))
        self._asking: list[_Obs] = []  # settled files to look for in /proc (see _ask_writers)

        # The inbox folder itself: (st_dev, st_ino) and whether it is a mount point, as watched.
        self._root_id: tuple[int, int] | None = None
        self._root_mount = False
        self._missing: tuple[float, str] | None = None  # (since, what is wrong) while unusable
        self._replaced_at: float | None = None
        # inotify saw the watched folder deleted: a folder at its path later is a new one,
        # even when the file system gives it the same inode number again.
        self._root_deleted = False
        self._root_changes = 0  # how often it went missing, came back or was replaced

    # ------------------------------------------------------------------ public API

    def pending(self) -> int:
        """Number of files currently waiting to settle."""
        return len(self._settling)

    def inbox_trouble(self) -> InboxTrouble | None:
        """What is wrong with the inbox folder right now, or None when nothing is.

        Looks at the folder afresh (one ``stat``) when it seems fine, so a caller about to
        give up on a missing file learns that the whole folder went away, not just the file.
        For ``REPLACED_GRACE_SECONDS`` after the folder was replaced by another one, a file
        missing from it is given that long to be put back.
        """
        if self._missing is None and self._root_id is not None:
            try:
                st = os.stat(self._root)
                same = (st.st_dev, st.st_ino) == self._root_id
            except OSError:
                same = False
            if not same:
                self._check_root()
        if self._missing is not None:
            what = f"the inbox folder {self._root} {self._missing[1]}"
            return InboxTrouble(what, hold=True, wait=_IDLE_WAIT)
        if self._replaced_at is not None:
            until = self._replaced_at + REPLACED_GRACE_SECONDS
            if until > self._clock():
                at = time.strftime("%H:%M:%S", time.localtime(until))
                what = (
                    f"the inbox folder {self._root} was replaced by another folder; a file"
                    f" missing from it is given until {at} to be put back"
                )
                return InboxTrouble(what, hold=False, wait=until - self._clock())
            self._replaced_at = None
        return None

    def inbox_state(self) -> dict[str, object] | None:
        """For the heartbeat and ``status``: ``{"problem", "since"}`` while the inbox folder
        is missing (or not mounted, or not a folder), else None."""
        if self._missing is None:
            return None
        since, what = self._missing
        return {"problem": f"the inbox folder {self._root} {what}", "since": since}

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start-up scan, then file events (or polling scans) until cancelled.

        Calls ``task_status.started()`` once the start-up scan has registered every existing
        file: files already complete have been handed to ``on_ready`` and the others are
        waiting to settle (so the service can send READY). An inbox folder that is missing at
        the start is reported (``watcher.inbox_missing``) and waited for; ``started()`` is then
        called at once, and the start-up scan runs when the folder appears.
        """
        if self._running:
            raise RuntimeError("Watcher.run() is already running")
        self._running = True
        self._wake = anyio.Event()
        self._drained = anyio.Event()
        self._rescan_wanted = anyio.Event()
        self._root_back = anyio.Event()
        self._root_id = None
        self._missing = None
        stop = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                try:
                    tg.start_soon(self._timer_loop)
                    self._check_root()
                    if not self._root_back.is_set():
                        # The daemon still has work without it (queued uploads, imports,
                        # status): say "started", then wait for the folder.
                        task_status.started()
                        task_status = anyio.TASK_STATUS_IGNORED
                        tg.start_soon(self._root_loop)
                        await self._root_back.wait()
                    else:
                        tg.start_soon(self._root_loop)
                    tg.start_soon(self._event_loop, stop)
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
                    tg.start_soon(self._log_completeness)
                    await anyio.sleep_forever()
                finally:
                    # Set before the task group waits for its children: the watchfiles worker
                    # thread checks this event every step and cannot be interrupted otherwise
                    # (it would hold cancellation up for its 5 s timeout).
                    stop.set()
        finally:
            self._running = False

    # ------------------------------------------------------------------ the inbox folder itself

    def _root_state(self) -> tuple[int, int, bool] | str:
        """(st_dev, st_ino, is a mount point) of the inbox folder, or what is wrong with it."""
        try:
            st = os.stat(self._root)
        except FileNotFoundError:
            parent = os.path.dirname(self._root)
            if parent != self._root and not os.path.isdir(parent):
                return f"does not exist (nor does its parent folder {parent})"
            return "does not exist"
        except NotADirectoryError:
            return "cannot be reached: a folder on its path is not a folder"
        except OSError as exc:  # EACCES, EIO of a dying disk, ESTALE/ENOTCONN of a share
            return f"cannot be reached: {exc.strerror or exc}"
        if not stat.S_ISDIR(st.st_mode):
            return "is not a folder"
        try:
            up = os.stat(os.path.dirname(os.path.realpath(self._root)))
            mount = st.st_dev != up.st_dev or st.st_ino == up.st_ino
        except OSError:
            mount = False
        if self._root_mount and not mount and (st.st_dev, st.st_ino) != self._root_id:
            # Its filesystem was unmounted: what is left is the empty folder it was mounted
            # on. Watching that would treat every file of the inbox as deleted.
            return "is not mounted (the folder is there, the filesystem mounted on it is not)"
        return st.st_dev, st.st_ino, mount

    def _check_root(self) -> None:
        """Look at the inbox folder; on a change, log it once and re-arm the event source."""
        state = self._root_state()
        now = self._clock()
        if isinstance(state, str):
            if self._missing is None:
                self._root_changes += 1
                self._missing = (now, state)
                self._root_back = anyio.Event()
                log.error(
                    "watcher.inbox_missing",
                    inbox=_display(self._root),
                    problem=state,
                    hint="inboxd keeps running and picks the folder up again by itself when"
                    " it is back (checked every second); until then no file is taken and"
                    " queued uploads wait. Re-create or re-mount it, or fix [inbox] path",
                )
                self._restart_events()  # it watches a folder that is gone
            elif self._missing[1] != state:
                self._missing = (self._missing[0], state)
                log.warning("watcher.inbox_missing", inbox=_display(self._root), problem=state)
            return
        dev, ino, mount = state
        previous, self._root_id, self._root_mount = self._root_id, (dev, ino), mount
        replaced = previous is not None and (previous != (dev, ino) or self._root_deleted)
        self._root_deleted = False
        if replaced or self._missing is not None:
            self._root_changes += 1
            if self._scans_begun:  # (else the start-up scan is still to come)
                self._rescan_wanted.set()  # whatever is in it now
        if replaced:
            self._replaced_at = now
            self._restart_events()  # re-arm on the new folder
        if self._missing is not None:
            since = self._missing[0]
            self._missing = None
            log.warning(
                "watcher.inbox_back",
                inbox=_display(self._root),
                missing_seconds=round(now - since, 1),
                replaced=replaced,
            )
            self._root_back.set()
        elif replaced:
            log.warning(
                "watcher.inbox_replaced",
                inbox=_display(self._root),
                hint="another folder now has the inbox's path; watching and scanning it",
            )
        else:
            self._root_back.set()

    async def _root_loop(self) -> None:
        """Look at the inbox folder every second: cheap, and the only way to notice it coming
        back (there is nothing to watch while it is missing) or being mounted over."""
        while True:
            await anyio.sleep(_ROOT_CHECK_SECONDS)
            self._check_root()

    def _restart_events(self) -> None:
        if self._events_scope is not None:
            self._events_scope.cancel()

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
            return _file_obs(rel, st)
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
            return _file_obs(rel, st)
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

    # ------------------------------------------------------------------ writers (loop only)

    def _gate(self, rel: str, p: _Pending | None, obs: _Obs, now: float) -> None:
        """The settle rule says ``rel`` is complete: take it, unless a writer still has it.

        ``p`` is None for a file a scan found already old. Files whose writers no event told
        us about are collected for one /proc pass (``_ask_writers``).
        """
        if self._writer_timeout <= 0 or (p is not None and p.writer == _W_CLOSED):
            self._ready(rel, obs[3], obs[4], obs[6], obs[5])
        else:
            # Also when inotify says a writer has it: /proc, where it sees every process,
            # may tell that nobody has (a close the events missed).
            self._asking.append(obs)

    def _hold(self, rel: str, p: _Pending, now: float) -> None:
        """A writer holds ``rel`` open: look again later, or take it if it has not changed
        for ``writer_timeout`` seconds (a crashed or hung logger)."""
        quiet = now - p.since
        if quiet >= self._writer_timeout:
            log.warning(
                "watcher.taken_while_open",
                rel=_display(rel),
                unchanged_seconds=round(quiet),
                hint="a process still holds it open for writing but has not changed it for"
                " inbox.writer_timeout_seconds (crashed or hung?); taken as it is now. If it"
                " is written again, the new version is delivered as well",
            )
            self._ready(rel, p.size, p.mtime_ns, p.inode, p.ctime_ns)
            return
        if not p.warned:
            p.warned = True
            log.info(
                "watcher.held_open",
                rel=_display(rel),
                seen_by="inotify" if p.writer == _W_WRITING else "/proc",
                taken_anyway_in=round(self._writer_timeout - quiet),
            )
        wake = p.since + self._writer_timeout
        if p.writer == _W_HELD:
            # No event may ever come (polling, another user's writer): ask /proc again, on a
            # grid so that the held files share their passes.
            wake = min(wake, (math.floor(now / _HELD_RECHECK) + 1) * _HELD_RECHECK)
        p.recheck = True
        self._push(rel, p, wake)

    async def _ask_writers(self, scan_pass: list[writers.Writers] | None = None) -> None:
        """Settled files no event spoke for: one /proc pass says which a process holds open
        for writing. ``scan_pass``: a scan's holder for one pass that serves all its chunks."""
        if not self._asking:
            return
        asking, self._asking = self._asking, []
        if scan_pass is not None:
            if not scan_pass:
                scan_pass.append(await anyio.to_thread.run_sync(writers.scan, None))
            found = scan_pass[0]
        else:
            keys = {(o[7], o[6]) for o in asking}
            found = await anyio.to_thread.run_sync(writers.scan, keys)
        now = self._clock()
        settling, writing = self._settling, found.writing
        for obs in asking:
            rel = obs[1]
            p = settling.get(rel)
            if p is None and (obs[7], obs[6]) not in writing:
                self._ready(rel, obs[3], obs[4], obs[6], obs[5])  # the usual case, first
                continue
            if p is not None and not p.same(obs[3], obs[4], obs[5], obs[6]):
                continue  # it changed while we asked: its new schedule stands
            if p is not None and p.writer == _W_CLOSED:
                self._ready(rel, obs[3], obs[4], obs[6], obs[5])  # closed meanwhile (an event)
            elif (obs[7], obs[6]) in writing:
                if p is None:
                    p = self._new_pending(obs, now)
                    self._announce(rel, p)
                if p.writer != _W_WRITING:
                    p.writer = _W_HELD
                self._hold(rel, p, now)
            elif p is not None and p.writer == _W_WRITING and not found.complete:
                self._hold(rel, p, now)  # a writer /proc cannot show (another user's)
            elif p is not None and p.writer in (_W_HELD, _W_WRITING):
                # Closed since (or nobody has it after all): settle from now.
                p.writer = _W_UNKNOWN
                p.due = now + self._settle
                self._push(rel, p, p.due)
            else:
                self._ready(rel, obs[3], obs[4], obs[6], obs[5])

    def _apply_writes(self, writes: dict[str, int], now: float) -> None:
        """What inotify said about the writers of files that are waiting."""
        for path, code in writes.items():
            rel = self._rel_of(path)
            p = self._settling.get(rel) if rel is not None else None
            if p is None or rel is None:
                continue
            if code == inotify.CLOSED:
                if now - p.since > _CLOSE_SLACK:
                    # Closed after a pause: it must stay unchanged for settle_seconds after
                    # the close (a writer may reopen it to append).
                    p.due = max(p.due, now + self._settle)
                self._push(rel, p, max(p.due, now))
                p.writer, p.opened = _W_CLOSED, False
            elif code == inotify.WRITING or (code == inotify.MODIFIED and p.opened):
                p.writer, p.opened = _W_WRITING, True
            elif code == inotify.OPENED:
                p.opened = True
                if p.writer != _W_WRITING:  # else: opened again (a reader?) while written
                    p.writer = _W_UNKNOWN
            else:
                # RESET: another inode has the name now. MODIFIED with no open seen:
                # truncate(2) by path, or a writer from before we watched. READ_CLOSED: the
                # open seen was a reader's (our own upload, say), the modify maybe not through
                # it. /proc decides; where it cannot see, settle_seconds does, as before.
                p.writer = _W_UNKNOWN
                if code != inotify.MODIFIED:
                    p.opened = False
            if p.due <= now and code != inotify.CLOSED:
                # Settled and held: what was just learnt may release it; decide again now.
                p.recheck = True
                self._push(rel, p, now)

    def _writers_unknown(self) -> None:
        """Events were lost: what they said about writers may be out of date."""
        for p in self._settling.values():
            p.opened = False
            if p.writer in (_W_WRITING, _W_CLOSED):
                p.writer = _W_UNKNOWN

    async def _log_completeness(self) -> None:
        """Say once how completeness is decided here (``inboxd check`` shows the same)."""
        seen = await anyio.to_thread.run_sync(
            writers.visibility, Path(self._root), self._events_kind, self._writer_timeout
        )
        (log.info if seen.ok else log.warning)("watcher.completeness", method=seen.text)

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
            self._observe_file(obs, now, from_scan=from_scan)
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

    def _observe_file(self, obs: _Obs, now: float, *, from_scan: bool) -> None:
        rel, size, mtime_ns, ctime_ns, inode = obs[1], obs[3], obs[4], obs[5], obs[6]
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
                p = self._new_pending(obs, self._settle_at(mtime_ns, ctime_ns, now, trust_old=True))
            p.recheck = True
            self._push(rel, p, now)
            return
        due = self._settle_at(mtime_ns, ctime_ns, now, trust_old=from_scan)
        if p is None:
            if due <= now + _EPSILON:  # old file found by a scan: is it still written?
                if self._writer_timeout > 0:
                    self._asking.append(obs)  # (what _gate does, inline: 50,000 at start-up)
                else:
                    self._ready(rel, size, mtime_ns, inode, ctime_ns)
                return
            p = self._new_pending(obs, due)
            self._announce(rel, p)
            self._push(rel, p, due)
            return
        p.size, p.mtime_ns, p.ctime_ns, p.inode, p.dev = size, mtime_ns, ctime_ns, inode, obs[7]
        p.due = p.since = due
        p.since -= self._settle
        p.version += 1
        # Announced once, not on every write: the service records each call in SQLite, and a
        # file being logged to changes many times a second.
        if not p.announced:
            self._announce(rel, p)
        self._push(rel, p, due)

    def _new_pending(self, obs: _Obs, due: float) -> _Pending:
        p = _Pending(obs[3], obs[4], obs[5], obs[6], due, obs[7])
        p.since = due - self._settle
        self._settling[obs[1]] = p
        return p

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
        await self._ask_writers()

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
        if p.same(obs[3], obs[4], obs[5], obs[6]):
            p.recheck = False
            if p.due <= now + _EPSILON:
                self._gate(rel, p, obs, now)
            else:
                if not p.announced:
                    self._announce(rel, p)
                self._push(rel, p, p.due)
            return
        p.recheck = False
        self._observe_file(obs, now, from_scan=False)

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
        if self._missing is not None:
            return  # nothing to scan; the scan that follows its return finds everything
        self._scans_begun += 1
        seen: set[str] = set()
        started = time.monotonic()
        failed = await self._scan([""], seen)
        self._scan_count += 1
        if "" in failed:
            self._check_root()  # the inbox itself could not be listed: gone?
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
        scan_pass: list[writers.Writers] = []  # one /proc pass for the whole scan, if needed
        try:
            while True:
                chunk = await anyio.to_thread.run_sync(scanner.take, _SCAN_CHUNK)
                if not chunk:
                    return scanner.failed
                now = self._clock()
                for obs in chunk:
                    self._observe(obs, now, from_scan=True)
                self._flush_gone()
                await self._ask_writers(scan_pass)
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
            if tree.lost == "removed":
                self._root_deleted = True
            tree.close()

    def _overflowed(self) -> None:
        log.warning("watcher.events_overflow", hint="the kernel dropped events; rescanning")
        self._writers_unknown()
        self._rescan_wanted.set()

    async def _poll_loop(self) -> None:
        while True:
            await anyio.sleep(_POLL_SECONDS)
            self._rescan_wanted.set()

    async def _event_loop(self, stop: anyio.Event) -> None:
        failures = 0
        while not stop.is_set():
            if not self._root_back.is_set():  # (no checkpoint when it is: see run())
                await self._root_back.wait()
            started = time.monotonic()
            handler_error: Exception | None = None
            delay = 0.0
            with anyio.CancelScope() as self._events_scope:
                try:
                    async with self._events(stop) as changes:
                        async for batch in changes:
                            writes = (
                                changes.take_writes()
                                if isinstance(changes, inotify.InotifyTree)
                                else {}
                            )
                            try:
                                await self._handle_changes(batch, writes)
                            except Exception as exc:
                                handler_error = exc
                                raise
                    return  # the stream ended: stop was set
                except Exception as exc:
                    if handler_error is not None:
                        raise  # our own bug: restarting the event source would not help
                    # watchfiles raises (inside an ExceptionGroup) on any name that is not
                    # valid UTF-8 and loses the whole batch; it also fails when inotify runs
                    # out of watches. The inotify source fails when the inbox itself goes away
                    # (then the folder check says so and we wait for it above). Restart it,
                    # then rescan to recover what was lost.
                    seen_changes = self._root_changes
                    self._check_root()
                    if self._root_changes == seen_changes:  # not the folder's own doing
                        failures = 1 if time.monotonic() - started > 30 else failures + 1
                        delay = backoff_delay(
                            failures, _RESTART_DELAY, _MAX_RESTART_DELAY, jitter="none"
                        )
                        log.warning("watcher.events_failed", error=_describe(exc), retry_in=delay)
            self._events_scope = None
            self._writers_unknown()
            await anyio.sleep(delay)
            # The rescan task only runs once we suspend, which is after the event source has
            # been set up again (see run()), so nothing falls between the two.
            self._rescan_wanted.set()

    async def _handle_changes(
        self, changes: set[tuple[watchfiles.Change, str]], writes: dict[str, int] | None = None
    ) -> None:
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
        if writes:
            self._apply_writes(writes, now)
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
