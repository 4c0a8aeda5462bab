"""The state's failures: QueueError and the mapping of OS and SQLite errors to it (a full
filesystem, a damaged or foreign file), each with what to do; private files and folders for
the database."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Final, Literal

from daemon.compat import sqlite_errorname
from daemon.errors import StateDataError, StateError, StateFullError

#: Whether a QueueError can clear up: "full" (its filesystem is full), "data" (the file is not a
#: database this inboxd can use: starting again reads the same bytes) or "" (anything else).
QueueErrorReason = Literal["full", "data", ""]


class QueueError(Exception):
    """The state database cannot be used: its message says which file and what to do.

    Not an :class:`~daemon.errors.InboxdError` on purpose: the workers and the poller handle
    InboxdErrors per file and carry on, and carrying on over a database that cannot be written
    only hides the problem. :meth:`as_state_error` is what stops ``inboxd`` with it.
    """

    def __init__(self, message: str, *, reason: QueueErrorReason = "") -> None:
        super().__init__(message)
        self.reason: QueueErrorReason = reason

    def as_state_error(self) -> StateError:
        """The InboxdError to stop ``inboxd`` with; its exit status follows ``reason``."""
        if self.reason == "full":
            return StateFullError(str(self))
        if self.reason == "data":
            return StateDataError(str(self))
        return StateError(str(self))


def make_private_dirs(directory: Path, mode: int = 0o700) -> None:
    """Create ``directory`` and its missing parents, every level with ``mode``.

    Path.mkdir(parents=True) gives the intermediate directories the default mode; create each
    missing level ourselves so every directory we make is private.
    """
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for level in reversed(missing):
        level.mkdir(mode=mode, exist_ok=True)
        level.chmod(mode)  # mkdir's mode is masked by the umask


def create_private_file(path: Path) -> None:
    # SQLite would create the file 0644 (minus umask), but it names every file uploaded and
    # holds their metadata: create it 0600 first. SQLite gives -wal and -shm the same mode.
    if path.exists():
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(fd)


# What a person can do about an unusable database file. A fresh database forgets which files
# were uploaded (the jobs and the ledger): the start-up scan takes every file still in the
# inbox again. The -wal must go with the file: it holds the file's latest commits, and SQLite
# deletes a -wal it finds next to the fresh, empty file.
UNUSABLE_ADVICE: Final = (
    "restore it from a backup, or stop inboxd and move it away together with its -wal and -shm"
    " files (the -wal holds its latest changes): inboxd then starts an empty database and takes"
    " every file in the inbox again, so files kept there after their upload (inbox.after_upload"
    ' = "keep") are uploaded again'
)


# Under this much free space an I/O error is taken for a full filesystem. SQLite reports an
# ENOSPC while it grows -shm or the WAL as a plain "disk I/O error" (SQLITE_IOERR_SHMSIZE,
# SQLITE_IOERR_WRITE, …) and does not pass on the errno; each such growth asks for 32 KiB or
# more, and a state filesystem this close to full is the problem to report either way.
_NEARLY_FULL_BYTES: Final = 1 << 20


def _no_space(directory: Path) -> str | None:
    """How little room the filesystem holding ``directory`` has ("12 KiB free"), or None."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    # Blocks and inodes reserved for root are usable by root only.
    privileged = os.geteuid() == 0
    inodes = st.f_ffree if privileged else st.f_favail
    if st.f_files and not inodes:  # f_files is 0 where inodes are not counted (btrfs)
        return "no free inodes"
    free = (st.f_bfree if privileged else st.f_bavail) * st.f_frsize
    if free < _NEARLY_FULL_BYTES:
        return f"{free // 1024} KiB free"
    return None


def _full_error(path: Path, detail: str) -> QueueError:
    return QueueError(
        f"state database {path}: no space left on its filesystem ({detail}); free space there,"
        " or point [state] path at a filesystem with room — inboxd resumes where it stopped",
        reason="full",
    )


def state_os_error(path: Path, exc: OSError, action: str) -> QueueError:
    """The QueueError for ``exc``, raised while doing ``action`` ("create", …) on ``path`` (the
    state database or a file next to it)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        said = exc.strerror or os.strerror(exc.errno)
        room = _no_space(path.parent)
        return _full_error(path, f"{said}; {room}" if room else said)
    return QueueError(
        f"cannot {action} {path}: {exc}; check the [state] path setting and that this user may"
        " read and write its directory"
    )


def sqlite_error(path: Path, exc: sqlite3.Error) -> QueueError | None:
    """The QueueError for a full filesystem or an unusable file, or None for anything else."""
    name = sqlite_errorname(exc)
    if name == "SQLITE_NOTADB":
        return QueueError(
            f"state database {path} is not a valid SQLite database ({exc}); {UNUSABLE_ADVICE}",
            reason="data",
        )
    if name == "SQLITE_CORRUPT" or name.startswith("SQLITE_CORRUPT_"):
        return QueueError(
            f"state database {path} is corrupt ({exc}); {UNUSABLE_ADVICE}", reason="data"
        )
    if name == "SQLITE_FULL" or name.startswith(("SQLITE_IOERR", "SQLITE_CANTOPEN")):
        room = _no_space(path.parent)
        if room is not None:
            return _full_error(path, f"{room}; SQLite: {exc}")
        if name == "SQLITE_FULL":
            return _full_error(path, f"SQLite: {exc}")
    return None


def wal_has_frames(db: Path) -> bool:
    # A WAL file holds a 32-byte header before its first frame.
    try:
        return db.with_name(db.name + "-wal").stat().st_size > 32
    except FileNotFoundError:
        return False


def open_error(path: Path, exc: sqlite3.Error) -> QueueError:
    return sqlite_error(path, exc) or QueueError(
        f"cannot open state database {path}: {exc}; check that the path is on a local"
        " filesystem and that its directory and file are readable and writable by this user"
    )
