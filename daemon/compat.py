"""What inboxd uses from Python 3.11, for Python 3.10 (Ubuntu 22.04's system Python).

inboxd runs on the system Python of current LTS distributions, 3.10 to 3.13 (README
"Supported Pythons"). Everything that differs between them is here, so the rest of the code
is written once and this module shrinks as old versions are dropped: delete a piece once the
oldest supported Python has it. On 3.10 the backports come from the marker dependencies in
``pyproject.toml`` (``tomli``, ``exceptiongroup``), under the standard library's API.
"""

from __future__ import annotations

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


def fromisoformat(text: str) -> datetime:
    """``datetime.fromisoformat`` as 3.11 reads the common forms: 3.10 refuses a ``Z`` offset
    (``2026-11-20T14:30:00Z``), which ISO 8601 and every API inboxd talks to use."""
    if sys.version_info < (3, 11) and text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


__all__ = [
    "UTC",
    "BaseExceptionGroup",
    "ExceptionGroup",
    "StrEnum",
    "fromisoformat",
    "tomllib",
]
