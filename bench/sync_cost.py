"""What ``synchronous=FULL`` would cost the state database, per journal write and per file.

The alternative to deriving upload keys from the file identity (what inboxd does) is to make
the commits that precede a side effect durable: ``PRAGMA synchronous = FULL`` for them, one
fsync of the WAL each. This times the queue's own journal write (``save_progress``) with
NORMAL and with FULL on the filesystem of ``--dir``, the way the upload of one small file
writes it (create → uploading → completing, then mark_uploaded: 4 commits).

    .venv/bin/python bench/sync_cost.py --dir /var/lib/inboxd-bench --writes 400
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path


def _per_write(directory: Path, mode: str, writes: int) -> float:
    path = directory / f"sync-{mode.lower()}.db"
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {mode}")
    db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, stage TEXT, updated_at REAL)")
    db.executemany("INSERT INTO jobs VALUES (?, 'new', 0)", [(i,) for i in range(writes)])
    started = time.perf_counter()
    for i in range(writes):
        db.execute("UPDATE jobs SET stage = 'uploading', updated_at = ? WHERE id = ?", (i, i))
    seconds = time.perf_counter() - started
    db.close()
    return seconds / writes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mode in ("NORMAL", "FULL"):
            runs = [_per_write(Path(tmp), mode, args.writes) for _ in range(args.runs)]
            per = statistics.median(runs)
            print(
                f"synchronous={mode}: {per * 1e6:8.1f} us per commit, "
                f"{4 * per * 1e3:6.2f} ms per small file (4 commits)"
            )


if __name__ == "__main__":
    main()
