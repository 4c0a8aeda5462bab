"""``after_upload``: keep, archive or delete a file once its import finished.

Only a file that is still the very file that was uploaded (same size, mtime and inode) is moved
or deleted; anything else is left where it is with a logged reason. Nothing outside the inbox
and the archive folder is ever touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import structlog

from daemon.state import Job, Queue, make_private_dirs

_log = structlog.get_logger(__name__)


class Disposal:
    """Applies the ``after_upload`` action to DONE jobs."""

    def __init__(
        self,
        queue: Queue,
        inbox: Path,
        action: Literal["keep", "archive", "delete"],
        archive: Path | None,
        *,
        interval: float = 2.0,
        inbox_trouble: Callable[[], object | None] | None = None,
    ) -> None:
        self.queue = queue
        self.inbox = inbox
        self.action = action
        self.archive = archive
        self.interval = interval
        #: while it reports trouble with the inbox folder (missing, just replaced), files are not
        #: looked for: they would all be recorded as "gone", and stay in place once it is back
        self.inbox_trouble = inbox_trouble

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Handle finished jobs until cancelled."""
        task_status.started()
        while True:
            await self.once()
            await anyio.sleep(self.interval)

    async def once(self) -> int:
        """One pass; returns the number of jobs handled."""
        jobs = await self.queue.jobs_for_after_upload(limit=500)
        if self.action == "keep":
            # Nothing to do on disk: record the whole batch in one write.
            await self.queue.set_after_upload_many({job.id: "kept" for job in jobs})
            return len(jobs)
        if jobs and self.inbox_trouble is not None and self.inbox_trouble() is not None:
            return 0
        for job in jobs:
            # One job at a time: each move or delete is recorded before the next one starts.
            outcome = await anyio.to_thread.run_sync(self._apply, job)
            await self.queue.set_after_upload(job.id, outcome)
        return len(jobs)

    def _apply(self, job: Job) -> str:
        if self.action == "keep":
            return "kept"
        ident = job.identity
        src = self.inbox / ident.rel
        log = _log.bind(job_id=job.id, path=ident.rel)
        if not _inside(self.inbox, src):
            # A folder on the way was replaced by a symlink since the upload: whatever the
            # path names now is not the file we uploaded, and may be outside the inbox.
            log.warning("after_upload.outside", reason="a folder in its path is now a symlink")
            return "changed"
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            log.info("after_upload.gone")
            return "gone"
        rewritten = bool(ident.ctime_ns) and st.st_ctime_ns != ident.ctime_ns
        if rewritten or (st.st_size, st.st_mtime_ns, st.st_ino) != (
            ident.size,
            ident.mtime_ns,
            ident.inode,
        ):
            log.warning(
                "after_upload.changed", reason="file changed since its upload; left in place"
            )
            return "changed"
        try:
            if self.action == "delete":
                os.unlink(src)
                log.info("after_upload.deleted")
                return "deleted"
            assert self.archive is not None
            dst = self.archive / ident.rel
            make_private_dirs(dst.parent, 0o750)
            if dst.exists():
                dst = dst.with_name(f"{dst.name}.{job.id}")
            os.replace(src, dst) if _same_fs(src, dst.parent) else _copy_then_unlink(src, dst)
            log.info("after_upload.archived", to=str(dst))
            return "archived"
        except OSError as exc:
            log.error("after_upload.error", error=f"{type(exc).__name__}: {exc.strerror}")
            return f"error: {exc.strerror}"


def _inside(root: Path, path: Path) -> bool:
    """``path`` lies in ``root`` with no symlink among its folders (the file itself may be)."""
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(path.parent)
    return real_parent == real_root or real_parent.startswith(real_root + os.sep)


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _copy_then_unlink(src: Path, dst: Path) -> None:
    import shutil

    tmp = dst.with_name(dst.name + ".inboxd-partial")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)
    os.unlink(src)
