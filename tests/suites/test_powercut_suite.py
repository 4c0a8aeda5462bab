"""Power-cut suite: the state database loses its last commits, the server keeps what it got.

With ``synchronous=NORMAL`` a power cut may lose the WAL's last commits (never corrupt them),
so after a restart the state can be *older* than the server. Each round here: files arrive, a
real ``inboxd run`` uploads them, is killed with SIGKILL at a random moment, and then the WAL is
cut back to an earlier commit (a frame boundary after a commit frame, never below what was
already checkpointed into the database file) or lost entirely (the database file alone, as of
its last checkpoint). The ``-shm`` index goes too, as after a reboot. At the end every file must
be on the server exactly once, byte for byte, with no ingestion left open.

(Issue 10, point 9: resumed at "uploading 14/16 parts" the daemon asked for part URLs of an
ingestion the server had completed, got 400, aborted it and failed the job; with the WAL lost,
files were uploaded twice as ``run (2).mf4`` and two ingestions stayed UPLOADING forever.)

CI: ``.venv/bin/python -m pytest tests/suites/test_powercut_suite.py -s``.
By hand: ``INBOXD_SUITE=long .venv/bin/python -m pytest tests/suites/test_powercut_suite.py -s``.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time
from collections import Counter
from pathlib import Path

import pytest

from daemon.sandbox import Sandbox
from tests.support.rig import (
    SEED,
    Expected,
    check_delivery,
    drop,
    job_states,
    scale,
    summary,
    wait_all_done,
)
from tests.support.runner import start_daemon, stop_daemon, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scale(240, 3600))]

ROUNDS = scale(10, 80)
FILES_PER_ROUND = 3
_WAL_HEADER = 32
_FRAME_HEADER = 24


def _commit_frames(wal: bytes) -> tuple[int, list[int]]:
    """The WAL's page size and, for each valid commit frame, the frame count up to it."""
    if len(wal) < _WAL_HEADER:
        return 0, []
    page_size = struct.unpack(">I", wal[8:12])[0]
    salts = wal[16:24]
    frame = _FRAME_HEADER + page_size
    commits = []
    n = 0
    while _WAL_HEADER + (n + 1) * frame <= len(wal):
        head = wal[_WAL_HEADER + n * frame : _WAL_HEADER + n * frame + _FRAME_HEADER]
        if head[8:16] != salts:
            break  # a frame of an earlier generation of the WAL: the log ends here
        n += 1
        if struct.unpack(">I", head[4:8])[0]:
            commits.append(n)
    return page_size, commits


def _backfilled(shm: Path) -> int:
    """Frames already copied into the database file (WalCkptInfo.nBackfill in ``-shm``)."""
    try:
        data = shm.read_bytes()
    except FileNotFoundError:
        return 0
    return struct.unpack("<I", data[96:100])[0] if len(data) >= 100 else 0


def power_cut(db: Path, rng: random.Random) -> str:
    """Lose the WAL's tail (or all of it) as a power cut may; returns what was done."""
    wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
    if not wal.exists():
        return "no_wal"
    data = wal.read_bytes()
    page_size, commits = _commit_frames(data)
    done = _backfilled(shm)
    if rng.random() < 0.3 or not commits:
        wal.unlink()
        how = "wal_lost"
    else:
        # Keep at least what the database file already holds; drop one commit or more.
        choices = [c for c in commits[:-1] if c >= done]
        if not choices:
            how = "nothing_to_cut"
        else:
            keep = rng.choice(choices)
            with wal.open("r+b") as fh:
                fh.truncate(_WAL_HEADER + keep * (_FRAME_HEADER + page_size))
            how = f"cut_{len(commits) - commits.index(keep) - 1}_commits"
    shm.unlink(missing_ok=True)
    return how


def test_power_cuts_lose_nothing_and_duplicate_nothing(sandbox: Sandbox, tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    config = write_config(
        tmp_path,
        sandbox,
        upload={"workers": 2, "part_concurrency": 2},
        log={"level": "info"},
    )
    db = tmp_path / "state" / "state.db"
    inbox = tmp_path / "inbox"
    expected = Expected()
    cuts: Counter[str] = Counter()
    for round_ in range(ROUNDS):
        drop(inbox, expected, rng, FILES_PER_ROUND, f"r{round_:03d}")
        proc = start_daemon(config, tmp_path / "daemon.log")
        time.sleep(rng.uniform(0.8, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        cuts[power_cut(db, rng)] += 1
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_all_done(config, len(expected), scale(120, 900), when=" after the power cuts")
    finally:
        assert stop_daemon(proc) == 0
    delivered = check_delivery(sandbox, expected)
    states = job_states(config)
    summary(
        "powercut",
        rounds=ROUNDS,
        files=len(expected),
        bytes=expected.bytes,
        cuts=dict(cuts),
        lost=len(delivered.lost),
        duplicates=len(delivered.duplicates),
        corrupt=len(delivered.corrupt),
        open_ingestions=len(delivered.open_ingestions),
        ingestions=delivered.ingestion_states,
        jobs=dict(states),
        seconds=round(time.monotonic() - started, 1),
    )
    assert delivered.ok, delivered.describe()
    assert set(states) == {"done"}, states
    assert os.path.getsize(db) > 0
