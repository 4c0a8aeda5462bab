"""Versions suite: the bytes a dataset completes with are always one whole version of the file.

A real ``inboxd run`` uploads a file slowly (the sandbox's storage delay) while a writer
rewrites it in place, same size, and restores its modification time (``os.utime``), as
``rsync --inplace -t`` or any time-preserving tool does. Size, mtime and inode stay the same;
only the ctime moves.

(Issue 10, point 2: the check before ``complete`` compared size, mtime and inode only: the
completed dataset was "first 8 MiB old, rest new", and the new content was never uploaded.)

CI: ``.venv/bin/python -m pytest tests/suites/test_versions_suite.py -s``.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from daemon.sandbox import Sandbox
from tests.support.data import MiB
from tests.support.rig import job_states, jobs, summary
from tests.support.runner import start_daemon, stop_daemon, write_config
from tests.support.waits import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.mark.parametrize("size", [2 * MiB, 300 * 1024], ids=["multipart", "single"])
def test_in_place_rewrite_with_restored_mtime_during_upload(
    sandbox: Sandbox, tmp_path: Path, size: int
) -> None:
    sandbox.faults.storage_delay_per_mib = 2.0  # a slow link: the upload takes seconds
    config = write_config(tmp_path, sandbox, upload={"workers": 1, "part_concurrency": 2})
    path = tmp_path / "inbox" / "run.mf4"
    old = random.Random(1).randbytes(size)
    new = random.Random(2).randbytes(size)
    path.write_bytes(old)
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(
            lambda: any(r.kind == "storage" for r in list(sandbox.requests)),
            30,
            "the upload to reach storage",
        )
        st = os.stat(path)
        with path.open("r+b") as fh:  # in place: same inode, same size
            fh.write(new)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime restored
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            st.st_size,
            st.st_mtime_ns,
            st.st_ino,
        )
        wait_for(lambda: job_states(config).get("done"), 60, "the new version to be delivered")
    finally:
        assert stop_daemon(proc) == 0
    datasets = [d for d in sandbox.datasets.values() if d.path.startswith("run")]
    states = {str(j.state): j.last_error for j in jobs(config)}
    contents = [sandbox.dataset_bytes(d.id) for d in datasets]
    summary(
        "versions",
        test="rewrite_restored_mtime",
        size=size,
        datasets=[d.path for d in datasets],
        jobs=states,
        ingestions=sorted(i.state for i in sandbox.ingestions.values()),
    )
    assert [d.path for d in datasets] == ["run.mf4"], datasets  # taken over, not renamed
    [data] = contents
    assert hashlib.sha256(data).digest() == hashlib.sha256(new).digest(), (
        "the dataset does not hold the new version"
        + (" (it holds the old one)" if data == old else " (it holds a mix)")
    )
    assert set(states) == {"done", "superseded"}, states
    assert "UPLOADING" not in {i.state for i in sandbox.ingestions.values()}
