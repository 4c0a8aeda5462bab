"""Changes after delivery, and a restore over a fresh state database, with a real daemon.

A real ``inboxd run`` (a child process) against the sandbox over loopback; the files are
changed the way people and loggers change them: reopened in append mode, rewritten, ``chmod``,
``touch`` with the same time, copied away and back with their times (a restore from a backup).
What the service holds afterwards is checked byte for byte.

(Issue 10, "Changes after delivery" and point 7.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.sandbox import Sandbox
from tests.support.data import TOKEN, content_hash_of
from tests.support.rig import jobs, log_records, status_json
from tests.support.runner import inboxd, start_daemon, stop_daemon, write_config
from tests.support.waits import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KiB = 1024
PART = 256 * KiB  # the sandbox_config fixture's part size (multipart above 512 KiB)


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _done(config: Path, n: int) -> bool:
    return sum(str(j.state) == "done" for j in jobs(config)) >= n


def _wait_done(config: Path, n: int) -> None:
    wait_for(
        lambda: _done(config, n),
        60,
        lambda: (
            f"{n} jobs done: "
            + str([(j.identity.rel, str(j.state), j.last_error) for j in jobs(config)])
        ),
    )


def _datasets(sb: Sandbox, prefix: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for ds in list(sb.datasets.values()):
        if ds.path.startswith(prefix):
            out.setdefault(ds.path, []).append(ds.id)
    return out


def _creates(sb: Sandbox) -> int:
    """Ingestions created (a name clash answered 409 created nothing)."""
    return sum(1 for r in list(sb.requests) if r.route == "POST /ingestion" and r.status == 200)


def _newest(config: Path, rel: str) -> Any:
    return max((j for j in jobs(config) if j.identity.rel == rel), key=lambda j: j.id)


def _status_row(config: Path, rel: str) -> dict[str, Any]:
    rows = [r for r in status_json(config)["jobs"] if r["path"] == rel]
    assert rows, f"{rel} not in status"
    return rows[0]  # type: ignore[no-any-return]


def _status_text(config: Path) -> str:
    out = inboxd("status", "--config", str(config))
    assert out.returncode == 0, out.stderr
    return out.stdout


# ------------------------------------------------------------------------------ appended


@pytest.mark.parametrize("on_append", ["same-dataset", "new-version"])
def test_append_after_delivery(sandbox: Sandbox, tmp_path: Path, on_append: str) -> None:
    """A delivered log reopened in append mode and written to: by default one dataset, the
    same id, with every byte; with ``on_append = "new-version"`` a ``(2)`` dataset."""
    config = write_config(tmp_path, sandbox, upload={"on_append": on_append})
    path = tmp_path / "inbox" / "run.csv"
    first, more = _bytes(100 * KiB, 1), _bytes(50 * KiB, 2)
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        path.write_bytes(first)
        _wait_done(config, 1)
        [original] = _datasets(sandbox, "run")["run.csv"]
        with path.open("ab") as fh:  # a logger that reopens its file and carries on
            fh.write(more)
        _wait_done(config, 2)
        row = _status_row(config, "run.csv")
        text = _status_text(config)
    finally:
        assert stop_daemon(proc) == 0
    datasets = _datasets(sandbox, "run")
    newest = _newest(config, "run.csv")
    if on_append == "same-dataset":
        assert datasets == {"run.csv": [original]}, datasets
        assert sandbox.dataset_bytes(original) == first + more
        assert newest.change == "appended" and newest.remote_id == original
        note = f"appended: delivered again into dataset {original}"
        assert row["change"] == "appended" and row["note"] == note
        assert note in text
        [event] = log_records(log, ("upload.appended",))
        assert event["note"] == note
    else:
        assert sorted(datasets) == ["run (2).csv", "run.csv"], datasets
        assert sandbox.dataset_bytes(original) == first  # the earlier run left as it was
        assert sandbox.dataset_bytes(datasets["run (2).csv"][0]) == first + more
        assert newest.change is None and row["note"] is None
        assert not log_records(log, ("upload.appended",))


def test_rewrite_with_other_content_is_a_new_version(sandbox: Sandbox, tmp_path: Path) -> None:
    """Larger, but its first bytes differ: not an append. A new dataset ``(2)``; the first
    one keeps the earlier run's data."""
    config = write_config(tmp_path, sandbox)
    path = tmp_path / "inbox" / "run.csv"
    first, second = _bytes(100 * KiB, 1), _bytes(150 * KiB, 3)
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        path.write_bytes(first)
        _wait_done(config, 1)
        path.write_bytes(second)
        _wait_done(config, 2)
    finally:
        assert stop_daemon(proc) == 0
    datasets = _datasets(sandbox, "run")
    assert sorted(datasets) == ["run (2).csv", "run.csv"], datasets
    assert sandbox.dataset_bytes(datasets["run.csv"][0]) == first
    assert sandbox.dataset_bytes(datasets["run (2).csv"][0]) == second
    assert _newest(config, "run.csv").change is None


