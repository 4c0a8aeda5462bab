"""What a delivered file held, as one hash, and what a later version of it is to that.

**The content hash** (``Job.content_hash``, kept in the ledger) of a delivered file is, by
definition::

    S    = the segment size of the upload: the multipart part size, the Azure block size,
           or the file size (one segment: ``server``/``single`` mode, an Azure Put Blob,
           the fallback to ``upload/server``)
    seg_i = bytes [(i-1)·S, min(i·S, size)) of the file, i = 1 … ceil(size / S)
    d_i  = xxh3_128(seg_i)                                  (16 bytes, canonical big-endian)
    hash = xxh3_128(S as 8 bytes big-endian ‖ d_1 ‖ d_2 ‖ … ‖ d_n)
    text = "xxh3-128:<S>:<hash as 32 hex digits>"

The ``d_i`` are computed while each segment is streamed to the service (no extra read of the
file) and journalled with the part (``parts.digest``), so a resumed upload only hashes what it
sends; the job's hash is combined from them when the upload is marked uploaded. S is in the
text so the same segmentation can be recomputed over another file: over the first ``size``
bytes of a longer one (was it appended to?) or over the whole of one of the same size (did a
``chmod`` change only its metadata?). xxh3 is not a cryptographic hash: it tells versions of a
file apart, which nobody is trying to forge; 128 bits make an accidental collision negligible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

import anyio.lowlevel
import xxhash

from daemon.delivery.files import FileSlice
from daemon.state import PriorDelivery

__all__ = [
    "PREFIX",
    "Change",
    "combine",
    "compare",
    "hash_file",
    "same_mtime",
    "segment_size",
    "segments",
]

#: The algorithm tag of the content hash text; another tag is not compared (treated as unknown).
PREFIX: Final = "xxh3-128"

#: What a new version of a delivered path is to its last delivery: ``appended`` (its first
#: bytes are the delivered ones), ``unchanged`` (same bytes, only its metadata moved) or
#: ``new`` (other content: a new version). ``on_server`` is found by the upload flow instead:
#: a dataset of the name already holds this file (a restore over a fresh state database).
Change = Literal["appended", "unchanged", "on_server", "new"]


def combine(segment: int, digests: list[bytes]) -> str:
    """The content hash text of a file cut into ``segment``-byte segments with these
    ordered segment digests (see the module docstring)."""
    h = xxhash.xxh3_128(segment.to_bytes(8, "big"))
    for d in digests:
        h.update(d)
    return f"{PREFIX}:{segment}:{h.hexdigest()}"


def segment_size(content_hash: str | None) -> int | None:
    """The segment size a content hash was made with; None when it is not one of ours."""
    if not content_hash:
        return None
    tag, _, rest = content_hash.partition(":")
    size, _, hexdigest = rest.partition(":")
    if tag != PREFIX or not size.isdigit() or int(size) <= 0 or len(hexdigest) != 32:
        return None
    return int(size)


def segments(size: int, segment: int) -> list[tuple[int, int]]:
    """(offset, length) of each segment of a ``size``-byte file."""
    count = math.ceil(size / segment)
    return [(i * segment, min(segment, size - i * segment)) for i in range(count)]


async def hash_file(
    path: Path,
    size: int,
    segment: int,
    *,
    inode: int | None = None,
    pinned: tuple[int, int] | None = None,
    known: Mapping[int, bytes] | None = None,
) -> str:
    """The content hash of the first ``size`` bytes of ``path`` cut into ``segment``-byte
    segments: one streaming read of them, one chunk in memory at a time.

    ``known`` maps 1-based segment numbers to digests already computed (parts hashed while
    they were uploaded): those segments are not read. ``inode``/``pinned`` as for
    :class:`~daemon.delivery.files.FileSlice`: reading another file, a shorter one, or
    one written to during the read raises ``FileChangedError``.
    """
    out: list[bytes] = []
    for n, (offset, length) in enumerate(segments(size, segment), start=1):
        have = (known or {}).get(n)
        if have is not None:
            out.append(have)
            continue
        got: list[bytes] = []
        part = FileSlice(
            path, offset, length, inode=inode, min_size=size, pinned=pinned, on_digest=got.append
        )
        async for _ in part.chunks():
            # Reads of a cached file stay in the event loop (FileSlice): let others run
            # between chunks of what may be gigabytes.
            await anyio.lowlevel.checkpoint()
        out.append(got[-1])
    return combine(segment, out)


#: an mtime that a copy kept only to this many nanoseconds: whole seconds, then microseconds
_MTIME_PRECISIONS: Final = (1_000_000_000, 1_000)


def same_mtime(recorded: int, found: int) -> bool:
    """Whether ``found`` is the ``recorded`` mtime, allowing for a copy (a backup tool, an
    older ``tar`` format) that kept it only to the second or microsecond: then ``found`` has
    no finer digits and equals ``recorded`` cut to that precision."""
    if recorded == found:
        return True
    return any(found % p == 0 and recorded // p * p == found for p in _MTIME_PRECISIONS)


async def compare(
    path: Path,
    *,
    size: int,
    mtime_ns: int,
    inode: int,
    ctime_ns: int,
    prior: PriorDelivery,
    appends: bool = True,
) -> Change:
    """What the file at ``path`` (pinned to this size, mtime, inode and ctime) is to the
    ``prior`` delivery of its path. At most one read of the prior's length.

    * larger, and (``appends``) its first ``prior.size`` bytes hash to the prior's content
      hash → ``appended``;
    * the same size and mtime (only the ctime or inode moved: ``chmod``, ``chown``,
      ``touch`` with the same time, a hard link, a copy that kept the times), and the same
      hash → ``unchanged``;
    * anything else, or no usable prior hash → ``new``.
    """
    segment = segment_size(prior.content_hash)
    if segment is None:
        return "new"
    if size > prior.size and appends:
        expected: Change = "appended"
        length = prior.size
    elif size == prior.size and mtime_ns == prior.mtime_ns:
        expected = "unchanged"
        length = size
    else:
        return "new"
    found = await hash_file(path, length, segment, inode=inode, pinned=(mtime_ns, ctime_ns))
    return expected if found == prior.content_hash else "new"
