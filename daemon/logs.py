"""structlog set-up, done once by the CLI.

Where the lines go decides their form (``[log] format = "auto"``):

* a terminal: readable lines — ``09:31:02 WARNING job 12 failed  path=a/empty.csv …`` —
  with plain values (no Python reprs) and events worded for people;
* the systemd journal (stderr is the stream named by ``$JOURNAL_STREAM``): JSON lines, each
  prefixed with its syslog priority (``<4>{…}``). journald strips the prefix and files the
  line under that priority (``SyslogLevelPrefix=`` is on by default), so
  ``journalctl -u inboxd -p warning`` lists exactly the lines that need a person;
* anything else (a pipe, a file): JSON lines, one per event.

``format = "json"`` or ``"console"`` forces the form; the priority prefix is added under the
journal whatever the form, since it is what makes ``-p warning`` work.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: syslog priorities (sd-daemon(3): SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7)
_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}

#: The events a person reads most, worded for them; others are shown as "upload done" etc.
_WORDS = {
    "job.failed": "job failed",
    "job.backoff": "will retry",
    "job.recovered": "resuming an interrupted upload",
    "upload.start": "upload started",
    "upload.done": "uploaded",
    "upload.failed": "upload given up",
    "upload.paused": "uploads PAUSED",
    "import.done": "imported",
    "import.failed": "import failed",
    "service.unreachable": "service unreachable, holding uploads",
    "daemon.ready": "inboxd ready",
    "daemon.stopping": "stopping",
    "daemon.stopped": "stopped",
    "daemon.resumed": "uploads resumed",
    "daemon.still_paused": "uploads still paused",
    "disk.low": "DISK LOW",
    "disk.ok": "disk space ok again",
    "watcher.enqueued": "files queued",
    "watcher.skip": "file skipped",
    "config.problem": "configuration problem",
}

#: Keys shown first, in this order; ``reason`` and ``action`` close the line.
_FIRST = ("job_id", "path")
_LAST = ("reason", "error", "action")


def journal_stream(out: TextIO) -> bool:
    """Whether ``out`` is connected to the systemd journal (systemd.exec(5), $JOURNAL_STREAM).

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` of the stream it connected to stdout
    and stderr; a process whose stderr was redirected elsewhere since must not assume it.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(out.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for the process. Per-job context is bound with contextvars."""
    out = stream if stream is not None else sys.stderr
    journal = journal_stream(out)
    tty = _isatty(out)
    use_json = fmt == "json" or (fmt == "auto" and not tty)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if use_json:
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False, default=str)
    else:
        renderer = ConsoleLines(colors=tty and not journal)
    processors.append(_with_priority(renderer) if journal else renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (ValueError, AttributeError):
        return False


def _with_priority(renderer: Any) -> Any:
    """Wrap ``renderer`` so each line starts with its ``<N>`` syslog priority."""

    def render(logger: Any, name: str, event_dict: dict[str, Any]) -> str:
        prio = _PRIORITY.get(str(event_dict.get("level", "info")), 6)
        return f"<{prio}>{renderer(logger, name, event_dict)}"

    return render


class ConsoleLines:
    """A readable line per event: time, level, the event in words, then ``key=value``.

    Values are printed as a person writes them: text as it is, a mapping as
    ``key=value, …``, a list as ``a, b``; never a Python repr. A traceback (a bug) follows
    the line.
    """

    _COLORS = {"error": "\x1b[31;1m", "warning": "\x1b[33;1m", "debug": "\x1b[2m"}

    def __init__(self, *, colors: bool = False) -> None:
        self.colors = colors

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> str:
        ed = dict(event_dict)
        when = str(ed.pop("timestamp", ""))[11:19]  # HH:MM:SS of the ISO time
        level = str(ed.pop("level", "info"))
        event = str(ed.pop("event", ""))
        exc_info = ed.pop("exc_info", None)
        exception = ed.pop("exception", None)
        text = _WORDS.get(event) or event.replace("_", " ").replace(".", " ")
        keys = [k for k in _FIRST if k in ed]
        keys += sorted(k for k in ed if k not in _FIRST and k not in _LAST)
        keys += [k for k in _LAST if k in ed]
        fields = []
        for key in keys:
            value = _plain(ed[key])
            if key == "job_id":
                fields.append(f"job {value}")
            elif key in _LAST:
                fields.append(f"— {'do' if key == 'action' else key}: {value}")
            else:
                fields.append(f"{key}={value}")
        tag = level.upper()
        if self.colors and level in self._COLORS:
            tag = f"{self._COLORS[level]}{tag}\x1b[0m"
        line = f"{when} {tag:<7} {text}"
        if fields:
            line += "  " + " ".join(fields)
        if exception:
            line += "\n" + str(exception)
        elif exc_info:
            import traceback

            info = exc_info if isinstance(exc_info, tuple) else sys.exc_info()
            if info[0] is not None:
                line += "\n" + "".join(traceback.format_exception(*info)).rstrip()
        return line


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(_plain(v) for v in value) or "-"
    return str(value)