def test_multipart_file_appended(sandbox: Sandbox, tmp_path: Path) -> None:
    """A multipart delivery's hash is made of its parts' digests (taken while they streamed);
    the prefix check of the appended file cuts it the same way, so it is recognised."""
    config = write_config(tmp_path, sandbox)
    path = tmp_path / "inbox" / "big.bin"
    first = _bytes(4 * PART + 100 * KiB, 4)  # 5 parts of 256 KiB (the last one short)
    more = _bytes(3 * PART, 5)
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        path.write_bytes(first)
        _wait_done(config, 1)
        delivered = _newest(config, "big.bin")
        assert delivered.mode == "multipart"
        assert delivered.content_hash == content_hash_of(first, PART)
        with path.open("ab") as fh:
            fh.write(more)
        _wait_done(config, 2)
    finally:
        assert stop_daemon(proc) == 0
    datasets = _datasets(sandbox, "big")
    assert datasets == {"big.bin": [delivered.remote_id]}, datasets
    assert sandbox.dataset_bytes(delivered.remote_id) == first + more
    newest = _newest(config, "big.bin")
    assert newest.change == "appended"
    assert newest.content_hash == content_hash_of(first + more, PART)


# ------------------------------------------------------------------ metadata-only changes


def test_chmod_and_touch_of_a_delivered_file_upload_nothing(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """``chmod`` and ``touch`` with the same times move only the ctime: the file is a new
    version by identity, but holds the delivered bytes. Nothing is sent; status says why.
    (The regression the ctime identity brought: it was uploaded again as ``name (2)``.)"""
    config = write_config(tmp_path, sandbox)
    path = tmp_path / "inbox" / "run.csv"
    data = _bytes(300 * KiB, 6)
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        path.write_bytes(data)
        _wait_done(config, 1)
        creates = _creates(sandbox)
        before = os.stat(path)
        path.chmod(0o600)
        _wait_done(config, 2)
        subprocess.run(["touch", "-c", "-r", str(path), str(path)], check=True)  # same times
        after = os.stat(path)
        assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
        _wait_done(config, 3)
        row = _status_row(config, "run.csv")
        text = _status_text(config)
    finally:
        assert stop_daemon(proc) == 0
    assert _creates(sandbox) == creates, "something was uploaded again"
    assert _datasets(sandbox, "run") == {"run.csv": [row["dataset_id"]]}
    changes = [j.change for j in sorted(jobs(config), key=lambda j: j.id)]
    assert changes == [None, "unchanged", "unchanged"], changes
    note = f"content unchanged: nothing to upload (dataset {row['dataset_id']} holds it)"
    assert row["change"] == "unchanged" and row["note"] == note
    assert note in text


def test_changes_while_the_import_still_runs(sandbox: Sandbox, tmp_path: Path) -> None:
    """A ``chmod`` and then an append while the delivered version is still importing: the
    unchanged version waits for that import (it is not done before the service is), the
    appended one goes into the same dataset; every job ends done, one dataset, all bytes."""
    sandbox.config.import_seconds = 3.0
    config = write_config(tmp_path, sandbox)
    path = tmp_path / "inbox" / "run.csv"
    first, more = _bytes(100 * KiB, 17), _bytes(30 * KiB, 18)
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        path.write_bytes(first)
        wait_for(lambda: [str(j.state) for j in jobs(config)] == ["importing"], 30, "the import")
        path.chmod(0o600)
        wait_for(lambda: len(jobs(config)) == 2, 30, "the chmod'ed version")
        wait_for(lambda: str(_newest(config, "run.csv").state) == "importing", 30, "its outcome")
        unchanged = _newest(config, "run.csv")
        assert unchanged.change == "unchanged" and _creates(sandbox) == 1
        with path.open("ab") as fh:
            fh.write(more)
        _wait_done(config, 3)
    finally:
        assert stop_daemon(proc) == 0
    datasets = _datasets(sandbox, "run")
    assert datasets == {"run.csv": [unchanged.remote_id]}, datasets
    assert sandbox.dataset_bytes(unchanged.remote_id) == first + more
    changes = [j.change for j in sorted(jobs(config), key=lambda j: j.id)]
    assert changes == [None, "unchanged", "appended"], changes
    assert _creates(sandbox) == 2


def test_same_size_and_time_but_other_bytes_is_a_new_version(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Rewritten in place with the mtime restored, after its delivery: the hash differs,
    so it is a new version (``(2)``), never taken for the delivered one."""
    config = write_config(tmp_path, sandbox)
    path = tmp_path / "inbox" / "run.csv"
    old, new = _bytes(100 * KiB, 7), _bytes(100 * KiB, 8)
    proc = start_daemon(config, tmp_path / "daemon.log")
    try:
        path.write_bytes(old)
        _wait_done(config, 1)
        st = os.stat(path)
        with path.open("r+b") as fh:
            fh.write(new)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        _wait_done(config, 2)
    finally:
        assert stop_daemon(proc) == 0
    datasets = _datasets(sandbox, "run")
    assert sorted(datasets) == ["run (2).csv", "run.csv"], datasets
    assert sandbox.dataset_bytes(datasets["run (2).csv"][0]) == new
    assert _newest(config, "run.csv").change is None


# ------------------------------------------------------------------------------ restored


def _old_inboxd_dataset(sb: Sandbox, name: str, data: bytes) -> int:
    """A dataset as an inboxd before the size/mtime metadata made it (over plain HTTP)."""
    with httpx.Client(base_url=sb.url, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        body = {"stream_id": 1, "dataset_name": name, "file_size": len(data), "metadata": {}}
        ing = c.post("/ingestion", json=body).raise_for_status().json()
        assert ing["mode"] == "server"
        c.post(
            f"/ingestion/{ing['ingestion_id']}/upload/server", files={"file": (name, data)}
        ).raise_for_status()
        c.post(f"/ingestion/{ing['ingestion_id']}/upload/complete").raise_for_status()
    wait_for(lambda: sb.datasets[ing["dataset_id"]].import_status == "FINISHED", 10, "the import")
    return int(ing["dataset_id"])


def test_restore_over_a_fresh_state_database(sandbox: Sandbox, tmp_path: Path) -> None:
    """Deliver, stop, lose the state database, copy the inbox away and back (new inodes and
    ctimes, times kept): nothing is uploaded again, each file gets a warning, the start one
    summary. A file whose bytes changed while its size and mtime were restored is taken for
    the delivered one too (the service keeps no hash to tell): the documented limit.
    A dataset an older inboxd made (no size/mtime metadata) falls back to ``on_name_clash``."""
    config = write_config(tmp_path, sandbox)
    inbox = tmp_path / "inbox"
    files = {
        "a.csv": _bytes(10 * KiB, 10),  # server mode
        "s/b.bin": _bytes(200 * KiB, 11),  # single
        "s/c.bin": _bytes(3 * PART, 12),  # multipart
        "d.csv": _bytes(20 * KiB, 13),  # its bytes change, size and mtime are restored
    }
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        for rel, data in files.items():
            (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
            (inbox / rel).write_bytes(data)
        _wait_done(config, len(files))
    finally:
        assert stop_daemon(proc) == 0
    delivered = {rel: ids[0] for rel, ids in _datasets(sandbox, "").items()}
    assert sorted(delivered) == sorted(files)
    old_style = "old.csv"
    old_data = _bytes(5 * KiB, 14)
    old_id = _old_inboxd_dataset(sandbox, old_style, old_data)

    # The state database is lost; the inbox is restored from a copy that kept the times.
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    backup = tmp_path / "backup"
    shutil.copytree(inbox, backup)  # copy2: mtimes kept to the nanosecond
    inodes = {rel: os.stat(inbox / rel).st_ino for rel in files}
    shutil.rmtree(inbox)
    shutil.copytree(backup, inbox)
    assert all(os.stat(inbox / rel).st_ino != inodes[rel] for rel in files)
    st = os.stat(inbox / "d.csv")
    (inbox / "d.csv").write_bytes(_bytes(20 * KiB, 15))
    os.utime(inbox / "d.csv", ns=(st.st_atime_ns, st.st_mtime_ns))
    (inbox / old_style).write_bytes(old_data)
    creates = _creates(sandbox)

    proc = start_daemon(config, log)
    try:
        _wait_done(config, len(files) + 1)
        wait_for(lambda: log_records(log, ("state.fresh_database",)), 30, "the summary")
        rows = {r["path"]: r for r in status_json(config)["jobs"]}
        text = _status_text(config)
    finally:
        assert stop_daemon(proc) == 0
    assert _creates(sandbox) == creates + 1  # old.csv only: its dataset has no facts to match
    datasets = _datasets(sandbox, "")
    assert {rel: datasets[rel] for rel in files} == {rel: [i] for rel, i in delivered.items()}
    assert datasets[old_style] == [old_id] and len(datasets["old (2).csv"]) == 1
    for rel, data in files.items():
        if rel != "d.csv":
            assert sandbox.dataset_bytes(delivered[rel]) == data, rel
    warned = log_records(log, ("upload.already_on_server",))
    assert sorted(e["path"] for e in warned) == sorted(files)
    assert all(e["level"] == "warning" for e in warned)
    for rel in files:
        note = (
            f"already on the server as dataset {delivered[rel]} (same name, size and"
            " modification time): not uploaded again"
        )
        assert rows[rel]["change"] == "on_server" and rows[rel]["note"] == note
        assert note in text
    assert rows[old_style]["change"] is None
    [summary] = log_records(log, ("state.fresh_database",))
    assert summary["level"] == "warning" and summary["files"] == len(files)
    assert "the state database is new; 4 files were already on the server" in summary["note"]
    # Recognised files have a content hash of their own: a later append is still recognised.
    recognised = _newest(config, "a.csv")
    assert recognised.content_hash == content_hash_of(files["a.csv"], len(files["a.csv"]))


def test_restored_file_with_a_precision_loss_mtime(sandbox: Sandbox, tmp_path: Path) -> None:
    """A backup that kept the mtime only to the second still matches its dataset."""
    config = write_config(tmp_path, sandbox)
    path = tmp_path / "inbox" / "run.csv"
    data = _bytes(10 * KiB, 16)
    path.write_bytes(data)
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        _wait_done(config, 1)
    finally:
        assert stop_daemon(proc) == 0
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    path.unlink()
    path.write_bytes(data)
    os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    proc = start_daemon(config, log)
    try:
        _wait_done(config, 1)
    finally:
        assert stop_daemon(proc) == 0
    assert list(_datasets(sandbox, "run")) == ["run.csv"]
    assert _newest(config, "run.csv").change == "on_server"
    meta = next(iter(sandbox.datasets.values())).metadata
    assert meta["inboxd_file_size"] == len(data)
    assert meta["inboxd_file_mtime_ns"] == "1700000000123456789"
    assert json.loads(json.dumps(meta))  # plain JSON values
