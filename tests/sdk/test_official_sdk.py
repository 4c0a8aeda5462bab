"""The official ``marpledata`` SDK (3.7.0), unmodified, against ``inboxd sandbox``.

The sandbox is held against a client nobody here wrote: the SDK's ``DB`` connects, lists and
looks up streams, pushes a file in each upload mode the server can choose (``server``,
``single``, ``multipart``, ``azure``), waits for the import and reads datasets back by id, by
path and as lists; its ``Insight`` client makes the older API's token check and source search.
The SDK validates every answer against its pydantic models and only warns when one does not
fit, so ``filterwarnings = error`` (pyproject) turns any such warning into a failure here.

The SDK pulls in pandas and pyarrow, so this runs in its own venv: ``.ci/sdk.sh`` makes
``.venv-sdk`` (requirements-dev.lock + tests/sdk/requirements.lock) and runs this folder;
``tests/conftest.py`` leaves the folder out wherever ``marple`` is not installed.

Each sandbox is ``inboxd sandbox`` run as a subprocess on a free port with its own token, once
with local storage and once with S3 storage (moto), its stream 2 uploading to Azurite. What the
SDK sends is watched with ``requests`` response hooks on its two sessions (observing only), and
the bytes each upload left are read back from where the sandbox says it keeps them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
from marple import DB, Insight
from marple.db import Dataset, DatasetList, DataStream

from tests.support.emulators import AZURE_VERSION, Azurite, MotoS3
from tests.support.runner import terminate
from tests.support.waits import wait_for

TOKEN = "sdk-test-token-5ec2e7"  # the subprocess sandbox's made-up token
SERVER_MAX = 4 * 1024
SINGLE_MAX = 16 * 1024
PART = 8 * 1024
IMPORT_SECONDS = 0.3
BUCKET = "inboxd-sdk-test"
CONTAINER = "inboxd-sdk-test"
#: Size of a file in each mode the sandbox chooses for stream 1 (stream 2 is always azure).
SIZES = {"server": 2_000, "single": 10_000, "multipart": 5 * PART + 123, "azure": 10_000}
START_TIMEOUT = 60.0
IMPORT_TIMEOUT = 30.0


@dataclass
class SandboxProcess:
    """One ``inboxd sandbox`` subprocess and what a test needs to know about it."""

    url: str
    storage: str
    data_dir: Path
    log: Path
    moto: MotoS3 | None
    azurite: Azurite

    def stored_bytes(self, dataset: Dataset) -> bytes:
        """The bytes of a completed upload, read from where the sandbox says it keeps them."""
        where = dataset.backup_path
        assert where is not None, f"dataset {dataset.id} has no backup yet"
        if where.startswith("s3:"):
            assert self.moto is not None
            answer = self.moto.client().get_object(Bucket=BUCKET, Key=where.removeprefix("s3:"))
            data: bytes = answer["Body"].read()
            return data
        if where.startswith("azure:"):
            url = self.azurite.blob_url(CONTAINER, where.removeprefix("azure:"))
            blob = httpx.get(url, headers={"x-ms-version": AZURE_VERSION}, timeout=30)
            assert blob.status_code == 200, blob.text
            return blob.content
        return (self.data_dir / where).read_bytes()


@dataclass
class Traffic:
    """Every answer the SDK's two ``requests`` sessions received: (method, path, status)."""

    seen: list[tuple[str, str, int]] = field(default_factory=list)

    def hook(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.seen.append(
            (response.request.method or "", urlsplit(response.url).path, response.status_code)
        )

    def paths(self, method: str, contains: str) -> list[str]:
        return [p for m, p, _ in self.seen if m == method and contains in p]


def _start(
    tmp: Path, storage: str, moto: MotoS3 | None, azurite: Azurite
) -> tuple[subprocess.Popen[bytes], SandboxProcess]:
    data_dir = tmp / "data"
    log = tmp / "sandbox.log"
    argv = [
        str(Path(sys.executable).with_name("inboxd")),
        "sandbox",
        "--host", "127.0.0.1",
        "--port", "0",
        "--token", TOKEN,
        "--data-dir", str(data_dir),
        "--server-max-bytes", str(SERVER_MAX),
        "--single-max-bytes", str(SINGLE_MAX),
        "--part-size", str(PART),
        "--import-seconds", str(IMPORT_SECONDS),
        "--fail-import-glob", "*.broken",
        "--stream-mode", "2=azure",
        "--azure-account-url", azurite.account_url,
        "--azure-container", CONTAINER,
    ]  # fmt: skip
    if storage == "s3":
        assert moto is not None
        argv += ["--storage", "s3", "--s3-endpoint", moto.endpoint, "--s3-bucket", BUCKET]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def url() -> str | None:
        # The ready message is a config snippet: `url = "http://127.0.0.1:<port>/api/v1"`.
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith('url = "'):
                return line.split('"')[1]
        return None

    try:
        wait_for(lambda: proc.poll() is not None or url() is not None, START_TIMEOUT, "sandbox up")
    except TimeoutError:
        terminate(proc)
        raise
    found = url()
    if found is None:
        terminate(proc)
        raise RuntimeError(f"inboxd sandbox exited with {proc.returncode}:\n{log.read_text()}")
    return proc, SandboxProcess(found, storage, data_dir, log, moto, azurite)


@pytest.fixture(scope="module", params=["local", "s3"])
def sandbox(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    moto_s3_server_for_module: MotoS3,
    azurite: Azurite,
) -> Iterator[SandboxProcess]:
    """``inboxd sandbox`` with local or S3 (moto) storage; stream 2 uploads to Azurite."""
    storage: str = request.param
    moto = moto_s3_server_for_module if storage == "s3" else None
    proc, sb = _start(tmp_path_factory.mktemp(f"sandbox-{storage}"), storage, moto, azurite)
    try:
        yield sb
    finally:
        terminate(proc)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: a clean stop ends by it.
    assert proc.returncode in (0, -signal.SIGTERM), sb.log.read_text()[-3000:]


@pytest.fixture
def db(sandbox: SandboxProcess) -> DB:
    """The SDK's client, connected (its constructor checks /health and the token)."""
    return DB(TOKEN, sandbox.url)


@pytest.fixture
def traffic(db: DB) -> Traffic:
    seen = Traffic()
    db.client.session.hooks["response"].append(seen.hook)
    db.client.storage_session.hooks["response"].append(seen.hook)
    return seen


def _file(tmp_path: Path, size: int, suffix: str = ".bin") -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / f"{uuid.uuid4().hex[:8]}{suffix}"
    path.write_bytes(data)
    return path, data


# ------------------------------------------------------------------------------------ tests


def test_connect_and_list_streams(db: DB) -> None:
    streams = db.get_streams()
    assert [(s.id, s.name, s.type) for s in streams] == [
        (1, "inbox", "files"),
        (2, "Vehicle Logs", "files"),
    ]
    for stream in streams:
        assert isinstance(stream, DataStream)
        assert isinstance(stream.created_at, float) and stream.created_at > 1.6e9
        assert stream.datapool == "default"


def test_get_stream_by_id_and_by_name(db: DB) -> None:
    by_id = db.get_stream(2)
    by_name = db.get_stream("vehicle LOGS")  # the SDK matches names case-insensitively
    assert by_id.id == by_name.id == 2
    assert by_id.name == "Vehicle Logs"
    # GET /stream/{id}, the SDK's own refresh of one stream.
    fresh = db.get_stream("inbox").refresh()
    assert (fresh.id, fresh.name, fresh.version_id) == (1, "inbox", 1)


def test_a_bad_token_is_refused_with_the_servers_reason(sandbox: SandboxProcess) -> None:
    with pytest.raises(Exception, match="Invalid or missing token"):
        DB("not-the-token", sandbox.url)


@pytest.mark.parametrize("mode", ["server", "single", "multipart", "azure"])
def test_push_file_in_each_mode(
    db: DB, traffic: Traffic, sandbox: SandboxProcess, tmp_path: Path, mode: str
) -> None:
    path, data = _file(tmp_path, SIZES[mode])
    stream = db.get_stream("Vehicle Logs" if mode == "azure" else "inbox")
    name = f"{mode}/{path.name}"
    pushed = stream.push_file(str(path), metadata={"mode": mode}, file_name=name)

    assert isinstance(pushed, Dataset)
    assert (pushed.path, pushed.datastream_id, pushed.metadata) == (name, stream.id, {"mode": mode})
    server_posts = traffic.paths("POST", "/upload/server")
    part_urls = traffic.paths("GET", "/upload/part-urls")
    storage_puts = traffic.paths("PUT", "")
    if mode == "server":
        assert len(server_posts) == 1 and not part_urls and not storage_puts
    elif mode == "single":
        assert len(storage_puts) == 1 and not server_posts and not part_urls
    elif mode == "multipart":
        assert len(part_urls) == 1 and len(storage_puts) == 6 and not server_posts
    else:  # azure: the azure-storage-blob client talks to Azurite, not through requests
        assert not (server_posts or part_urls or storage_puts)
    assert all(status == 200 for _, _, status in traffic.seen), traffic.seen

    done = pushed.wait_for_import(timeout=IMPORT_TIMEOUT)
    assert done.import_status == "FINISHED", done
    assert done.import_progress == 100.0
    assert sandbox.stored_bytes(done) == data
    assert done.backup_size == len(data)
    if mode == "azure":
        assert (done.backup_path or "").startswith("azure:")
    elif mode == "server" or sandbox.storage == "local":
        assert done.backup_path == f"datasets/{done.id}"
    else:
        assert (done.backup_path or "").startswith("s3:")


def test_push_file_through_the_server_on_request(db: DB, traffic: Traffic, tmp_path: Path) -> None:
    """``upload_mode="server"`` sends a file the server wanted as `single` through the API."""
    path, data = _file(tmp_path, SIZES["single"])
    pushed = db.get_stream(1).push_file(str(path), upload_mode="server")
    assert pushed.path == path.name and pushed.backup_size == len(data)
    assert len(traffic.paths("POST", "/upload/server")) == 1
    assert not traffic.paths("PUT", "")
    assert pushed.wait_for_import(timeout=IMPORT_TIMEOUT).import_status == "FINISHED"


def test_wait_for_import_then_get_dataset_by_id_and_by_path(
    db: DB, tmp_path: Path, sandbox: SandboxProcess
) -> None:
    path, data = _file(tmp_path, SIZES["single"], ".csv")
    stream = db.get_stream(1)
    pushed = stream.push_file(str(path), metadata={"rig": "r7"})
    assert pushed.import_status in ("WAITING", "IMPORTING", "FINISHED")
    done = pushed.wait_for_import(timeout=IMPORT_TIMEOUT)
    assert done.import_status == "FINISHED"
    assert done.import_time is not None and done.import_time > 0
    assert (done.plugin, done.cold_bytes, done.hot_bytes) == ("csv", len(data), 0)

    by_id = db.get_dataset(dataset_id=done.id)
    by_path = db.get_dataset(dataset_path=path.name)
    assert by_id.model_dump() == by_path.model_dump() == done.model_dump()
    assert by_id.metadata == {"rig": "r7"} and by_id.created_at > 1.6e9
    assert stream.get_dataset(path=path.name).id == done.id
    assert sandbox.stored_bytes(by_path) == data
    with pytest.raises(requests.HTTPError):
        db.get_dataset(dataset_path="no/such/file.csv")  # a 404 the SDK raises as such


def test_a_failed_import_and_an_overwrite(db: DB, tmp_path: Path) -> None:
    path, _ = _file(tmp_path, SIZES["server"], ".broken")
    stream = db.get_stream(1)
    failed = stream.push_file(str(path)).wait_for_import(timeout=IMPORT_TIMEOUT)
    assert failed.import_status == "FAILED"
    assert "injected fault" in (failed.import_message or "")
    with pytest.raises(requests.HTTPError, match="409"):
        stream.push_file(str(path))  # the name is taken
    again = stream.push_file(str(path), overwrite=True, plugin_args="--skip-bad-rows")
    assert again.id == failed.id
    assert again.plugin_args == "--skip-bad-rows"


def test_get_datasets_of_a_stream_and_of_the_datapool(db: DB, tmp_path: Path) -> None:
    pushed = {
        sid: db.get_stream(sid)
        .push_file(str(_file(tmp_path, 1_000)[0]))
        .wait_for_import(timeout=IMPORT_TIMEOUT)
        for sid in (1, 2)
    }
    everything = db.get_datasets()
    assert isinstance(everything, DatasetList)
    ids = {d.id: d.datastream_id for d in everything}
    assert ids[pushed[1].id] == 1 and ids[pushed[2].id] == 2
    in_inbox = db.get_datasets("inbox")
    assert {d.datastream_id for d in in_inbox} == {1}
    assert pushed[1].id in {d.id for d in in_inbox.where_imported()}
    table = in_inbox.to_pandas()  # the SDK's own summary reads n_signals and n_datapoints
    assert list(table.columns[:5]) == ["id", "path", "n_signals", "n_datapoints", "import_status"]


def test_insight_client_checks_the_token_and_searches_sources(sandbox: SandboxProcess) -> None:
    """The SDK's ``Insight`` client: ``GET /version`` without a token, ``GET /`` with it, then
    ``POST /sources/search`` (the older API served by the same sandbox)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    folder = f"/sdk-{uuid.uuid4().hex[:8]}"
    made = requests.post(  # an upload goes into a folder that exists, as on a real server
        f"{sandbox.url}/library/folder/add",
        json={"path": "/", "new_folder_name": folder.lstrip("/")},
        headers=auth,
        timeout=30,
    )
    assert made.status_code == 200, made.text
    uploaded = requests.post(
        f"{sandbox.url}/library/file/upload",
        params={"path": folder},
        files={"file": ("run.csv", b"t,x\n0,1\n")},
        headers=auth,
        timeout=30,
    )
    assert uploaded.status_code == 200, uploaded.text
    imported = requests.post(
        f"{sandbox.url}/library/file/import",
        json={"path": f"{folder}/run.csv", "plugin": "csv_plugin"},
        headers=auth,
        timeout=30,
    )
    source_id = imported.json()["message"]["source_id"]

    insight = Insight(TOKEN, sandbox.url)
    (found,) = [d for d in insight.get_datasets() if d["path"].startswith(folder)]
    assert found["source_id"] == source_id
    assert insight.get_dataset(found["dataset_filter"])["path"] == f"{folder}/run.csv"
    with pytest.raises(Exception, match="Invalid API token"):
        Insight("not-the-token", sandbox.url)


# ------------------------------------------------------------- dataset operations after push


def _pushed(db: DB, tmp_path: Path, size: int, **kwargs: Any) -> tuple[Dataset, Path, bytes]:
    path, data = _file(tmp_path, size, ".csv")
    dataset = db.get_stream(1).push_file(str(path), **kwargs)
    return dataset.wait_for_import(timeout=IMPORT_TIMEOUT), path, data


def test_update_metadata_merges_or_overwrites(db: DB, tmp_path: Path) -> None:
    dataset, _, _ = _pushed(db, tmp_path, SIZES["server"], metadata={"rig": "r7", "run": 1})
    merged = dataset.update_metadata({"run": 2, "driver": "Kate"})
    assert merged.metadata == {"rig": "r7", "run": 2, "driver": "Kate"}
    assert db.get_dataset(dataset.id).metadata == merged.metadata  # the server kept it
    replaced = merged.update_metadata({"only": True}, overwrite=True)
    assert replaced.metadata == {"only": True}
    # The SDK's deprecated DB-level call goes to the same endpoint.
    with pytest.warns(DeprecationWarning, match="is deprecated"):
        db.update_metadata(dataset_id=dataset.id, metadata={"more": "x"})
    assert db.get_dataset(dataset.id).metadata == {"only": True, "more": "x"}
    assert db.get_datasets("inbox").where_metadata({"more": "x"}).data[0].id == dataset.id


@pytest.mark.parametrize("mode", ["server", "multipart", "azure"])
def test_download_gives_back_the_pushed_file_under_its_name(
    db: DB, tmp_path: Path, mode: str
) -> None:
    path, data = _file(tmp_path, SIZES[mode], ".csv")
    stream = db.get_stream("Vehicle Logs" if mode == "azure" else "inbox")
    pushed = stream.push_file(str(path), file_name=f"{mode}/sub dir/{path.name}")
    done = pushed.wait_for_import(timeout=IMPORT_TIMEOUT)
    target = tmp_path / "downloads"
    target.mkdir()
    got = done.download(str(target))
    assert got == target / path.name  # the file's own name, not the dataset's folders
    assert got.read_bytes() == data
    with pytest.warns(DeprecationWarning, match="is deprecated"):
        again = db.download_original(stream.id, done.id, str(tmp_path))
    assert again.name == path.name and again.read_bytes() == data


def test_delete_dataset_then_it_is_gone(db: DB, tmp_path: Path) -> None:
    dataset, path, _ = _pushed(db, tmp_path, SIZES["single"])
    db.delete_dataset(dataset.id, None)
    with pytest.raises(requests.HTTPError, match="404") as lookup:
        db.get_dataset(dataset.id)
    # The SDK raises on a 404 without reading the body; the server's reason is on the answer.
    assert lookup.value.response.json() == {"error": "dataset not found"}
    assert dataset.id not in {d.id for d in db.get_datasets()}
    with pytest.raises(requests.HTTPError, match="404") as twice:
        dataset.delete()
    assert twice.value.response.json() == {"error": f"dataset {dataset.id} not found in stream 1"}
    # The name is free again.
    assert db.get_stream(1).push_file(str(path)).id != dataset.id


def test_lake_calls_are_not_implemented_but_reingest_works(db: DB, tmp_path: Path) -> None:
    dataset, _, _ = _pushed(db, tmp_path, SIZES["server"])
    with pytest.raises(requests.HTTPError, match="501") as signals:
        dataset.get_signals()
    assert "needs a data lake" in signals.value.response.json()["error"]
    with pytest.raises(requests.HTTPError, match="501"):
        dataset.upsert_signals([{"signal": "speed", "unit": "m/s"}])
    with pytest.raises(requests.HTTPError, match="501"):
        db.get_stream(1).add_dataset("empty")
    redone = dataset.reingest(plugin_args="--again")
    assert redone.plugin_args == "--again"
    assert redone.wait_for_import(timeout=IMPORT_TIMEOUT).import_status == "FINISHED"
