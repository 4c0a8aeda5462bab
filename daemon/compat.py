"""What inboxd uses from Python 3.11, for Python 3.10 (Ubuntu 22.04's system Python).

inboxd runs on the system Python of current LTS distributions, 3.10 to 3.13 (README
"Supported Pythons"). Everything that differs between them is here, so the rest of the code
is written once and this module shrinks as old versions are dropped: delete a piece once the
oldest supported Python has it. On 3.10 the backports come from the marker dependencies in
``pyproject.toml`` (``tomli``, ``exceptiongroup``), under the standard library's API.
"""

from __future__ import annotations

import re
import sqlite3
import sys
from datetime import datetime, timezone
from enum import Enum

#: ``datetime.UTC`` (3.11) is this same object.
UTC = timezone.utc

if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup, ExceptionGroup
    from enum import StrEnum

    import tomllib
else:
    import tomli as tomllib
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

    class StrEnum(str, Enum):
        """``enum.StrEnum`` (3.11): members are strings, and ``str()`` gives the value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str.__format__(str(self.value), spec)


# ISO 8601 as 3.11 reads it, in the parts 3.10 refuses: a "Z" offset, a fraction of other
# than 3 or 6 digits, an offset without its colon ("+0200") or minutes ("+02").
_ISO_310 = re.compile(
    r"(?P<head>.*?T?\d\d:\d\d(?::\d\d)?)(?:\.(?P<fraction>\d+))?"
    r"(?:(?P<z>[Zz])|(?P<sign>[+-])(?P<hh>\d\d):?(?P<mm>\d\d)?)?$"
)


def fromisoformat(text: str) -> datetime:
    """``datetime.fromisoformat`` as 3.11 reads the forms services send: on 3.10 a ``Z``
    offset (``2026-11-20T14:30:00Z``), a fraction such as ``.5``, or ``+0200`` are refused,
    so they are written in the form 3.10 reads first. ValueError for anything else."""
    if sys.version_info >= (3, 11):
        return datetime.fromisoformat(text)
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        match = _ISO_310.fullmatch(text.strip())
        if match is None:
            raise
    fraction = f".{(match['fraction'] + '000000')[:6]}" if match["fraction"] else ""
    if match["z"]:
        offset = "+00:00"
    elif match["sign"]:
        offset = f"{match['sign']}{match['hh']}:{match['mm'] or '00'}"
    else:
        offset = ""
    return datetime.fromisoformat(f"{match['head']}{fraction}{offset}")


#: sqlite3_errstr() of the result codes inboxd tells apart; 3.10 gives only this text.
_SQLITE_TEXTS = {
    "file is not a database": "SQLITE_NOTADB",
    "database disk image is malformed": "SQLITE_CORRUPT",
    "database or disk is full": "SQLITE_FULL",
    "disk I/O error": "SQLITE_IOERR",
    "unable to open database file": "SQLITE_CANTOPEN",
}


def sqlite_errorname(exc: sqlite3.Error) -> str:
    """``sqlite3.Error.sqlite_errorname`` (3.11), e.g. ``"SQLITE_FULL"``, or ``""``. On 3.10,
    the primary code read from SQLite's own message, for the codes in ``_SQLITE_TEXTS``."""
    if sys.version_info >= (3, 11):
        return getattr(exc, "sqlite_errorname", None) or ""
    said = str(exc)
    return next((name for text, name in _SQLITE_TEXTS.items() if text in said), "")


__all__ = [
    "UTC",
    "BaseExceptionGroup",
    "ExceptionGroup",
    "StrEnum",
    "fromisoformat",
    "sqlite_errorname",
    "tomllib",
]
