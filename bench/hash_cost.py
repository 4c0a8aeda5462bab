"""What hashing the uploaded bytes costs: ``FileSlice.chunks`` with and without ``on_digest``.

Reads one file (page-cached after a first read) through the upload path's reader, as the
upload of a part or of a whole file does, and reports the process CPU seconds per GiB with
and without the xxh3_128 digest (``daemon/delivery/content.py``), runs interleaved, medians.

    .venv/bin/python bench/hash_cost.py                  # 1 GiB file, 7 rounds
    .venv/bin/python bench/hash_cost.py --size 256M --rounds 5

No network: the send itself is the same either way and costs the same with both (see
docs/benchmarks.md, "Push throughput").
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from daemon.delivery.files import CHUNK_SIZE, FileSlice

GiB = 1 << 30


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


async def _read(path: Path, size: int, hashed: bool) -> float:
    """CPU seconds to read ``path`` through FileSlice once (with or without the digest)."""
    got: list[bytes] = []
    part = FileSlice(path, 0, size, chunk_size=CHUNK_SIZE, on_digest=got.append if hashed else None)
    started = time.process_time()
    async for _ in part.chunks():
        pass
    spent = time.process_time() - started
    assert (len(got) == 1) == hashed
    return spent


async def _main(size: int, rounds: int, directory: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".bin") as fh:
        block = os.urandom(CHUNK_SIZE)
        for _ in range(size // CHUNK_SIZE):
            fh.write(block)
        fh.flush()
        path = Path(fh.name)
        await _read(path, size, False)  # into the page cache
        plain: list[float] = []
        hashed: list[float] = []
        for _ in range(rounds):
            plain.append(await _read(path, size, False) * GiB / size)
            hashed.append(await _read(path, size, True) * GiB / size)
    p, h = statistics.median(plain), statistics.median(hashed)
    print(
        f"file {size / GiB:.2f} GiB in {directory}, chunk {CHUNK_SIZE >> 20} MiB, {rounds} rounds"
    )
    print(f"read only:          {p:.3f} CPU s/GiB (min {min(plain):.3f}, max {max(plain):.3f})")
    print(f"read + xxh3_128:    {h:.3f} CPU s/GiB (min {min(hashed):.3f}, max {max(hashed):.3f})")
    print(f"hashing adds:       {h - p:.3f} CPU s/GiB ({(h - p) / p * 100:+.0f}% of the read)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=_size, default=GiB, help="file size, e.g. 256M, 1G")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = p.parse_args()
    anyio.run(_main, args.size, args.rounds, args.dir)


if __name__ == "__main__":
    main()
