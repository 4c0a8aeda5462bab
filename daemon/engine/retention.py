"""Disk retention for ``after_upload = "archive"``: prune the archive by age and for free space.

Rules, in order of importance:

1. A file is removed only if the queue confirms it was uploaded *and* imported
   (:meth:`daemon.state.Queue.is_archived_upload`: a DONE job or a ledger row with the same
   path, size and mtime). Anything else in the archive -- a file put there by hand, a file
   changed after it was archived, a half-copied ``.inboxd-partial`` -- is never touched.
2. Nothing outside the archive folder is touched: the walk never follows a symlink (symlinks
   are neither followed nor removed), and each removal re-opens the path one directory at a
   time with ``O_NOFOLLOW`` and re-checks the file, so a directory swapped for a symlink
   meanwhile cannot redirect it.
3. Age: confirmed files archived more than ``max_age_days`` ago are removed. The archive time
   is the file's ctime -- moving it into the archive (rename or copy) sets it, and the queue's
   ``finished_at`` is not available by path without another query.
4. Free space: while the inbox's filesystem has less free space than ``min_free_bytes`` /
   ``min_free_percent``, the oldest confirmed files (on that same filesystem) are removed
   first. When nothing removable is left, ``retention.still_low`` is logged (once per episode).
5. ``disk.low`` is logged (once per crossing) when free space falls below
   ``warn_free_percent``; :class:`RetentionReport` carries the numbers for status and metrics.
6. Directories left empty are removed (never the archive root itself, and never a directory
   that was just created: the disposal may be about to move a file into it).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from daemon.state import Queue, QueueError

__all__ = ["FreeSpace", "Retention", "RetentionReport", "disk_free"]

_log = structlog.get_logger(__name__)

#: ``(free, total)`` bytes of the filesystem holding a path.
FreeSpace = Callable[[Path], tuple[int, int]]

_DAY: Final = 86_400.0
#: An empty directory younger than this is left alone: the disposal creates a directory and
#: then moves the file into it, and removing it in between would fail that move.
EMPTY_DIR_GRACE_SECONDS: Final = 60.0
# Disposal renames "<rel>" to "<rel>.<job_id>" when "<rel>" is already in the archive.
_JOB_SUFFIX: Final = re.compile(r"^(?P<rel>(?:.*/)?[^/]+)\.[0-9]+$", re.DOTALL)
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)


def disk_free(path: Path) -> tuple[int, int]:
    """``(free, total)`` bytes of the filesystem holding ``path``.

    Free is what an unprivileged user may still write (``shutil.disk_usage``; root's reserved
    blocks are not counted, the daemon does not run as root).
    """
    usage = shutil.disk_usage(path)
    return usage.free, usage.total


@dataclass(frozen=True)
class RetentionReport:
    """What one retention pass did and saw, for logs, ``status`` and metrics."""

    #: archive-relative paths removed in this pass, oldest first within each reason
    removed: list[str] = field(default_factory=list)
    #: bytes those files held
    freed_bytes: int = 0
    #: free and total bytes of the inbox's filesystem after the pass
    free_bytes: int = 0
    total_bytes: int = 0
    #: free space is below ``warn_free_percent``
    disk_low: bool = False
    #: free space is still below the minimum and nothing more may be removed
    still_low: bool = False
    #: regular files seen in the archive (0 when the pass did not need to walk it)
    scanned: int = 0
    #: files that were due (by age or for space) but kept: the queue does not confirm them
    unconfirmed: int = 0
    #: ``clock()`` when the pass ended
    at: float = 0.0

    @property
    def free_percent(self) -> float:
        """Free space as a percentage of the filesystem (100.0 when total is unknown)."""
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 100.0

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able summary (without the list of paths) for the heartbeat and metrics."""
        return {
            "free_bytes": self.free_bytes,
            "total_bytes": self.total_bytes,
            "free_percent": round(self.free_percent, 2),
            "disk_low": self.disk_low,
            "still_low": self.still_low,
            "removed": len(self.removed),
            "freed_bytes": self.freed_bytes,
            "scanned": self.scanned,
            "unconfirmed": self.unconfirmed,
            "at": self.at,
        }


