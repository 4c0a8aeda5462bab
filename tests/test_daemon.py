"""End to end: a real inbox, the daemon, the sandbox over loopback, a real SQLite queue."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from daemon.commands import status
from daemon.sandbox import Sandbox
from daemon.state import JobState, Queue
from tests.support.data import TOKEN, write_file
from tests.support.runner import counts, inboxd, running_service, server_datasets, write_config
from tests.support.waits import wait_until

KiB = 1024


def _all_done(n: int, config: Path):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        c = await counts(config)
        return c.get("done", 0) == n

    return check


def _assert_exactly_once(sb: Sandbox, expected: dict[str, bytes]) -> None:
    names = server_datasets(sb)
    assert sorted(names) == sorted(expected), names
    for name, data in expected.items():
        (ds_id,) = names[name]
        assert sb.dataset_bytes(ds_id) == data, name
    assert not [i for i in sb.ingestions.values() if i.state == "UPLOADING"]


async def test_files_at_start_and_dropped_later_all_land_once(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path, sandbox)
    inbox = tmp_path / "inbox"
    expected = {
        "early.csv": write_file(inbox / "early.csv", 5 * KiB, 1),
        "nested/deeper/single.bin": write_file(inbox / "nested/deeper/single.bin", 300 * KiB, 2),
    }
    async with running_service(config):
        expected["late multipart ü.mf4"] = write_file(inbox / "late multipart ü.mf4", 900 * KiB, 3)
        expected["a/b/c/d/e/f/deep.csv"] = write_file(inbox / "a/b/c/d/e/f/deep.csv", 100, 4)
        await wait_until(_all_done(4, config))
    _assert_exactly_once(sandbox, expected)
    modes = sorted(i.mode for i in sandbox.ingestions.values())
    assert modes == ["multipart", "server", "server", "single"]


async def test_restart_never_uploads_a_done_file_again(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox)
    data = write_file(tmp_path / "inbox" / "once.csv", 2000)
    async with running_service(config):
        await wait_until(_all_done(1, config))
    async with running_service(config):
        await anyio.sleep(1.0)  # a start-up scan and a few settle periods
    _assert_exactly_once(sandbox, {"once.csv": data})
    assert len(sandbox.ingestions) == 1


async def test_growing_file_is_taken_when_it_stops(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox, inbox={"settle_seconds": 0.5})
    path = tmp_path / "inbox" / "growing.csv"
    async with running_service(config):
        with path.open("wb") as fh:
            for i in range(10):
                fh.write(f"row {i}\n".encode() * 100)
                fh.flush()
                await anyio.sleep(0.1)
        await wait_until(_all_done(1, config))
    _assert_exactly_once(sandbox, {"growing.csv": path.read_bytes()})


async def test_file_changed_during_upload_is_restarted_and_lands_once(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.faults.storage_delay_per_mib = 2.0  # ~0.5 s per 256 KiB part
    config = write_config(tmp_path, sandbox, upload={"part_concurrency": 1})
    path = tmp_path / "inbox" / "changing.mf4"
    write_file(path, 1024 * KiB, 1)
    async with running_service(config) as svc:
        await wait_until(lambda: svc.workers is not None and svc.workers.active)
        await anyio.sleep(0.3)
        final = write_file(path.with_name("tmp.new"), 700 * KiB, 2)
        os.replace(path.with_name("tmp.new"), path)  # an editor's atomic save: new inode
        sandbox.faults.storage_delay_per_mib = 0.0
        await wait_until(_all_done(1, config))
        queue: Queue = svc.queue  # type: ignore[assignment]
        jobs = await queue.find_by_rel("changing.mf4")

        # The superseded upload's abort runs in its worker's clean-up, which a busy machine may
        # schedule after the new version is done: wait for it rather than race it.
        def aborted() -> list[Any]:
            return [i for i in sandbox.ingestions.values() if i.state == "ABORTED"]

        await wait_until(lambda: len(aborted()) >= 1, timeout=15)
    assert [j.state for j in jobs] == [JobState.SUPERSEDED, JobState.DONE]
    _assert_exactly_once(sandbox, {"changing.mf4": final})
    assert len(aborted()) == 1
    assert "changed" in (aborted()[0].abort_reason or "")


async def test_small_files_pass_large_ones_in_their_own_lane(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """One slot for any file, four for small ones: small files keep landing while both large
    files crawl through storage, and never more than one large file is in flight."""
    # ~2.5 s per 256 KiB part, 10 s per large file: the small files have 20 s before the
    # second large file could be done, however busy the machine is.
    sandbox.faults.storage_delay_per_mib = 10.0
    upload = {"workers": 1, "small_files": 4, "small_file_bytes": 64 * KiB, "part_concurrency": 1}
    config = write_config(tmp_path, sandbox, upload=upload)
    inbox = tmp_path / "inbox"
    expected = {f"big{i}.mf4": write_file(inbox / f"big{i}.mf4", 1024 * KiB, i) for i in (1, 2)}
    seen_large: list[int] = []
    seen_small: list[int] = []
    async with running_service(config) as svc:
        await wait_until(lambda: svc.workers is not None and svc.workers.active)
        for i in range(12):
            expected[f"s{i:02d}.csv"] = write_file(inbox / f"s{i:02d}.csv", 4 * KiB, 10 + i)
        workers = svc.workers
        assert workers is not None

        async def all_small_done() -> bool:
            active = list(workers.active.values())
            seen_large.append(sum(1 for j in active if j.identity.size > 64 * KiB))
            seen_small.append(sum(1 for j in active if j.identity.size <= 64 * KiB))
            c = await counts(config)
            return c.get("done", 0) + c.get("importing", 0) >= 12

        await wait_until(all_small_done, timeout=30)
        queue: Queue = svc.queue  # type: ignore[assignment]
        bigs = [j for name in ("big1.mf4", "big2.mf4") for j in await queue.find_by_rel(name)]
        # The large files are still on their way (one slot for them: the second cannot have
        # finished): the small ones did not queue behind them.
        assert [j.state for j in bigs].count(JobState.DONE) <= 1
        sandbox.faults.storage_delay_per_mib = 0.0
        await wait_until(_all_done(14, config), timeout=60)
    assert max(seen_large) == 1
    assert max(seen_small) >= 2  # small files went in parallel
    _assert_exactly_once(sandbox, expected)


async def test_file_deleted_during_upload_fails_with_reason_others_unaffected(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.faults.storage_delay_per_mib = 2.0
    config = write_config(tmp_path, sandbox, upload={"part_concurrency": 1, "workers": 1})
    inbox = tmp_path / "inbox"
    write_file(inbox / "doomed.mf4", 1024 * KiB, 1)
    async with running_service(config) as svc:
        await wait_until(lambda: svc.workers is not None and svc.workers.active)
        (inbox / "doomed.mf4").unlink()
        sandbox.faults.storage_delay_per_mib = 0.0
        other = write_file(inbox / "fine.csv", 3000, 2)
        await wait_until(_all_done(1, config))
        await wait_until(lambda: counts(config), timeout=10)
        queue: Queue = svc.queue  # type: ignore[assignment]
        (job,) = await queue.find_by_rel("doomed.mf4")
    assert job.state == JobState.FAILED
    assert "vanished" in (job.last_error or "")
    assert sandbox.dataset_bytes(server_datasets(sandbox)["fine.csv"][0]) == other


async def test_empty_and_odd_files_get_clear_reasons(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox)
    inbox = tmp_path / "inbox"
    (inbox / "empty.csv").write_bytes(b"")
    odd = os.fsencode(str(inbox)) + b"/caf\xe9 latin1.csv"
    with open(odd, "wb") as fh:
        fh.write(b"x,y\n1,2\n")
    long_name = "L" * 251 + ".csv"
    write_file(inbox / long_name, 100)
    (inbox / "link.csv").symlink_to(inbox / long_name)
    os.mkfifo(inbox / "pipe.csv")
    async with running_service(config) as svc:
        await wait_until(_all_done(2, config))
        await wait_until(lambda: counts(config))
        queue: Queue = svc.queue  # type: ignore[assignment]
        (empty,) = await queue.find_by_rel("empty.csv")
        await wait_until(lambda: queue.get(empty.id))
        snap = await status.snapshot(queue)
    names = server_datasets(sandbox)
    assert "caf%E9 latin1.csv" in names
    assert long_name in names
    assert "link.csv" not in names and "pipe.csv" not in names
    by_path = {j["path"]: j for j in snap.jobs}
    assert by_path["empty.csv"]["state"] == "failed"
    assert "empty" in by_path["empty.csv"]["error"]


async def test_faults_and_lost_answers_still_deliver_exactly_once(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    f = sandbox.faults
    f.seed = 11
    f.api_503_rate = 0.15
    f.api_429_rate = 0.1
    f.retry_after = 0.05
    f.storage_503_rate = 0.15
    f.drop_response_rate = 0.15
    config = write_config(tmp_path, sandbox, retry={"attempts": 8})
    inbox = tmp_path / "inbox"
    expected = {
        f"f{i}.bin": write_file(inbox / f"f{i}.bin", size, i)
        for i, size in enumerate([10, 40 * KiB, 200 * KiB, 600 * KiB, 1100 * KiB, 3 * KiB])
    }
    async with running_service(config):
        await wait_until(_all_done(len(expected), config), timeout=60)
    _assert_exactly_once(sandbox, expected)


async def test_api_outage_then_recovery(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox)
    sandbox.faults.api_503_rate = 1.0  # the API is down
    data = write_file(tmp_path / "inbox" / "outage.csv", 4000)
    async with running_service(config) as svc:
        queue: Queue = svc.queue  # type: ignore[assignment]

        async def retried() -> bool:
            jobs = await queue.find_by_rel("outage.csv")
            return bool(jobs) and jobs[0].attempts >= 2

        await wait_until(retried, timeout=20)
        (job,) = await queue.find_by_rel("outage.csv")
        assert job.state in (JobState.QUEUED, JobState.UPLOADING)
        assert "503" in (job.last_error or "")
        sandbox.faults.api_503_rate = 0.0  # back
        await wait_until(_all_done(1, config), timeout=20)
    _assert_exactly_once(sandbox, {"outage.csv": data})


async def test_revoked_token_pauses_instead_of_failing_everything(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path, sandbox)
    inbox = tmp_path / "inbox"
    write_file(inbox / "first.csv", 100)
    async with running_service(config, probe_seconds=0.3) as svc:
        await wait_until(_all_done(1, config))
        sandbox.config.token = "rotated-token"  # our token is revoked
        for i in range(5):
            write_file(inbox / f"later{i}.csv", 100, i)
        await wait_until(lambda: svc.pause.paused, timeout=20)
        await anyio.sleep(0.5)
        c = await counts(config)
        assert c["failed"] == 0
        snap = await status.snapshot(svc.queue)  # type: ignore[arg-type]
        assert "token" in (snap.daemon["paused"] or "")
        assert TOKEN not in json.dumps(snap.as_json())
        sandbox.config.token = TOKEN  # fixed
        await wait_until(_all_done(6, config), timeout=20)
    assert not svc.pause.paused


async def test_import_failure_is_recorded_and_retry_requeues(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.faults.fail_import_glob = "*bad*"
    config = write_config(tmp_path, sandbox)
    inbox = tmp_path / "inbox"
    data = write_file(inbox / "bad.csv", 500)
    write_file(inbox / "good.csv", 500, 2)
    async with running_service(config) as svc:
        queue: Queue = svc.queue  # type: ignore[assignment]
        await wait_until(lambda: counts(config), timeout=5)

        async def failed() -> bool:
            return (await counts(config)).get("failed") == 1

        await wait_until(failed)
        (job,) = await queue.find_by_rel("bad.csv")
        assert job.error_kind == "import"
        assert "import failed" in (job.last_error or "")
        sandbox.faults.fail_import_glob = None
        result = inboxd("retry", "--config", str(config), "--all-failed")
        assert result.returncode == 0, result.stderr
        assert "requeued 1" in result.stdout
        await wait_until(_all_done(2, config))
    names = server_datasets(sandbox)
    assert len(names["bad.csv"]) == 1  # same dataset, re-used
    assert sandbox.dataset_bytes(names["bad.csv"][0]) == data


@pytest.mark.parametrize("action", ["archive", "delete"])
async def test_after_upload_archive_or_delete(
    sandbox: Sandbox, tmp_path: Path, action: str
) -> None:
    archive = tmp_path / "archive"
    config = write_config(
        tmp_path,
        sandbox,
        inbox={"after_upload": action, "archive_path": str(archive)},
    )
    src = tmp_path / "inbox" / "run1" / "log.csv"
    data = write_file(src, 1000)
    async with running_service(config):
        await wait_until(lambda: not src.exists(), timeout=20)
        await anyio.sleep(0.5)
    if action == "archive":
        assert (archive / "run1" / "log.csv").read_bytes() == data
    else:
        assert not archive.exists()
    _assert_exactly_once(sandbox, {"run1/log.csv": data})


async def test_routes_templates_sidecars_and_path_metadata(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        sandbox,
        upload={"path_metadata": ["vehicle", "driver"], "metadata": {"rig": "r1"}},
    )
    with config.open("a") as fh:
        fh.write(
            '[[routes]]\nglob = "*.mf4"\nstream = "vehicle logs"\nmetadata = { kind = "mf4" }\n'
        )
    inbox = tmp_path / "inbox"
    write_file(inbox / "v7" / "kate" / "run.mf4", 1000)
    (inbox / "v7" / "kate" / "run.mf4.meta.json").write_text('{"weather": "rain", "laps": 3}')
    write_file(inbox / "plain.csv", 100)
    async with running_service(config):
        await wait_until(_all_done(2, config))
    by_name = {d.path: d for d in sandbox.datasets.values()}
    mf4 = by_name["v7/kate/run.mf4"]
    assert mf4.stream_id == 2
    assert {
        k: mf4.metadata[k] for k in ("vehicle", "driver", "kind", "rig", "weather", "laps")
    } == {
        "vehicle": "v7",
        "driver": "kate",
        "kind": "mf4",
        "rig": "r1",
        "weather": "rain",
        "laps": 3,
    }
    assert by_name["plain.csv"].stream_id == 1
    assert "run.mf4.meta.json" not in " ".join(by_name)


async def test_status_json_while_running(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.faults.storage_delay_per_mib = 6.0  # 1.5 s per 256 KiB part, 4 parts
    config = write_config(tmp_path, sandbox, upload={"part_concurrency": 1})
    inbox = tmp_path / "inbox"
    write_file(inbox / "slow.mf4", 1024 * KiB)
    async with running_service(config) as svc:
        await wait_until(lambda: svc.workers is not None and svc.workers.active)
        await anyio.sleep(2.0)  # the first part is stored, its bytes_sent saved
        out = await anyio.to_thread.run_sync(
            lambda: inboxd("status", "--config", str(config), "--json")
        )
        human = await anyio.to_thread.run_sync(lambda: inboxd("status", "--config", str(config)))
        sandbox.faults.storage_delay_per_mib = 0.0
        await wait_until(_all_done(1, config))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["daemon"]["alive"] is True
    (job,) = [j for j in doc["jobs"] if j["path"] == "slow.mf4"]
    assert job["state"] == "uploading"
    assert 0 < job["percent"] < 100
    assert set(doc["counts"]) == {"settling", "queued", "uploading", "importing", "done", "failed"}
    assert human.returncode == 0
    assert "slow.mf4" in human.stdout and "daemon: running" in human.stdout
    assert TOKEN not in out.stdout + human.stdout
