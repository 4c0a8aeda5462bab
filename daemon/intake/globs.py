"""The config's one glob dialect (include, exclude, [[routes]]), compiled to one regex: ``*``
also matches ``/``, ``**/`` may stand for no folder, letters match in either case."""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Iterable


def compile_globs(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex for a list of fnmatch globs (``None`` if there are none).

    The one glob dialect of the config (include, exclude, ``[[routes]]``): ``*`` also matches
    ``/``, ``**/`` may stand for no folder, letters match in either case.
    """
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
