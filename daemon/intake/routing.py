"""Where a settled file goes: its dataset name, its stream and its metadata.

Pure decisions from the settings and the file's path (plus its optional sidecar
``<file>.meta.json``); no network, no database. Stream references stay as written (id or
name) here; a name is resolved to an id when the file is uploaded (see ``Service._stream_of``).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from daemon.config import RouteSettings, Settings
from daemon.intake.globs import compile_globs

SIDECAR_SUFFIX = ".meta.json"
_SIDECAR_MAX = 64 * 1024


@dataclass(frozen=True)
class Route:
    """The decision for one file."""

    stream: int | str
    dataset_name: str
    metadata: dict[str, Any]
    #: a person-readable problem with the sidecar, recorded but not fatal
    warning: str | None = None


def dataset_name_for(rel: str, template: str = "{path}") -> str:
    """The dataset name for a relative path, always valid UTF-8.

    Bytes of a file name that are not UTF-8 are written as ``%XX`` (and a literal ``%`` stays as
    it is), so the name is readable, stable and distinct from other files' names.
    """
    path = _printable(rel)
    pure = PurePosixPath(path)
    parent = str(pure.parent) if str(pure.parent) != "." else ""
    return template.format(path=path, name=pure.name, stem=pure.stem, parent=parent)


def _printable(rel: str) -> str:
    raw = os.fsencode(rel)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        out = []
        text = raw.decode("utf-8", "surrogateescape")
        for ch in text:
            code = ord(ch)
            out.append(f"%{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else ch)
        return "".join(out)


def route(rel: str, inbox: Path, settings: Settings) -> Route:
    """Decide stream, dataset name and metadata for the file at ``inbox / rel``."""
    up = settings.upload
    metadata: dict[str, Any] = dict(up.metadata)
    rule = matching_route(rel, settings)
    if rule is not None:
        metadata.update(rule.metadata)
    stream = _stream_of(rule, settings)
    parts = PurePosixPath(_printable(rel)).parts[:-1]
    for key, value in zip(up.path_metadata, parts, strict=False):
        metadata[key] = value
    warning = None
    if up.sidecar_metadata:
        extra, warning = read_sidecar(inbox / (rel + SIDECAR_SUFFIX))
        metadata.update(extra)
    return Route(stream, dataset_name_for(rel, up.dataset_name), metadata, warning)


def matching_route(rel: str, settings: Settings) -> RouteSettings | None:
    """The first ``[[routes]]`` entry whose glob matches ``rel``; None when none does."""
    return first_route(rel, settings.routes)


def first_route(rel: str, routes: Iterable[RouteSettings]) -> RouteSettings | None:
    """The first of ``routes`` whose glob matches ``rel`` (for a target given only routes)."""
    for r in routes:
        if _matches(rel, r.glob):
            return r
    return None


def stream_for(rel: str, settings: Settings) -> int | str:
    """The stream reference (id or name, as configured) for ``rel``; reads no file."""
    return _stream_of(matching_route(rel, settings), settings)


def _stream_of(rule: RouteSettings | None, settings: Settings) -> int | str:
    return rule.stream if rule is not None and rule.stream is not None else settings.upload.stream


def stream_source(rel: str, settings: Settings) -> str:
    """Where the stream of ``rel`` is configured, for a person who has to fix it."""
    rule = matching_route(rel, settings)
    if rule is not None and rule.stream is not None:
        return f"the [[routes]] entry with glob {rule.glob!r}"
    return "[upload] stream"


def _matches(rel: str, pattern: str) -> bool:
    """``pattern`` matches the relative path or the file name, in any letter case, like the
    ``[inbox]`` include/exclude globs (Windows-made loggers write ``RUN.CSV`` and ``run.csv``)."""
    regex = _route_glob(pattern)
    return regex.match(rel) is not None or regex.match(rel.rpartition("/")[2]) is not None


@functools.lru_cache(maxsize=256)
def _route_glob(pattern: str) -> re.Pattern[str]:
    regex = compile_globs([pattern])
    assert regex is not None  # one pattern in, one regex out
    return regex


def read_sidecar(path: Path) -> tuple[dict[str, Any], str | None]:
    """Metadata from a sidecar JSON file: (values, problem). A missing sidecar is no problem."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"{path.name}: cannot read the sidecar ({exc.strerror}); metadata ignored"
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(_SIDECAR_MAX + 1)
    if len(data) > _SIDECAR_MAX:
        return {}, f"{path.name}: sidecar larger than {_SIDECAR_MAX} bytes; metadata ignored"
    try:
        obj = json.loads(data)
    except ValueError as exc:
        return {}, f"{path.name}: not valid JSON ({exc}); metadata ignored"
    if not isinstance(obj, dict):
        return {}, f"{path.name}: must hold a JSON object; metadata ignored"
    clean = {
        str(k): v for k, v in obj.items() if isinstance(v, str | int | float | bool) or v is None
    }
    dropped = sorted(set(map(str, obj)) - set(clean))
    problem = (
        f"{path.name}: values of {', '.join(dropped)} are not plain strings/numbers; ignored"
        if dropped
        else None
    )
    return clean, problem
