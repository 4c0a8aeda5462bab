"""Server answers suite: what a real ``inboxd run`` does when the server says odd things.

* A ``complete`` refused with a 4xx the contract does not explain: the daemon reads the
  dataset's status, aborts the ingestion with the reason, and fails the job with it; no
  ingestion is left UPLOADING (issue 10, point 6).
* Protocol nonsense — a create answer without ``dataset_id``, an unknown upload mode, a part
  size that makes an impossible part list: a few attempts, then ``failed`` with the reason,
  every ingestion it created aborted, and no more creates afterwards (issue 10, point 8).

CI: ``.venv/bin/python -m pytest tests/suites/test_server_answers_suite.py -s``.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from daemon.sandbox import Sandbox
from tests.support.data import write_file
from tests.support.rig import job_states, jobs, summary
from tests.support.runner import start_daemon, stop_daemon, write_config
from tests.support.waits import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ATTEMPTS = 4  # tests.support.runner.write_config's [retry] attempts


def _requests(sb: Sandbox, route: str) -> list[Any]:
    return [r for r in list(sb.requests) if r.route == route]


@pytest.mark.parametrize("status", [400, 422])
def test_refused_complete_is_checked_and_aborted(
    sandbox: Sandbox, tmp_path: Path, status: int
) -> None:
    config = write_config(tmp_path, sandbox)
    sandbox.faults.fail_next["POST /ingestion/{id}/upload/complete"] = [status]
    write_file(tmp_path / "inbox" / "run.csv", 5000)
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(lambda: job_states(config).get("failed"), 30, "the job to fail")
        time.sleep(0.5)  # anything still to come (a second complete, another create)
    finally:
        assert stop_daemon(proc) == 0
    [job] = jobs(config)
    states = Counter(i.state for i in sandbox.ingestions.values())
    aborts = _requests(sandbox, "POST /ingestion/{id}/abort")
    status_reads = [r for r in list(sandbox.requests) if r.path.endswith("/datasets/status")]
    summary(
        "server_answers",
        test="refused_complete",
        status=status,
        error=job.last_error,
        kind=job.error_kind,
        ingestions=dict(states),
    )
    assert job.error_kind == "complete_refused", job
    assert f"HTTP {status}" in (job.last_error or "") and "aborted" in (job.last_error or "")
    assert "refused to complete" in (job.last_error or "")
    assert dict(states) == {"ABORTED": 1}, states  # none left UPLOADING
    assert len(aborts) == 1 and status_reads, (aborts, status_reads)
    assert status_reads[0].time < aborts[0].time  # looked before it aborted
    [ingestion] = sandbox.ingestions.values()
    assert "refused to complete" in (ingestion.abort_reason or "")
    assert len(_requests(sandbox, "POST /ingestion")) == 1  # not uploaded again


@pytest.mark.parametrize(
    ("mangle", "size", "kind", "creates"),
    [
        ({"dataset_id": None}, 3000, "protocol", ATTEMPTS),
        ({"mode": "carrier-pigeon"}, 3000, "rejected", 1),
        ({"mode": "multipart", "part_size": 1}, 20_000, "rejected", 1),
    ],
    ids=["no_dataset_id", "unknown_mode", "impossible_part_list"],
)
def test_protocol_nonsense_is_tried_a_few_times_then_failed(
    sandbox: Sandbox,
    tmp_path: Path,
    mangle: dict[str, Any],
    size: int,
    kind: str,
    creates: int,
) -> None:
    """(Issue 10, point 8: a create answer without ``dataset_id`` was retried forever,
    creating a new ingestion every few seconds — 30 in a minute.)"""
    config = write_config(tmp_path, sandbox)
    sandbox.faults.mangle["POST /ingestion"] = mangle
    write_file(tmp_path / "inbox" / "odd.bin", size)
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(lambda: job_states(config).get("failed"), 60, "the job to fail")
        failed_at = time.time()
        time.sleep(3.0)  # long enough for another round, had the job looped
    finally:
        assert stop_daemon(proc) == 0
    [job] = jobs(config)
    posted = _requests(sandbox, "POST /ingestion")
    states = Counter(i.state for i in sandbox.ingestions.values())
    summary(
        "server_answers",
        test="protocol_nonsense",
        mangle=mangle,
        creates=len(posted),
        error=job.last_error,
        kind=job.error_kind,
        ingestions=dict(states),
    )
    assert job.error_kind == kind, job
    assert len(posted) == creates, len(posted)
    assert not [r for r in posted if r.time > failed_at], "created more after failing"
    assert "UPLOADING" not in states, states  # every one it created was aborted
    assert states["ABORTED"] == creates, states
