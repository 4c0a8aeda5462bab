"""``inboxd install-files``: put the config, the unit and the rest where the system finds them.

The files ship inside the package (``daemon/share/`` in the wheel, see ``pyproject.toml``'s
``force-include``), so a PC installed from a wheel or an offline bundle needs no checkout. A
checkout (or an editable install) has no ``share/`` folder: the files are read from where they
live in the repository instead. ``--prefix DIR`` writes under DIR as if it were ``/``
(packaging, tests, a look before the real thing); ``--dry-run`` only says what it would do.

The config is never overwritten: an existing ``/etc/inboxd/config.toml`` is kept, and the
example of this version goes to ``/usr/share/doc/inboxd/`` to compare with. Everything else is
replaced by this version's file, which is what an upgrade wants.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from daemon.errors import NoPermissionError, NotThereError

#: the ``daemon`` package folder (this module is in ``daemon/commands/``)
_PACKAGE = Path(__file__).resolve().parents[1]

#: name in ``daemon/share/`` (the wheel) -> where it lives in a checkout of the repository.
#: ``pyproject.toml``'s ``[tool.hatch.build.targets.wheel.force-include]`` lists the same.
SHIPPED: dict[str, str] = {
    "config.example.toml": "config.example.toml",
    "inboxd.service": "systemd/inboxd.service",
    "inboxd.sysusers": "systemd/inboxd.sysusers",
    "README.md": "README.md",
    "LICENSE": "LICENSE",
}

#: The unit's ``Documentation=`` names this file; install-files puts the README there.
DOC_DIR = "/usr/share/doc/inboxd"
#: The ``ExecStart=`` of the shipped unit: the venv the README's install steps make.
SHIPPED_EXEC = "/opt/inboxd/bin/inboxd"


def shipped(name: str) -> Path:
    """The shipped file ``name``: from the installed package, else from the checkout."""
    for path in (_PACKAGE / "share" / name, _PACKAGE.parent / SHIPPED[name]):
        if path.is_file():
            return path
    raise NotThereError(
        f"{name} is missing from this installation of inboxd (looked in {_PACKAGE / 'share'})",
        advice="reinstall inboxd from its wheel or offline bundle",
    )


@dataclass(frozen=True)
class _File:
    """One file to install: its place on the system and how to make its bytes."""

    target: str
    content: Callable[[], bytes]
    #: an existing file there is the operator's: leave it alone
    keep_existing: bool = False


def _read(name: str) -> Callable[[], bytes]:
    return lambda: shipped(name).read_bytes()


def _unit() -> bytes:
    """The unit, with ``ExecStart=`` pointing at this installation's ``inboxd``."""
    text = shipped("inboxd.service").read_text(encoding="utf-8")
    mine = Path(sys.prefix) / "bin" / "inboxd"
    if mine.is_file() and str(mine) != SHIPPED_EXEC:
        text = text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={mine} ")
    return text.encode()


def _text(make: Callable[[], str]) -> Callable[[], bytes]:
    return lambda: (make() + "\n").encode()


def files(completion: Callable[[str], str]) -> list[_File]:
    """Everything ``install-files`` writes, in order; ``completion(shell)`` makes the
    completion script of ``inboxd completion SHELL``."""
    return [
        _File("/etc/inboxd/config.toml", _read("config.example.toml"), keep_existing=True),
        _File("/etc/systemd/system/inboxd.service", _unit),
        _File("/usr/lib/sysusers.d/inboxd.conf", _read("inboxd.sysusers")),
        _File("/usr/share/bash-completion/completions/inboxd", _text(lambda: completion("bash"))),
        _File("/usr/local/share/zsh/site-functions/_inboxd", _text(lambda: completion("zsh"))),
        _File(f"{DOC_DIR}/README.md", _read("README.md")),
        _File(f"{DOC_DIR}/config.example.toml", _read("config.example.toml")),
        _File(f"{DOC_DIR}/LICENSE", _read("LICENSE")),
    ]


def install(
    prefix: Path,
    completion: Callable[[str], str],
    *,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
) -> None:
    """Write every file under ``prefix`` (``/`` for the real system), one line per file."""
    if dry_run:
        print("dry run: nothing is written", file=out)
    for item in files(completion):
        path = prefix / item.target.lstrip("/")
        exists = path.is_file()
        if exists and item.keep_existing:
            print(
                f"kept       {path} (exists: never overwritten; compare it with "
                f"{DOC_DIR}/config.example.toml)",
                file=out,
            )
            continue
        data = item.content()
        if exists and path.read_bytes() == data:
            print(f"unchanged  {path}", file=out)
            continue
        print(f"{'replace' if exists else 'write':<10} {path}", file=out)
        if not dry_run:
            try:
                _write(path, data)
            except PermissionError:
                raise NoPermissionError(
                    f"may not write {path}", advice="run it with sudo (or give --prefix DIR)"
                ) from None
    if not dry_run and prefix == Path("/"):
        print(
            "next: `sudo systemd-sysusers && sudo systemctl daemon-reload`, then edit "
            "/etc/inboxd/config.toml (README 'Install on a logging PC')",
            file=out,
        )


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (0644) in one step: a crash leaves the old or the new."""
    _make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_dirs(folder: Path) -> None:
    # 0755 whatever the umask: the inboxd user reads /etc/inboxd, everyone the docs.
    missing: list[Path] = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir()
        made.chmod(0o755)