@dataclass(frozen=True)
class _File:
    rel: str  # relative to the archive, "/"-separated, as os.fsdecode gives it
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    nlink: int
    blocks: int  # st_blocks (512-byte units)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.rel, self.size, self.mtime_ns)

    @property
    def reclaim(self) -> int:
        """Bytes removing it should give back: allocated, not apparent, size; 0 if linked."""
        if self.nlink > 1:
            return 0  # another name keeps the data
        return min(self.size, self.blocks * 512)


@dataclass
class _Tree:
    files: list[_File]
    dirs: dict[str, float]  # rel → mtime (seconds)
    children: dict[str, int]  # rel ("" = root) → number of entries of any kind
    problems: list[str]


@dataclass
class _Pass:
    removed: list[str] = field(default_factory=list)
    removed_set: set[str] = field(default_factory=set)
    freed: int = 0
    scanned: int = 0
    unconfirmed: set[str] = field(default_factory=set)
    still_low: bool = False
    touched_dirs: set[str] = field(default_factory=set)


class Retention:
    """Prunes the archive folder; see the module docstring for the rules."""

    def __init__(
        self,
        archive: Path,
        *,
        queue: Queue,
        max_age_days: float | None,
        min_free_bytes: int | None,
        min_free_percent: float | None,
        warn_free_percent: float | None,
        inbox: Path,
        free_space: FreeSpace = disk_free,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Set up retention for ``archive``; free space is measured where ``inbox`` lives.

        ``None`` disables a rule. ``free_space(path) -> (free, total)`` and ``clock`` exist so
        that tests can simulate a filling disk and the passing of days.
        """
        for name, value in (("max_age_days", max_age_days), ("min_free_bytes", min_free_bytes)):
            if value is not None and not value >= 0:
                raise ValueError(f"retention {name} must be >= 0, not {value}")
        for name, pct in (
            ("min_free_percent", min_free_percent),
            ("warn_free_percent", warn_free_percent),
        ):
            if pct is not None and not 0 <= pct <= 100:
                raise ValueError(f"retention {name} must be between 0 and 100, not {pct}")
        self.archive = Path(archive)
        self.inbox = Path(inbox)
        self.queue = queue
        self.max_age_days = max_age_days
        self.min_free_bytes = min_free_bytes
        self.min_free_percent = min_free_percent
        self.warn_free_percent = warn_free_percent
        self._free_space = free_space
        self._clock = clock
        self._lock = anyio.Lock()
        self._disk_low = False
        self._still_low = False
        # Confirmations never expire (DONE stays DONE, ledger rows stay); both sets are cut
        # down to the files seen in the latest walk so they stay as large as the archive.
        self._confirmed: set[tuple[str, int, int]] = set()
        self._told_unconfirmed: set[tuple[str, int, int]] = set()
        #: the last pass's report (None before the first), for status and metrics
        self.last_report: RetentionReport | None = None

    # -- public ---------------------------------------------------------------------------------

    async def run(
        self,
        interval: float = 300,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """A pass every ``interval`` seconds (the first at once) until cancelled."""
        task_status.started()
        while True:
            try:
                await self.once()
            except QueueError:
                raise  # the state database failed: the service stops and says why
            except Exception as exc:
                # Housekeeping: a broken pass is reported and tried again, it must never take
                # the uploads down with it.
                _log.error("retention.error", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            await anyio.sleep(interval)

    async def once(self) -> RetentionReport:
        """One pass: age pruning, free-space pruning, empty directories, the disk-low check."""
        async with self._lock:
            report = await self._pass()
        self.last_report = report
        return report

    # -- one pass -------------------------------------------------------------------------------

    def _needed_free(self, total: int) -> int:
        need = self.min_free_bytes or 0
        if self.min_free_percent is not None:
            need = max(need, math.ceil(total * self.min_free_percent / 100))
        return need

    async def _read_free(self) -> tuple[int, int]:
        # In a thread: statvfs on a network or failing disk can block.
        return await anyio.to_thread.run_sync(self._free_space, self.inbox)

    async def _pass(self) -> RetentionReport:
        free, total = await self._read_free()
        need = self._needed_free(total)
        if self.max_age_days is None and free >= need:
            # Nothing can be due: no need to walk the archive at all.
            return self._finish(_Pass(), free, total, need)

        work = _Pass()
        tree = await anyio.to_thread.run_sync(_walk, str(self.archive))
        for problem in tree.problems:
            _log.warning("retention.walk_error", archive=str(self.archive), error=problem)
        work.scanned = len(tree.files)
        seen = {f.key for f in tree.files}
        self._confirmed &= seen
        self._told_unconfirmed &= seen
        oldest_first = sorted(tree.files, key=lambda f: (f.ctime_ns, f.mtime_ns, f.rel))

        if self.max_age_days is not None:
            cutoff_ns = int((self._clock() - self.max_age_days * _DAY) * 1e9)
            for f in oldest_first:
                if f.ctime_ns >= cutoff_ns:
                    break  # sorted by ctime: the rest are younger
                await self._prune(f, "age", work, tree)

        free, total = await self._read_free()
        need = self._needed_free(total)
        if free < need:
            # Removing a file on another filesystem would not help the inbox's.
            inbox_dev = await anyio.to_thread.run_sync(lambda: os.stat(self.inbox).st_dev)
            base, reclaimed = free, 0
            for f in oldest_first:
                # Some filesystems (btrfs, ZFS) report freed space only later: trust our own
                # tally as well, or one pass would empty the whole archive.
                if max(free, base + reclaimed) >= need:
                    break
                if f.dev != inbox_dev or f.rel in work.removed_set:
                    continue
                if await self._prune(f, "free_space", work, tree):
                    reclaimed += f.reclaim
                    free, total = await self._read_free()
            work.still_low = max(free, base + reclaimed) < need

        await anyio.to_thread.run_sync(
            _remove_empty_dirs, str(self.archive), tree, work.touched_dirs, self._clock()
        )
        free, total = await self._read_free()
        return self._finish(work, free, total, need)

    async def _prune(
        self, f: _File, reason: Literal["age", "free_space"], work: _Pass, tree: _Tree
    ) -> bool:
        if not await self._is_confirmed(f):
            work.unconfirmed.add(f.rel)
            return False
        outcome = await anyio.to_thread.run_sync(_remove_file, str(self.archive), f)
        log = _log.bind(path=f.rel, reason=reason)
        if outcome != "removed":
            # Changed or gone since the walk, or the removal failed: keep it for the next pass.
            level = log.warning if outcome.startswith("error") else log.info
            level("retention.skipped", outcome=outcome)
            return False
        age_days = (self._clock() - f.ctime_ns / 1e9) / _DAY
        log.info("retention.removed", size=f.size, archived_days_ago=round(age_days, 2))
        work.removed.append(f.rel)
        work.removed_set.add(f.rel)
        work.freed += f.size
        parent = f.rel.rpartition("/")[0]
        work.touched_dirs.add(parent)
        tree.children[parent] -= 1
        return True

    async def _is_confirmed(self, f: _File) -> bool:
        if f.key in self._confirmed:
            return True
        confirmed = await self.queue.is_archived_upload(f.rel, f.size, f.mtime_ns)
        if not confirmed and (match := _JOB_SUFFIX.match(f.rel)) is not None:
            confirmed = await self.queue.is_archived_upload(match["rel"], f.size, f.mtime_ns)
        if confirmed:
            self._confirmed.add(f.key)
        elif f.key not in self._told_unconfirmed:
            self._told_unconfirmed.add(f.key)
            _log.debug(
                "retention.unconfirmed",
                path=f.rel,
                reason="no imported upload with this path, size and mtime; kept",
            )
        return confirmed

    def _finish(self, work: _Pass, free: int, total: int, need: int) -> RetentionReport:
        percent = 100.0 * free / total if total else 100.0
        low = self.warn_free_percent is not None and percent < self.warn_free_percent
        if low and not self._disk_low:
            _log.warning(
                "disk.low",
                path=str(self.inbox),
                free_bytes=free,
                total_bytes=total,
                free_percent=round(percent, 2),
                warn_below_percent=self.warn_free_percent,
                action="free space on that disk (uploaded files are kept in the archive until"
                " [retention] removes them); uploads go on meanwhile",
            )
        elif self._disk_low and not low:
            _log.info(
                "disk.ok", path=str(self.inbox), free_bytes=free, free_percent=round(percent, 2)
            )
        self._disk_low = low
        if work.still_low and not self._still_low:
            _log.warning(
                "retention.still_low",
                path=str(self.inbox),
                free_bytes=free,
                needed_free_bytes=need,
                kept_unconfirmed=len(work.unconfirmed),
                reason="nothing left in the archive that may be removed (only files confirmed"
                " uploaded and imported are); free space some other way",
            )
        self._still_low = work.still_low
        if work.removed:
            _log.info(
                "retention.pass",
                removed=len(work.removed),
                freed_bytes=work.freed,
                free_bytes=free,
                free_percent=round(percent, 2),
            )
        return RetentionReport(
            removed=list(work.removed),
            freed_bytes=work.freed,
            free_bytes=free,
            total_bytes=total,
            disk_low=low,
            still_low=work.still_low,
            scanned=work.scanned,
            unconfirmed=len(work.unconfirmed),
            at=self._clock(),
        )


# ---------------------------------------------------------------------------------------------
# File system work (run in a worker thread)


def _walk(root: str) -> _Tree:
    """Every regular file and directory under ``root``, iteratively, never following links."""
    tree = _Tree(files=[], dirs={}, children={}, problems=[])
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        count = 0
        try:
            with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as entries:
                for entry in entries:
                    count += 1
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # vanished meanwhile
                    if stat.S_ISDIR(st.st_mode):
                        tree.dirs[rel] = st.st_mtime
                        stack.append(rel)
                    elif stat.S_ISREG(st.st_mode):
                        tree.files.append(
                            _File(
                                rel=rel,
                                size=st.st_size,
                                mtime_ns=st.st_mtime_ns,
                                ctime_ns=st.st_ctime_ns,
                                ino=st.st_ino,
                                dev=st.st_dev,
                                nlink=st.st_nlink,
                                blocks=getattr(st, "st_blocks", (st.st_size + 511) // 512),
                            )
                        )
                    # Symlinks, sockets, fifos: counted (their folder is not empty), else left.
        except FileNotFoundError:
            if rel_dir:
                tree.dirs.pop(rel_dir, None)  # removed meanwhile
            # A missing archive root is normal before the first file was archived.
            continue
        except OSError as exc:
            tree.problems.append(f"{rel_dir or '.'}: {exc.strerror}")
            count = max(count, 1)  # unreadable: never treat it as empty
        tree.children[rel_dir] = count
    return tree


def _open_dir(root: str, rel_dir: str) -> int:
    """An fd for ``root/rel_dir``, opening each component with O_NOFOLLOW (root itself may be a
    configured symlink)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in rel_dir.split("/") if rel_dir else ():
            child = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_file(root: str, f: _File) -> str:
    """Unlink ``f`` if it is still the file the walk saw; returns what happened."""
    parent, _, name = f.rel.rpartition("/")
    try:
        fd = _open_dir(root, parent)
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        return f"error: {exc.strerror}"
    try:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return "gone"
        if not stat.S_ISREG(st.st_mode) or (
            st.st_size,
            st.st_mtime_ns,
            st.st_ino,
            st.st_dev,
        ) != (f.size, f.mtime_ns, f.ino, f.dev):
            return "changed"
        os.unlink(name, dir_fd=fd)
        return "removed"
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        return f"error: {exc.strerror}"
    finally:
        os.close(fd)


def _remove_empty_dirs(root: str, tree: _Tree, touched: set[str], now: float) -> None:
    """Remove directories that are empty now, deepest first; never ``root`` itself.

    A directory qualifies if this pass emptied it (``touched``) or it has been unchanged for
    :data:`EMPTY_DIR_GRACE_SECONDS`; the entry counts from the walk (less what this pass
    removed) spare an ``rmdir`` attempt on every non-empty directory.
    """
    for rel in sorted(tree.dirs, key=lambda d: d.count("/"), reverse=True):
        if tree.children.get(rel, 1) != 0:
            continue
        if rel not in touched and now - tree.dirs[rel] < EMPTY_DIR_GRACE_SECONDS:
            continue
        parent, _, name = rel.rpartition("/")
        try:
            fd = _open_dir(root, parent)
        except OSError:
            continue
        try:
            os.rmdir(name, dir_fd=fd)  # fails (kept) if something appeared meanwhile
        except OSError:
            continue
        finally:
            os.close(fd)
        _log.debug("retention.removed_dir", path=rel)
        tree.children[parent] = tree.children.get(parent, 1) - 1
        touched.add(parent)
