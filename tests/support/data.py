"""The sandbox token, sizes, and test data: deterministic files and the reference content hash."""

from __future__ import annotations

import random
from pathlib import Path

import xxhash

KiB = 1024
MiB = 1024 * 1024
#: The bearer token every test sandbox accepts (and every log/status check looks for).
TOKEN = "test-token-s3cr3t-value"


def write_file(path: Path, size: int, seed: int = 0) -> bytes:
    """Write ``size`` deterministic pseudo-random bytes; returns them for comparison."""
    rnd = random.Random(seed)
    data = rnd.randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def content_hash_of(data: bytes, segment: int) -> str:
    """The daemon's content hash of ``data`` cut into ``segment``-byte segments, written out
    here on its own from the definition, to check the daemon's against."""
    parts = [data[i : i + segment] for i in range(0, len(data), segment)]
    joined = segment.to_bytes(8, "big") + b"".join(xxhash.xxh3_128(p).digest() for p in parts)
    return f"xxh3-128:{segment}:{xxhash.xxh3_128(joined).hexdigest()}"
