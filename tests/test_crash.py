"""The daemon as a real process: SIGTERM is a graceful stop, SIGKILL loses nothing."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from daemon.sandbox import Sandbox
from tests.support.data import TOKEN, write_file
from tests.support.runner import (
    catches_sigterm,
    inboxd,
    kill_daemon,
    server_datasets,
    start_daemon,
    stop_daemon,
    write_config,
)
from tests.support.waits import wait_for

KiB = 1024
pytestmark = pytest.mark.slow


def _status(config: Path) -> dict:  # type: ignore[type-arg]
    import json

    out = inboxd("status", "--config", str(config), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _done(config: Path, n: int) -> bool:
    if not (config.parent / "state" / "state.db").exists():
        return False  # the daemon is still starting
    return _status(config)["counts"]["done"] == n


def _check_exactly_once(sb: Sandbox, files: dict[str, bytes]) -> None:
    names = server_datasets(sb)
    assert sorted(names) == sorted(files)
    for name, data in files.items():
        assert len(names[name]) == 1, f"{name}: {names[name]}"
        assert sb.dataset_bytes(names[name][0]) == data, name
    assert not [i for i in sb.ingestions.values() if i.state == "UPLOADING"]


def _assert_token_nowhere(tmp_path: Path) -> None:
    """The token is in no log line and in no byte of the state database."""
    log = (tmp_path / "daemon.log").read_bytes()
    assert log, "the daemon wrote no log"
    assert TOKEN.encode() not in log
    for db in (tmp_path / "state").glob("state.db*"):
        assert TOKEN.encode() not in db.read_bytes(), db.name


def _files(inbox: Path) -> dict[str, bytes]:
    sizes = [3 * KiB, 50 * KiB, 300 * KiB, 700 * KiB, 1300 * KiB, 2100 * KiB]
    return {
        f"run{i}/data{i}.bin": write_file(inbox / f"run{i}/data{i}.bin", s, i)
        for i, s in enumerate(sizes)
    }


def test_sigterm_during_start_up_still_exits_zero(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox)
    for extra in (0.0, 0.3):
        proc = start_daemon(config, tmp_path / "daemon.log")
        # The first thing `python -m daemon run` does is to catch SIGTERM; everything after
        # (imports, config, queue, watcher) is start-up that a stop must not break.
        wait_for(lambda p=proc: catches_sigterm(p.pid), 10, "the SIGTERM handler", step=0.005)
        time.sleep(extra)
        assert stop_daemon(proc) == 0


def test_sigterm_stops_gracefully_and_exits_zero(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox, log={"level": "info"})
    files = _files(tmp_path / "inbox")
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(lambda: _done(config, len(files)), 60, "all files done")
        assert _status(config)["daemon"]["alive"] is True
    finally:
        code = stop_daemon(proc)
    assert code == 0
    log = (tmp_path / "daemon.log").read_text()
    assert "daemon.stopped" in log
    assert _status(config)["daemon"]["alive"] is False
    _check_exactly_once(sandbox, files)
    _assert_token_nowhere(tmp_path)


def test_sigterm_mid_upload_resumes_after_restart(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.faults.storage_delay_per_mib = 3.0
    config = write_config(tmp_path, sandbox, upload={"part_concurrency": 1, "workers": 1})
    data = write_file(tmp_path / "inbox" / "big.bin", 2048 * KiB)
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(
            lambda: any(r.kind == "storage" and r.status == 200 for r in sandbox.requests),
            30,
            "a part",
        )
    finally:
        code = stop_daemon(proc)  # grace (3 s) is shorter than the upload: it is cancelled and kept
    assert code == 0
    parts_before = sum(1 for r in sandbox.requests if r.kind == "storage" and r.status == 200)
    sandbox.faults.storage_delay_per_mib = 0.0
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(lambda: _done(config, 1), 60, "upload after restart")
    finally:
        assert stop_daemon(proc) == 0
    parts = [r.path for r in sandbox.requests if r.kind == "storage" and r.status == 200]
    assert {p.rsplit("/", 1)[-1] for p in parts} == {str(n) for n in range(1, 9)}
    # Parts acknowledged before the stop are not sent again; at most the one part that was
    # in flight when the grace period ran out (part_concurrency = 1) is.
    assert len(parts) <= 8 + 1
    assert parts_before >= 1
    _check_exactly_once(sandbox, {"big.bin": data})


@pytest.mark.parametrize(
    "point",
    ["after_create", "mid_multipart", "after_complete"],
)
def test_sigkill_at_a_point_then_restart(sandbox: Sandbox, tmp_path: Path, point: str) -> None:
    sandbox.faults.storage_delay_per_mib = 1.0
    sandbox.config.import_seconds = 2.0
    config = write_config(tmp_path, sandbox, upload={"part_concurrency": 1, "workers": 1})
    data = write_file(tmp_path / "inbox" / "victim.bin", 1500 * KiB)

    def reached() -> bool:
        reqs = list(sandbox.requests)
        if point == "after_create":
            return any(r.path.endswith("/ingestion") and r.method == "POST" for r in reqs)
        if point == "mid_multipart":
            return sum(1 for r in reqs if r.kind == "storage" and r.status == 200) >= 2
        return any(r.path.endswith("/upload/complete") and r.status == 200 for r in reqs)

    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(reached, 30, point)
    finally:
        kill_daemon(proc)
    sandbox.faults.storage_delay_per_mib = 0.0
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(lambda: _done(config, 1), 60, "done after restart")
    finally:
        assert stop_daemon(proc) == 0
    _check_exactly_once(sandbox, {"victim.bin": data})
    if point == "after_complete":
        # Completed before the kill: nothing is uploaded again, no second ingestion.
        assert len(sandbox.ingestions) == 1


def test_random_sigkills_lose_nothing_and_duplicate_nothing(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    rnd = random.Random(20261122)
    sandbox.faults.storage_delay_per_mib = 0.6
    config = write_config(tmp_path, sandbox, upload={"workers": 2, "part_concurrency": 2})
    inbox = tmp_path / "inbox"
    files = _files(inbox)
    kills = 0
    for _ in range(10):
        proc = start_daemon(config, tmp_path / "daemon.log")
        time.sleep(rnd.uniform(0.4, 1.6))
        kill_daemon(proc)
        kills += 1
        if rnd.random() < 0.3:  # files keep arriving between crashes
            name = f"late/{kills}.csv"
            files[name] = write_file(inbox / name, rnd.randint(1, 900 * KiB), 100 + kills)
    sandbox.faults.storage_delay_per_mib = 0.0
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        wait_for(lambda: _done(config, len(files)), 90, "all files done")
    finally:
        assert stop_daemon(proc) == 0
    assert kills == 10
    _check_exactly_once(sandbox, files)
    _assert_token_nowhere(tmp_path)
