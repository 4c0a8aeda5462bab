"""A small incremental multipart/form-data parser.

Starlette's `request.form()` needs python-multipart (not a dependency of inboxd), so the
sandbox parses `/upload/server` bodies itself. The parser is push-based and synchronous: feed
it chunks as they arrive and it returns events; file data is handed out as soon as it cannot be
the start of a boundary, so memory stays at about one chunk plus one boundary length however
big the file is.
"""

from __future__ import annotations

import email.message
import email.utils
from dataclasses import dataclass

#: Largest header block of one part; anything bigger is not a browser or an SDK.
MAX_HEADER_BYTES = 16 * 1024


class FormDataError(ValueError):
    """The body is not well-formed multipart/form-data."""


@dataclass
class PartStart:
    """A new part begins."""

    name: str | None
    filename: str | None
    content_type: str | None


@dataclass
class PartData:
    """Bytes of the current part's body."""

    data: bytes


@dataclass
class PartEnd:
    """The current part is complete."""


Event = PartStart | PartData | PartEnd


def _header_param(header_name: str, value: str, param: str) -> str | None:
    # email.message does RFC 2045/2231 parameter parsing (quotes, escapes) for us.
    msg = email.message.Message()
    msg[header_name] = value
    got = msg.get_param(param, header=header_name)
    if got is None:
        return None
    if isinstance(got, tuple):
        return email.utils.collapse_rfc2231_value(got)
    return str(got)


def boundary_from_content_type(content_type: str | None) -> bytes:
    """Return the boundary of a multipart/form-data Content-Type, or raise FormDataError."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        raise FormDataError("Content-Type must be multipart/form-data")
    boundary = _header_param("content-type", content_type, "boundary")
    if not boundary or len(boundary) > 200:
        raise FormDataError("multipart/form-data without a valid boundary")
    return boundary.encode("latin-1")


class FormDataParser:
    """Turns a multipart/form-data byte stream into PartStart/PartData/PartEnd events."""

    def __init__(self, boundary: bytes) -> None:
        # Every delimiter is CRLF "--" boundary; the first one may come without the CRLF, so
        # the parser pretends the body starts with one.
        self._delim = b"\r\n--" + boundary
        self._buf = bytearray(b"\r\n")
        self._state = "preamble"
        self.finished = False

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume `chunk`; return the events it completes."""
        if self.finished:
            return []  # the epilogue after the last boundary is ignored
        self._buf += chunk
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def close(self) -> None:
        """Signal the end of the body; raise FormDataError if it ended early."""
        if not self.finished:
            raise FormDataError("multipart body ended before the closing boundary")

    def _step(self, events: list[Event]) -> bool:
        """Advance the state machine once; False when more input is needed."""
        buf, delim = self._buf, self._delim
        if self._state == "preamble":
            idx = buf.find(delim)
            if idx < 0:
                del buf[: max(0, len(buf) - len(delim) + 1)]
                return False
            del buf[: idx + len(delim)]
            self._state = "after_delim"
            return True
        if self._state == "after_delim":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self.finished = True
                buf.clear()
                return False
            # Transport padding (spaces/tabs) may sit between the boundary and its CRLF.
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 256:
                    raise FormDataError("malformed boundary line")
                return False
            if buf[:end].strip(b" \t"):
                raise FormDataError("malformed boundary line")
            del buf[: end + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            if buf.startswith(b"\r\n"):
                header_block = b""
                del buf[:2]
            else:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise FormDataError("part headers too large")
                    return False
                header_block = bytes(buf[:end])
                del buf[: end + 4]
            events.append(self._part_start(header_block))
            self._state = "body"
            return True
        # state "body"
        idx = buf.find(delim)
        if idx < 0:
            # Keep what could be the beginning of a delimiter; hand out the rest.
            safe = len(buf) - len(delim) + 1
            if safe > 0:
                events.append(PartData(bytes(buf[:safe])))
                del buf[:safe]
            return False
        if idx:
            events.append(PartData(bytes(buf[:idx])))
        events.append(PartEnd())
        del buf[: idx + len(delim)]
        self._state = "after_delim"
        return True

    @staticmethod
    def _part_start(block: bytes) -> PartStart:
        headers: dict[str, str] = {}
        for line in block.decode("utf-8", "replace").split("\r\n"):
            key, sep, value = line.partition(":")
            if not sep:
                raise FormDataError("malformed part header")
            headers[key.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise FormDataError("part without Content-Disposition")
        return PartStart(
            name=_header_param("content-disposition", disposition, "name"),
            filename=_header_param("content-disposition", disposition, "filename"),
            content_type=headers.get("content-type"),
        )
