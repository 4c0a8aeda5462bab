"""Which files some process holds open for writing, from ``/proc`` (Linux only).

The watcher asks this when it has no file events that say whether a file's writer closed it:
files found by a scan (start-up, the periodic rescan, after lost events, polling) and files
that were renamed or opened since their last close. One pass over every process answers for
a whole batch of files, so a scan costs one pass, not one per file.

A pass lists ``/proc/<pid>/fd``. The mode of each fd link there carries the fd's access mode
(``l-wx``/``lrwx`` when it is open for writing), so only fds open for writing are followed to
their file; ``fdinfo``'s ``flags`` confirm the access mode of those that name a file asked
about.

What a pass can see: every process when the daemon runs as root with ``CAP_SYS_PTRACE``;
otherwise only its own user's processes. Another user's ``/proc/<pid>/fd`` cannot be read (or,
with ``hidepid=`` / systemd's ``ProtectProc=invisible``, that process is not listed at all).
The result says whether the pass saw everything (:attr:`Writers.complete`); where it did not,
a file that no visible process holds is taken by ``settle_seconds`` alone. Processes on other
machines (network shares) or in other PID namespaces (containers) are never visible.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

__all__ = ["FileKey", "Visibility", "Writers", "network_filesystem", "scan", "visibility"]

#: (st_dev, st_ino): a file, whatever its name
FileKey = tuple[int, int]

_PROC: Final = "/proc"
_PF_KTHREAD: Final = 0x00200000  # <linux/sched.h>: kernel threads hold no files
_CAP_SYS_PTRACE: Final = 19
_NETWORK_FS: Final = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "ncpfs"}
)


@dataclass(frozen=True)
class Writers:
    """What one pass over ``/proc`` found."""

    #: files asked about (or all regular files, when nothing was asked) open for writing
    writing: frozenset[FileKey]
    #: processes listed whose open files could not be read (another user's)
    hidden: int
    #: /proc may leave out other users' processes altogether (hidepid=, ProtectProc=)
    restricted: bool
    #: /proc could be read at all
    available: bool = True

    @property
    def complete(self) -> bool:
        """Every process that could hold a file open was seen."""
        return self.available and self.hidden == 0 and not self.restricted


def scan(candidates: Collection[FileKey] | None = None) -> Writers:
    """One pass over every visible process: which of ``candidates`` are open for writing.

    ``None`` asks about every regular file (``inboxd check``). Never raises: processes that
    end during the pass are skipped; an unreadable ``/proc`` gives ``available=False``.
    Blocking (it reads /proc): call it from a worker thread.
    """
    if not sys.platform.startswith("linux"):
        return Writers(frozenset(), 0, False, available=False)
    try:
        procs = os.scandir(_PROC)
    except OSError:
        return Writers(frozenset(), 0, False, available=False)
    writing: set[FileKey] = set()
    hidden = 0
    with procs:
        for proc in procs:
            if not proc.name.isdigit():
                continue
            fd_dir = f"{_PROC}/{proc.name}/fd"
            try:
                fds = os.scandir(fd_dir)
            except PermissionError:
                if _holds_files(proc.name):
                    hidden += 1
                continue
            except OSError:
                continue  # ended meanwhile
            with fds:
                if not _add_writers(proc.name, fds, candidates, writing):
                    hidden += 1
    return Writers(frozenset(writing), hidden, _restricted())


def _add_writers(
    pid: str,
    fds: Iterable[os.DirEntry[str]],
    candidates: Collection[FileKey] | None,
    out: set[FileKey],
) -> bool:
    """Add the files process ``pid`` holds open for writing; False if they cannot be read
    (listing another user's fds may be allowed, following them is a ptrace check)."""
    for fd in fds:
        try:
            # lstat of the link: its mode is the fd's access mode, no need to follow it.
            if not fd.stat(follow_symlinks=False).st_mode & stat.S_IWUSR:
                continue
            st = os.stat(fd.path)  # the open file itself (sockets and pipes end here)
        except PermissionError:
            return False
        except OSError:
            continue  # closed meanwhile
        if not stat.S_ISREG(st.st_mode):
            continue
        key = (st.st_dev, st.st_ino)
        if key in out or (candidates is not None and key not in candidates):
            continue
        if _open_for_write(pid, fd.name):
            out.add(key)
    return True


def _open_for_write(pid: str, fd: str) -> bool:
    """fdinfo's access mode; the link's mode already said so where fdinfo cannot be read."""
    try:
        with open(f"{_PROC}/{pid}/fdinfo/{fd}", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)
    except (OSError, ValueError, IndexError):
        pass
    return True


def _holds_files(pid: str) -> bool:
    """False for kernel threads and zombies, which a non-root pass cannot read either."""
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
        return fields[0] != b"Z" and not int(fields[6]) & _PF_KTHREAD
    except (OSError, ValueError, IndexError):
        return False  # ended meanwhile


@cache
def _restricted() -> bool:
    """Whether /proc hides other users' processes from us (``hidepid=`` 2 or 4)."""
    options = _proc_mount_options()
    hidepid = next((o.partition("=")[2] for o in options if o.startswith("hidepid=")), "0")
    if hidepid in ("0", "off", "1", "noaccess"):
        return False  # listed even when unreadable: the pass counts them as hidden
    return not _may_read_all()


def _proc_mount_options() -> list[str]:
    try:
        text = Path(f"{_PROC}/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == _PROC and " - " in line:
            return line.partition(" - ")[2].split()[-1].split(",")
    return []


def _may_read_all() -> bool:
    try:
        for line in Path(f"{_PROC}/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def network_filesystem(path: Path) -> str | None:
    """The type of the network filesystem holding ``path`` (``"nfs4"``, ``"cifs"``…), or None.

    Files written there from another machine are visible to no local check: neither file
    events nor ``/proc`` see that writer.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        real = os.path.realpath(path)
        text = Path(f"{_PROC}/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    best, kind = "", ""
    for line in text.splitlines():
        head, _, tail = line.partition(" - ")
        fields = head.split()
        if len(fields) < 5 or not tail:
            continue
        mount = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, tail.split()[0]
    base = kind.removeprefix("fuse.")
    return kind if base in _NETWORK_FS or base in ("sshfs", "rclone", "s3fs") else None


@dataclass(frozen=True)
class Visibility:
    """How well files still being written can be recognised: for the log and ``check``."""

    ok: bool
    text: str


def visibility(inbox: Path, events: str, writer_timeout: float) -> Visibility:
    """Describe, in one line, how completeness is decided for ``inbox`` on this machine.

    ``events`` is where file events come from ("inotify", "polling", "watchfiles").
    Runs one pass over /proc: call it from a worker thread.
    """
    if writer_timeout <= 0:
        return Visibility(
            True,
            "files are taken once unchanged for settle_seconds (inbox.writer_timeout_seconds"
            " = 0: open writers are not waited for)",
        )
    parts = []
    if events == "inotify":
        parts.append("a file is taken once its writer closed it (inotify close events)")
    seen = scan(())
    user = _user_name()
    if not seen.available:
        parts.append(
            "files found by a scan: no /proc here, so settle_seconds alone decides"
            if events == "inotify"
            else "no file events or /proc here: settle_seconds alone decides"
        )
        ok = events == "inotify"
    elif seen.complete:
        parts.append("files found by a scan are checked in /proc (every process is visible)")
        ok = True
    else:
        why = (
            f"{seen.hidden} {'process' if seen.hidden == 1 else 'processes'} cannot be read"
            f" by {user} (other users' or protected ones)"
            if seen.hidden
            else f"/proc hides other users' processes from {user} (hidepid, ProtectProc)"
        )
        parts.append(
            f"files found by a scan are checked in /proc, but {why}: a file such a process"
            " keeps open is taken by settle_seconds alone unless inotify saw it being written"
        )
        ok = events == "inotify"
    remote = network_filesystem(inbox)
    if remote is not None:
        parts.append(
            f"the inbox is on {remote}: writers on other machines are not visible, so"
            " settle_seconds alone decides for their files"
        )
        ok = False
    return Visibility(ok, "completeness: " + "; ".join(parts))


def _user_name() -> str:
    # Not pwd.getpwuid(): /etc/passwd is none of the daemon's business (the security suite
    # checks which files it opens). systemd sets USER for a User= service.
    uid = os.geteuid()
    name = os.environ.get("USER") or os.environ.get("LOGNAME")
    return f"{name} (uid {uid})" if name else f"uid {uid}"
