"""The older Marple API target (``[api] kind = "marple"``) and the sandbox that serves it.

First the sandbox's own API (token, envelope, error codes, faults), then the client's error
mapping, then the daemon delivering to it end to end: several files, a changed file, faults and
lost answers, a SIGKILL while the import answer is outstanding, ``status --json`` and ``check``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import structlog
from pydantic import SecretStr

from daemon.config import MarpleSettings, load_settings
from daemon.delivery.flow import UploadOptions
from daemon.delivery.marple_db.client import MarpleClient
from daemon.delivery.marple_legacy.client import MarpleLegacyApi, SourceStatus
from daemon.delivery.marple_legacy.target import (
    MarpleLegacyTarget,
    _update,
    _utc_seconds,
    plain_http_warning,
)
from daemon.errors import (
    AuthError,
    ConfigError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RejectedError,
    ServerError,
    UploadFailed,
)
from daemon.sandbox import Sandbox
from daemon.state import JobState, Queue
from tests.support.data import TOKEN, write_file
from tests.support.runner import counts, inboxd, running_service, start_daemon, write_config
from tests.support.waits import wait_until

KiB = 1024
MARPLE = {"kind": "marple"}


def _api(sb: Sandbox, token: str | None = TOKEN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.Client(base_url=sb.url, headers=headers, timeout=10)


def _upload(c: httpx.Client, folder: str, name: str, data: bytes) -> httpx.Response:
    """Upload ``name`` into ``folder``, making the folders first as the server requires."""
    _folders(c, folder)
    return c.post("/library/file/upload", params={"path": folder}, files={"file": (name, data)})


def _folders(c: httpx.Client, folder: str) -> None:
    parent = "/"
    for name in [p for p in folder.split("/") if p and p not in (".", "..")]:
        c.post("/library/folder/add", json={"path": parent, "new_folder_name": name})
        parent = f"{parent.rstrip('/')}/{name}"


def _envelope(r: httpx.Response) -> Any:
    body = r.json()
    assert set(body) == {"request_time", "message"}, body
    assert isinstance(body["request_time"], int | float)
    return body["message"]


def _done(config: Path, n: int, failed: int = 0) -> Callable[[], Any]:
    async def check() -> bool:
        c = await counts(config)
        return c.get("done", 0) == n and c.get("failed", 0) == failed

    return check


def _status(config: Path) -> dict[str, Any]:
    out = inboxd("status", "--config", str(config), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _one_source_per_file(sb: Sandbox, files: dict[str, bytes]) -> None:
    """Every file is on the file server byte for byte and has exactly one source."""
    assert sorted(sb.legacy.files) == sorted(files)
    for path, data in files.items():
        assert sb.legacy.file_bytes(path) == data, path
    paths = [s.path for s in sb.legacy.sources.values()]
    assert sorted(paths) == sorted(files), paths


# ---- the sandbox's older API ---------------------------------------------------------------


def test_sandbox_wants_the_token_and_answers_in_the_envelope(sandbox: Sandbox) -> None:
    for token in (None, "wrong"):
        with _api(sandbox, token) as c:
            # /version is open, as the official clients expect (they call it before the
            # token check); GET / is that token check.
            assert "sandbox" in _envelope(c.get("/version"))
            r = c.get("/")
            assert r.status_code == 403
            assert _envelope(r) == "Invalid or missing token"
            assert _upload(c, "/x", "a.csv", b"1").status_code == 403
            assert c.post("/sources/search", json={"library_filter": {}}).status_code == 403
    assert not sandbox.legacy.files
    with _api(sandbox) as c:
        r = c.get("/")
        assert r.status_code == 200 and "token accepted" in _envelope(r)
    # Open to anyone, yet still under the sandbox's faults.
    sandbox.faults.fail_next = {"GET /version": [503]}
    with _api(sandbox, None) as c:
        assert c.get("/version").status_code == 503
        assert c.get("/version").status_code == 200
    # The Marple DB API on the same server keeps its own format.
    with _api(sandbox, "wrong") as c:
        assert c.get("/streams").json() == {"detail": "Invalid or missing token"}


def test_sandbox_upload_import_status_metadata_and_share(sandbox: Sandbox) -> None:
    sandbox.config.import_seconds = 0.3
    with _api(sandbox) as c:
        r = _upload(c, "/lab/day-1", "run.csv", b"t,x\n0,1\n")
        assert _envelope(r) == {"status": "OK", "path": "lab/day-1"}
        _upload(c, "/lab", "b.csv", b"t,y\n")
        imp = c.post(
            "/library/file/import", json={"path": "/lab/day-1/run.csv", "plugin": "csv_plugin"}
        )
        first = _envelope(imp)["source_id"]
        other = _envelope(
            c.post("/library/file/import", json={"path": "/lab/b.csv", "plugin": "csv_plugin"})
        )["source_id"]
        found = _envelope(c.get("/sources/lookup", params={"path": "/lab/day-1/run.csv"}))
        assert found["source_id"] == first
        statuses = _envelope(c.get("/sources/status", params={"id": [first, other, 999]}))
        assert [s["source_id"] for s in statuses] == [first, other]
        assert all(0 <= s["status"] < 100 for s in statuses)
        time.sleep(0.35)
        statuses = _envelope(c.get("/sources/status", params={"id": first}))
        assert statuses == [{"source_id": first, "status": 100}]

        meta = [{"name": "rig", "value": "r1"}, {"name": "timestamp_modified", "value": 17}]
        r = c.post("/library/metadata", json={"source_id": first, "metadata": meta})
        assert _envelope(r) == {"source_id": first, "status": "OK"}
        assert sandbox.legacy.sources[first].metadata == {"rig": "r1", "timestamp_modified": 17}

        share = _envelope(
            c.post("/library/share/new", json={"workbook_name": "Bench", "source_ids": [first]})
        )
        link = _envelope(c.get(f"/library/share/{share}/link"))
        assert link == f"{sandbox.origin}/?share={share}"
        assert _envelope(c.post(f"/library/share/{share}/link", json={})) == link

        # A second upload replaces the file; importing it again keeps the source id.
        _upload(c, "/lab/day-1", "run.csv", b"t,x\n0,2\n1,3\n")
        assert sandbox.legacy.file_bytes("/lab/day-1/run.csv") == b"t,x\n0,2\n1,3\n"
        again = c.post(
            "/library/file/import", json={"path": "/lab/day-1/run.csv", "plugin": "csv_plugin"}
        )
        assert _envelope(again)["source_id"] == first
    source = sandbox.legacy.sources[first]
    assert source.import_count == 2 and source.status < 100
    assert len(sandbox.legacy.sources) == 2
    assert sandbox.legacy.files["/lab/day-1/run.csv"].uploads == 2


def test_sandbox_sources_search_lists_sources_under_a_folder(sandbox: Sandbox) -> None:
    sandbox.config.import_seconds = 0.0
    with _api(sandbox) as c:

        def search(library_filter: object) -> httpx.Response:
            return c.post("/sources/search", json={"library_filter": library_filter})

        assert _envelope(search({})) == []
        for folder, name in (("/lab/day-1", "run.csv"), ("/lab", "b.csv"), ("/other", "c.csv")):
            _upload(c, folder, name, b"t,x\n0,1\n")
            path = f"{folder}/{name}"
            c.post("/library/file/import", json={"path": path, "plugin": "csv_plugin"})
        first = sandbox.legacy.source_for("/lab/day-1/run.csv")
        assert first is not None
        meta = [{"name": "rig", "value": "r1"}]
        c.post("/library/metadata", json={"source_id": first.id, "metadata": meta})

        everything = _envelope(search({}))
        assert [s["path"] for s in everything] == [
            "/lab/day-1/run.csv",
            "/lab/b.csv",
            "/other/c.csv",
        ]
        assert everything[0] == {
            "source_id": first.id,
            "path": "/lab/day-1/run.csv",
            "name": "run.csv",
            "plugin": "csv_plugin",
            "status": 100,
            "metadata": meta,
            "dataset_filter": {"source_id": first.id},
            "timestamp_start": None,
            "timestamp_stop": None,
        }
        # The body may leave the filter out; a folder lists what lies under it, at any depth.
        assert _envelope(c.post("/sources/search", json={})) == everything
        lab = [s["path"] for s in _envelope(search({"path": "/lab/"}))]
        assert lab == ["/lab/day-1/run.csv", "/lab/b.csv"]
        assert _envelope(search({"path": "/la"})) == []  # a folder, not a name prefix
        for bad in ({"name": "x"}, {"path": "relative"}, [], "everything"):
            r = search(bad)
            assert r.status_code == 400, bad
            assert isinstance(_envelope(r), str)
        assert c.post("/sources/search", json={"filter": {}}).status_code == 400


def test_sandbox_refuses_bad_requests_with_the_right_codes(sandbox: Sandbox) -> None:
    with _api(sandbox) as c:
        assert _upload(c, "relative", "a.csv", b"1").status_code == 400
        assert _upload(c, "/a/../b", "a.csv", b"1").status_code == 400
        r = c.post("/library/file/upload", params={"path": "/x"}, files={"other": ("a", b"1")})
        assert r.status_code == 400 and "file" in _envelope(r)
        r = c.post("/library/file/upload", params={"path": "/x"}, content=b"not multipart")
        assert r.status_code == 400
        r = c.post("/library/file/import", json={"path": "/x/none.csv", "plugin": "csv_plugin"})
        assert r.status_code == 404 and "no file" in _envelope(r)
        _upload(c, "/x", "a.csv", b"1")
        r = c.post("/library/file/import", json={"path": "/x/a.csv", "plugin": "nope_plugin"})
        assert r.status_code == 400 and "unknown plugin" in _envelope(r)
        assert c.post("/library/file/import", content=b"{").status_code == 400
        assert c.get("/sources/status").status_code == 400
        assert c.get("/sources/status", params={"id": "x"}).status_code == 400
        r = c.get("/sources/lookup", params={"path": "/x/a.csv"})
        assert r.status_code == 404 and "no source" in _envelope(r)
        r = c.post("/library/metadata", json={"source_id": 5, "metadata": []})
        assert r.status_code == 404
        r = c.post("/library/metadata", json={"source_id": 1, "metadata": {"a": 1}})
        assert r.status_code == 400
        r = c.post("/library/share/new", json={"workbook_name": "w", "source_ids": []})
        assert r.status_code == 400
        assert c.get("/library/share/feedbeef/link").status_code == 404
        sandbox.legacy.max_upload_bytes = 10
        r = _upload(c, "/x", "big.csv", b"0123456789abcdef")
        assert r.status_code == 413
        assert "/x/big.csv" not in sandbox.legacy.files
        big = c.post("/library/metadata", content=b"[" + b" " * (1024 * 1024 + 1) + b"]")
        assert big.status_code == 413
    assert len(sandbox.legacy.files) == 1  # only /x/a.csv


def test_sandbox_faults_apply_to_the_older_api_in_its_envelope(sandbox: Sandbox) -> None:
    sandbox.faults.retry_after = 2.0
    sandbox.faults.fail_next = {"POST /library/file/import": [503, 429, 0]}
    sandbox.faults.fail_import_glob = "*broken*"
    sandbox.config.import_seconds = 0.0
    with _api(sandbox) as c:
        _upload(c, "/f", "broken.csv", b"1")
        body = {"path": "/f/broken.csv", "plugin": "csv_plugin"}
        for code in (503, 429):
            r = c.post("/library/file/import", json=body)
            assert r.status_code == code and r.headers["retry-after"] == "2"
            assert "injected fault" in _envelope(r)
        assert not sandbox.legacy.sources  # refused before any work
        with pytest.raises(httpx.HTTPError):
            c.post("/library/file/import", json=body)  # done, but the answer is cut off
        (source,) = sandbox.legacy.sources.values()
        status = _envelope(c.get("/sources/status", params={"id": source.id}))
        assert status[0]["status"] == -1 and "injected fault" in status[0]["message"]
    dropped = [r for r in sandbox.requests if r.dropped]
    assert [r.route for r in dropped] == ["POST /library/file/import"]


# ---- the client: envelope and error mapping -----------------------------------------------


async def test_client_maps_answers_to_our_errors(sandbox: Sandbox) -> None:
    async with MarpleClient(sandbox.url, SecretStr("wrong"), timeout=5) as bad:
        assert "sandbox" in await MarpleLegacyApi(bad).version()  # no token needed
        with pytest.raises(AuthError):
            await MarpleLegacyApi(bad).token_check()
    async with MarpleClient(sandbox.url, SecretStr(TOKEN), timeout=5) as client:
        api = MarpleLegacyApi(client)
        assert await api.lookup("/nothing/here.csv") is None
        sandbox.faults.retry_after = 1.5
        sandbox.faults.fail_next = {"GET /version": [503, 429]}
        with pytest.raises(ServerError) as server:
            await api.version()
        assert server.value.retryable and server.value.retry_after == 1.5
        with pytest.raises(RateLimitedError):
            await api.version()
        with pytest.raises(NotFoundError):
            await api.add_metadata(12345, [{"name": "a", "value": 1}])
        with pytest.raises(RejectedError) as rejected:
            await api.import_file("relative.csv", "csv_plugin")
        assert "absolute" in str(rejected.value)

    def no_envelope(request: httpx.Request) -> httpx.Response:
        # A stream, as a real connection gives: the client reads answers chunk by chunk.
        return httpx.Response(200, stream=httpx.ByteStream(b'{"version": "1"}'))

    transport = httpx.MockTransport(no_envelope)
    async with MarpleClient("http://x.invalid/api/v1", SecretStr("t"), transport=transport) as c:
        with pytest.raises(ProtocolError, match="envelope"):
            await MarpleLegacyApi(c).version()


def test_marple_settings_validate_and_merge(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[marple]\nfolder = "lab/"\n')
    with pytest.raises(ConfigError, match=r"marple\.folder"):
        load_settings(cfg)
    cfg.write_text("[marple]\nshare = true\n")
    with pytest.raises(ConfigError, match="workbook"):
        load_settings(cfg)
    cfg.write_text('[marple]\nfolder = "/lab//x/"\nplugins = { ".XYZ" = "xyz_plugin", csv = "" }\n')
    m = load_settings(cfg).marple
    assert m.folder == "/lab/x"
    assert m.plugins["xyz"] == "xyz_plugin" and "csv" not in m.plugins
    assert m.plugins["mf4"] == "mdf_plugin"  # the other defaults stay


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (0, ("WAITING", 0.0, False, False)),
        (42, ("IMPORTING", 42.0, False, False)),
        (100, ("FINISHED", 100.0, True, False)),
        (-1, ("FAILED", None, True, True)),
        (250, ("STATUS 250", None, False, False)),
        ("odd", ("STATUS odd", None, False, False)),
        (None, ("STATUS None", None, False, False)),
    ],
)
def test_status_codes_map_to_import_updates(code: object, expected: tuple[object, ...]) -> None:
    update = _update(7, SourceStatus.model_validate({"source_id": 1, "status": code}))
    assert (update.status, update.progress, update.terminal, update.failed) == expected
    if update.failed:
        assert update.message == "the import failed (status -1)"


def test_date_metadata_becomes_utc_seconds() -> None:
    assert _utc_seconds("d", "2024-05-01T12:00:00+02:00") == 1714557600
    assert _utc_seconds("d", "2024-05-01T10:00:00Z") == 1714557600
    assert _utc_seconds("d", "2024-05-01 10:00:00") == 1714557600  # no offset: UTC
    assert _utc_seconds("d", "2024-05-01") == 1714521600
    assert _utc_seconds("d", 1714557600.9) == 1714557600
    assert _utc_seconds("d", "1714557600") == 1714557600
    for bad in ("yesterday", True, "inf", float("nan"), None):
        with pytest.raises(UploadFailed, match="date_metadata"):
            _utc_seconds("d", bad)


# ---- the daemon delivering to it -----------------------------------------------------------


async def test_delivers_files_with_plugins_metadata_and_share_links(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        sandbox,
        api=MARPLE,
        upload={"metadata": {"rig": "r1"}},
        marple={
            "folder": "/lab",
            "share": True,
            "workbook": "Bench",
            "date_metadata": ["recorded"],
        },
    )
    with config.open("a") as fh:
        fh.write(
            '[[routes]]\nglob = "hdf/*"\n'
            'metadata = { plugin = "hdf5_plugin", recorded = "2024-05-01T12:00:00+02:00" }\n'
        )
    inbox = tmp_path / "inbox"
    files = {
        "/lab/session-1/run.csv": write_file(inbox / "session-1/run.csv", 5 * KiB, 1),
        "/lab/session-1/deep/log.MF4": write_file(inbox / "session-1/deep/log.MF4", 300 * KiB, 2),
        "/lab/hdf/x.bin": write_file(inbox / "hdf/x.bin", 2 * KiB, 3),
    }
    write_file(inbox / "odd.xyz", 10, 4)
    sandbox.faults.fail_import_glob = "*broken*"
    broken = write_file(inbox / "broken.csv", 100, 5)
    async with running_service(config):
        await wait_until(_done(config, 3, failed=2))
    files["/lab/broken.csv"] = broken  # uploaded and imported, but the import failed
    _one_source_per_file(sandbox, files)
    by_path = {s.path: s for s in sandbox.legacy.sources.values()}
    assert by_path["/lab/session-1/run.csv"].plugin == "csv_plugin"
    assert by_path["/lab/session-1/deep/log.MF4"].plugin == "mdf_plugin"
    hdf = by_path["/lab/hdf/x.bin"]
    assert hdf.plugin == "hdf5_plugin"
    mtime = (inbox / "hdf/x.bin").stat().st_mtime_ns // 10**9
    assert hdf.metadata == {"rig": "r1", "recorded": 1714557600, "timestamp_modified": mtime}
    assert by_path["/lab/session-1/run.csv"].metadata["rig"] == "r1"

    snap = _status(config)
    jobs = {j["path"]: j for j in snap["jobs"]}
    odd = jobs["odd.xyz"]
    assert odd["state"] == "failed" and "[marple] plugins" in odd["error"]
    failed_import = jobs["broken.csv"]
    assert failed_import["state"] == "failed" and failed_import["import_status"] == "FAILED"
    assert "injected fault" in failed_import["import_message"]
    assert len(sandbox.legacy.shares) == 4
    for rel, path in (("session-1/run.csv", "/lab/session-1/run.csv"), ("hdf/x.bin", hdf.path)):
        job = jobs[rel]
        source = by_path[path]
        assert job["state"] == "done" and job["target"] == "marple"
        assert job["dataset_id"] == source.id and job["import_status"] == "FINISHED"
        refs = job["target_refs"]
        assert refs["source_id"] == source.id and refs["path"] == path
        share = sandbox.legacy.shares[refs["share_id"]]
        assert share.source_ids == [source.id] and share.workbook == "Bench"
        assert refs["share_link"] == f"{sandbox.origin}/?share={share.id}"


async def test_changed_file_goes_over_the_old_one_into_the_same_source(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path, sandbox, api=MARPLE, marple={"share": True, "workbook": "Bench"}
    )
    path = tmp_path / "inbox" / "s" / "run.csv"
    write_file(path, 3 * KiB, 1)
    async with running_service(config) as svc:
        await wait_until(_done(config, 1))
        v2 = write_file(path.with_name("tmp"), 5 * KiB, 2)
        os.replace(path.with_name("tmp"), path)
        await wait_until(_done(config, 2))
        queue: Queue = svc.queue  # type: ignore[assignment]
        jobs = await queue.find_by_rel("s/run.csv")
    _one_source_per_file(sandbox, {"/inboxd/s/run.csv": v2})
    (source,) = sandbox.legacy.sources.values()
    assert source.import_count == 2  # re-imported in place, not a second source
    assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE]
    assert {j.remote_id for j in jobs} == {source.id}
    # The source kept its share link: no second share for the new version.
    assert len(sandbox.legacy.shares) == 1
    assert jobs[0].target_refs["share_link"] == jobs[1].target_refs["share_link"]


async def test_file_changed_during_its_upload_leaves_one_source(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.faults.storage_delay_per_mib = 2.0  # the file server is this API's storage
    config = write_config(tmp_path, sandbox, api=MARPLE)
    path = tmp_path / "inbox" / "changing.csv"
    write_file(path, 600 * KiB, 1)
    async with running_service(config) as svc:
        await wait_until(lambda: svc.workers is not None and svc.workers.active)
        await anyio.sleep(0.2)
        final = write_file(path.with_name("tmp.new"), 200 * KiB, 2)
        os.replace(path.with_name("tmp.new"), path)
        sandbox.faults.storage_delay_per_mib = 0.0
        await wait_until(_done(config, 1))
        queue: Queue = svc.queue  # type: ignore[assignment]
        jobs = await queue.find_by_rel("changing.csv")
    assert [j.state for j in jobs] == [JobState.SUPERSEDED, JobState.DONE]
    _one_source_per_file(sandbox, {"/inboxd/changing.csv": final})
    (source,) = sandbox.legacy.sources.values()
    assert source.import_count == 1  # the old version never reached the import


async def test_faults_and_lost_answers_make_exactly_one_source_per_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    f = sandbox.faults
    sandbox.reseed_faults(11)
    f.api_503_rate, f.api_429_rate, f.drop_response_rate = 0.12, 0.08, 0.12
    f.retry_after = 0.05
    # The first two imports: a lost answer (done on the server), then a 503 (not done).
    f.fail_next = {"POST /library/file/import": [0, 503, 0]}
    config = write_config(tmp_path, sandbox, api=MARPLE, upload={"workers": 3})
    inbox = tmp_path / "inbox"
    files = {
        f"/inboxd/d{i}/f{i}.csv": write_file(inbox / f"d{i}/f{i}.csv", (i + 1) * 7 * KiB, i)
        for i in range(8)
    }
    async with running_service(config):
        await wait_until(_done(config, len(files)), timeout=40)
    f.api_503_rate = f.api_429_rate = f.drop_response_rate = 0.0
    _one_source_per_file(sandbox, files)
    # A lost import answer was recognised by the lookup: nothing was imported twice.
    assert all(s.import_count == 1 for s in sandbox.legacy.sources.values())
    assert any(r.dropped and r.route == "POST /library/file/import" for r in sandbox.requests)
    assert any(r.status == 503 for r in sandbox.requests)


@pytest.mark.slow
def test_sigkill_while_the_import_answer_is_outstanding(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.legacy.import_answer_delay = 30.0  # the source exists; the answer never comes
    config = write_config(tmp_path, sandbox, api=MARPLE, upload={"workers": 1})
    data = write_file(tmp_path / "inbox" / "victim.csv", 40 * KiB)
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        deadline = time.monotonic() + 20
        while not sandbox.legacy.sources and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sandbox.legacy.sources, "the import never reached the sandbox"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    sandbox.legacy.import_answer_delay = 0.0
    before = _status(config)["jobs"][0]
    assert before["state"] == "uploading" and before["mode"] == "import"
    proc = start_daemon(config, log)
    try:
        deadline = time.monotonic() + 30
        while anyio.run(counts, config).get("done", 0) != 1:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    _one_source_per_file(sandbox, {"/inboxd/victim.csv": data})
    (source,) = sandbox.legacy.sources.values()
    assert source.import_count == 1
    (job,) = _status(config)["jobs"]
    assert job["dataset_id"] == source.id and job["target_refs"]["source_id"] == source.id
    assert TOKEN not in log.read_text()


def test_check_reports_the_older_api(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox, api=MARPLE)
    ok = inboxd("check", "--config", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "✓ token accepted" in ok.stdout and "files go to /inboxd" in ok.stdout
    bad = inboxd("check", "--config", str(config), env={"INBOXD_API__TOKEN": "nope-nope"})
    assert bad.returncode == 1
    assert "✓ reach" in bad.stdout  # /version answers without a token
    assert "✗ token accepted by GET /:" in bad.stdout and "nope-nope" not in bad.stdout


# ---- folders made explicitly, a share link per folder, plain http ----------------------------


def test_sandbox_folders_must_exist_and_shares_grow_into_new_ids(sandbox: Sandbox) -> None:
    legacy = sandbox.legacy
    with _api(sandbox) as c:

        def add(parent: str, name: str) -> httpx.Response:
            return c.post("/library/folder/add", json={"path": parent, "new_folder_name": name})

        # No folder, no upload: nothing stored, the answer says what to do.
        r = c.post("/library/file/upload", params={"path": "/run-1"}, files={"file": ("a", b"1")})
        assert r.status_code == 404 and "folder/add" in _envelope(r)
        assert not legacy.files
        # One level at a time, in an existing parent; an existing folder is a 409.
        assert add("/run-1", "deep").status_code == 404
        assert _envelope(add("/", "run-1")) == {"status": "OK", "path": "/run-1"}
        assert add("/", "run-1").status_code == 409
        assert add("/run-1", "deep").status_code == 200
        for bad in ("", "..", "a/b"):
            assert add("/run-1", bad).status_code == 400, bad
        assert legacy.folders == {"/", "/run-1", "/run-1/deep"}
        r = c.post(
            "/library/file/upload", params={"path": "/run-1/deep"}, files={"file": ("a", b"1")}
        )
        assert r.status_code == 200 and legacy.file_bytes("/run-1/deep/a") == b"1"

        # share/add answers a new share id holding both; the old id keeps what it had.
        ids = []
        for name in ("x.csv", "y.csv"):
            _upload(c, "/run-1", name, b"t\n1\n")
            imp = c.post(
                "/library/file/import", json={"path": f"/run-1/{name}", "plugin": "csv_plugin"}
            )
            ids.append(_envelope(imp)["source_id"])
        first = _envelope(
            c.post("/library/share/new", json={"workbook_name": "Bench", "source_ids": ids[:1]})
        )
        grown = _envelope(c.post(f"/library/share/{first}/add", json={"source_ids": ids[1:]}))
        assert grown != first
        assert legacy.shares[first].source_ids == ids[:1]
        assert legacy.shares[grown].source_ids == ids and legacy.shares[grown].workbook == "Bench"
        assert c.post("/library/share/nope/add", json={"source_ids": ids}).status_code == 404
        assert c.post(f"/library/share/{grown}/add", json={"source_ids": []}).status_code == 400
        link = c.get(f"/library/share/{grown}/link", params={"url": "https://viewer.example/"})
        assert _envelope(link) == f"https://viewer.example/?share={grown}"


async def test_folders_made_explicitly_and_one_share_link_per_folder(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    sandbox.config.import_seconds = 0.0
    legacy = sandbox.legacy
    legacy.folders.add("/tests")  # made by someone else already: its 409 is no problem
    config = write_config(
        tmp_path,
        sandbox,
        api=MARPLE,
        upload={"workers": 3},
        marple={
            "folder": "/tests/inboxd",
            "share": True,
            "workbook": "Bench",
            "share_scope": "folder",
            "share_url": "https://viewer.example/app",
        },
    )
    inbox = tmp_path / "inbox"
    files = {
        f"/tests/inboxd/{rel}": write_file(inbox / rel, 1 * KiB, n)
        for n, rel in enumerate(
            ["run-1/a.csv", "run-1/b.csv", "run-1/c.csv", "run-1/deep/d.csv", "run-2/e.csv"]
        )
    }
    async with running_service(config) as service:
        await wait_until(_done(config, 5))
        queue: Queue = service.queue  # type: ignore[assignment]
        jobs = [j for rel in sorted(files) for j in await queue.find_by_rel(rel[14:])]
    _one_source_per_file(sandbox, files)
    made = [r.status for r in sandbox.requests if r.route == "POST /library/folder/add"]
    # Each folder asked for once, whichever of the three workers needed it first: four made
    # (inboxd, run-1, deep, run-2), and /tests, which existed, answered 409.
    assert sorted(made) == [200, 200, 200, 200, 409], made
    assert legacy.folders >= {
        "/tests",
        "/tests/inboxd",
        "/tests/inboxd/run-1",
        "/tests/inboxd/run-1/deep",
        "/tests/inboxd/run-2",
    }
    source_of = {s.path: s.id for s in legacy.sources.values()}
    by_folder: dict[str, list[Any]] = {}
    for job in jobs:
        refs = job.target_refs
        by_folder.setdefault(refs["share_folder"], []).append(refs)
        assert refs["share_link"] == f"https://viewer.example/app/?share={refs['share_id']}"
    assert sorted(by_folder) == [
        "/tests/inboxd/run-1",
        "/tests/inboxd/run-1/deep",
        "/tests/inboxd/run-2",
    ]
    # Each folder's newest share holds all its sources: the adds were made one at a time.
    for folder, refs_list in by_folder.items():
        want = {i for p, i in source_of.items() if p.rsplit("/", 1)[0] == folder}
        held = [set(legacy.shares[r["share_id"]].source_ids) for r in refs_list]
        assert want in held, (folder, held)
        assert all(h <= want for h in held)
    routes = [r.route for r in sandbox.requests]
    assert routes.count("POST /library/share/new") == 3  # one per folder
    assert routes.count("POST /library/share/{share_id}/add") == 2  # run-1's later two


async def test_plain_http_to_another_host_is_warned_about(tmp_path: Path) -> None:
    for quiet in (
        "https://marple.example/api/v1",
        "http://127.0.0.1:8787/api/v1",
        "http://localhost/api/v1",
        "http://[::1]:9/api/v1",
    ):
        assert plain_http_warning(quiet) is None, quiet
    warning = plain_http_warning("http://me:s3cret@marple.example:8080/api/v1")
    assert warning and "https" in warning and "http://marple.example:8080 " in warning
    assert "s3cret" not in warning

    with structlog.testing.capture_logs() as logs:
        async with MarpleClient("http://192.0.2.1:9/api/v1", SecretStr("t"), timeout=1) as c:
            MarpleLegacyTarget(c, UploadOptions(), MarpleSettings())
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["marple.plain_http"]

    config = tmp_path / "c.toml"
    config.write_text(
        '[api]\nkind = "marple"\nurl = "http://192.0.2.1:9/api/v1"\ntoken = "t0ken"\n'
        "timeout = 1.0\n"
    )
    out = inboxd("check", "--config", str(config))
    assert out.returncode == 1  # nothing answers there
    assert "! [api] url http://192.0.2.1:9 is plain http" in out.stdout, out.stdout
