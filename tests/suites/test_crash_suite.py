"""Crash suite: SIGKILL the daemon at random moments while it uploads, restart it, repeat.

A real ``inboxd run`` process uploads a mix of ``server``, ``single`` and ``multipart`` files
(the ``sandbox_config`` thresholds) to a sandbox whose storage is slowed so that kills land
mid-upload; files keep arriving between kills. At the end a last run finishes everything and
the sandbox must hold every file exactly once, byte for byte, with no ingestion left
``UPLOADING`` (aborted or superseded ones are fine: they were given up on properly).

Resume efficiency: the sandbox counts the body bytes it really read on upload requests;
``bytes_resent`` = that minus the total file bytes is what the crashes cost.

CI: ``.venv/bin/python -m pytest tests/suites/test_crash_suite.py -s`` (≥ 10 kills).
By hand (≥ 200 kills):
``INBOXD_SUITE=long .venv/bin/python -m pytest tests/suites/test_crash_suite.py -s``.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

from daemon.sandbox import Sandbox
from tests.support.rig import (
    SEED,
    Expected,
    UploadBytes,
    check_delivery,
    describe_unfinished,
    drop,
    job_states,
    scale,
    summary,
    wait_all_done,
)
from tests.support.runner import kill_daemon, start_daemon, stop_daemon, write_config
from tests.support.waits import wait_for

KILLS = scale(12, 200)
INITIAL_FILES = scale(10, 30)
#: top the inbox up to this many unfinished files before each run, so there is work to kill
BACKLOG = scale(6, 10)
#: a share of kills land during start-up and recovery (seconds after the spawn) ...
EARLY_KILLS, EARLY_KILL_AFTER = 0.15, (0.05, 0.8)
#: ... the rest this long after the daemon said it is ready (uploads running)
KILL_AFTER_READY = (0.05, 2.0)
#: slows each 256 KiB part to ~0.4 s so that most kills find parts in flight
STORAGE_DELAY_PER_MIB = 1.5

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scale(170, 2400))]


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, offset: int) -> None:
    """Until this run of the daemon logged ``daemon.ready`` (its recovery and scan are done)."""

    def ready() -> bool:
        assert proc.poll() is None, f"the daemon exited with {proc.returncode}"
        with log.open("rb") as fh:
            fh.seek(offset)
            return b'"daemon.ready"' in fh.read()

    wait_for(ready, 20, "daemon.ready", step=0.02)


def test_random_sigkills_every_file_exactly_once(sandbox: Sandbox, tmp_path: Path) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    counter = UploadBytes.install(sandbox)
    sandbox.faults.storage_delay_per_mib = STORAGE_DELAY_PER_MIB
    config = write_config(
        tmp_path,
        sandbox,
        upload={"workers": 2, "part_concurrency": 2},
        log={"level": "info"},
    )
    inbox = tmp_path / "inbox"
    log = tmp_path / "daemon.log"
    expected = Expected()
    drop(inbox, expected, rng, INITIAL_FILES, "initial")

    kills = mid_upload = 0
    for run in range(KILLS):
        unfinished = len(expected) - job_states(config).get("done", 0)
        if unfinished < BACKLOG:  # files keep arriving between kills
            drop(inbox, expected, rng, rng.randint(1, BACKLOG - unfinished), f"between/{run}")
        offset = log.stat().st_size if log.exists() else 0
        proc = start_daemon(config, log)
        if rng.random() < EARLY_KILLS:
            kill_at = time.monotonic() + rng.uniform(*EARLY_KILL_AFTER)
        else:
            _wait_ready(proc, log, offset)
            kill_at = time.monotonic() + rng.uniform(*KILL_AFTER_READY)
        if rng.random() < 0.3:  # and while the daemon runs
            time.sleep(rng.uniform(0.0, max(0.0, kill_at - time.monotonic())))
            drop(inbox, expected, rng, 1, f"during/{run}")
        time.sleep(max(0.0, kill_at - time.monotonic()))
        mid_upload += counter.in_flight > 0
        kill_daemon(proc)
        kills += 1

    sandbox.faults.storage_delay_per_mib = 0.0
    proc = start_daemon(config, log)
    try:
        wait_all_done(config, len(expected), scale(90, 600))
    finally:
        assert stop_daemon(proc) == 0

    states = job_states(config)
    delivery = check_delivery(sandbox, expected)
    resent = counter.payload - expected.bytes
    summary(
        "crash",
        runs=kills + 1,
        kills=kills,
        kills_mid_upload=mid_upload,
        files=len(expected),
        bytes=expected.bytes,
        lost=len(delivery.lost),
        duplicates=len(delivery.duplicates),
        corrupt=len(delivery.corrupt),
        open_ingestions=len(delivery.open_ingestions),
        jobs=dict(states),
        ingestions=delivery.ingestion_states,
        upload_requests=counter.requests,
        bytes_received=counter.payload,
        bytes_committed=counter.committed,
        bytes_resent=resent,
        resend_ratio=round(resent / expected.bytes, 4),
        resent_per_kill=round(resent / max(kills, 1)),
        # re-sent although the server had stored it: a request the kill interrupted on our
        # side but whose body was already in the socket buffers, so the server finished it
        bytes_stored_twice=counter.committed - expected.bytes,
        seconds=round(time.monotonic() - started, 1),
    )
    assert kills >= scale(10, 200)
    assert delivery.ok, delivery.describe()
    assert states.get("failed", 0) == 0, describe_unfinished(config)
    # Most kills must really interrupt uploads, or this suite tests start-up only.
    assert mid_upload >= kills // 2, (mid_upload, kills)
    # Resume, not restart: a kill costs at most what was in flight (≤ workers x
    # part_concurrency requests of ≤ one part or one single object each), never whole files.
    in_flight_max = 2 * 2 * 512 * 1024
    assert 0 <= resent <= kills * in_flight_max, resent
