"""Tests of the sandbox server itself, spoken to with raw httpx (no other inboxd code)."""

from __future__ import annotations

import argparse
import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import anyio
import httpx
import pytest

from daemon.compat import tomllib
from daemon.sandbox import (
    Faults,
    Sandbox,
    SandboxConfig,
    StreamDef,
    add_sandbox_arguments,
    build_parser_args_into_config,
    config_from_args,
    ready_message,
    running_sandbox,
)
from daemon.sandbox.backends import AzureBackend, S3Backend
from daemon.sandbox.formdata import FormDataError, FormDataParser, PartData, PartEnd, PartStart
from tests.support.emulators import azurite_server, require_azurite
from tests.support.waits import wait_for

REPO = Path(__file__).resolve().parent.parent
TOKEN = "sandbox-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Small thresholds keep every mode reachable with a few KiB of data.
SERVER_MAX = 1000
SINGLE_MAX = 4000
PART = 1024


def small_config(tmp_path: Path, **changes: Any) -> SandboxConfig:
    settings: dict[str, Any] = {
        "data_dir": tmp_path / "sandbox",
        "server_max_bytes": SERVER_MAX,
        "single_max_bytes": SINGLE_MAX,
        "part_size": PART,
        "import_seconds": 0.2,
        "faults": Faults(seed=1),
    }
    settings.update(changes)
    return SandboxConfig(**settings)


@pytest.fixture
def sb(tmp_path: Path) -> Iterator[Sandbox]:
    with running_sandbox(small_config(tmp_path)) as sandbox:
        yield sandbox


@pytest.fixture
def api(sb: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sb.url, headers=AUTH, timeout=10) as client:
        yield client


def payload(size: int) -> bytes:
    return (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]


def create(api: httpx.Client, name: str, size: int, **extra: Any) -> dict[str, Any]:
    answer = api.post(
        "/ingestion", json={"stream_id": 1, "dataset_name": name, "file_size": size, **extra}
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def put(url: str, data: bytes, **kwargs: Any) -> httpx.Response:
    # Storage requests carry no Marple headers: a fresh request, not the API client.
    return httpx.put(url, content=data, timeout=10, **kwargs)


def upload_parts(api: httpx.Client, ingestion: dict[str, Any], data: bytes) -> None:
    part_size = ingestion["part_size"]
    start: int | None = 1
    while start is not None:
        answer = api.get(
            f"/ingestion/{ingestion['ingestion_id']}/upload/part-urls",
            params={"start_part": start, "count": 2},
        )
        assert answer.status_code == 200, answer.text
        for part in answer.json()["parts"]:
            n = part["part_number"]
            chunk = data[(n - 1) * part_size : n * part_size]
            assert put(part["url"], chunk).status_code == 200
        start = answer.json()["next_part"]


def complete(api: httpx.Client, ingestion_id: int) -> httpx.Response:
    return api.post(f"/ingestion/{ingestion_id}/upload/complete")


def status_of(api: httpx.Client, dataset_id: int) -> dict[str, Any]:
    answer = api.post("/stream/1/datasets/status", json=[dataset_id])
    assert answer.status_code == 200
    (entry,) = answer.json()
    result: dict[str, Any] = entry
    return result


# ----------------------------------------------------------------------------- basics


def test_health_is_open_and_everything_else_needs_the_token(sb: Sandbox) -> None:
    assert httpx.get(f"{sb.url}/health").json() == {"status": "healthy"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        answer = httpx.get(f"{sb.url}/streams", headers=headers)
        assert answer.status_code == 403
        assert answer.json() == {"detail": "Invalid or missing token"}
    answer = httpx.post(f"{sb.url}/ingestion", json={})
    assert answer.status_code == 403


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_streams_listing(api: httpx.Client) -> None:
    before = time.time()
    streams = api.get("/streams").json()["streams"]
    assert [(s["id"], s["name"]) for s in streams] == [(1, "inbox"), (2, "Vehicle Logs")]
    first = streams[0]
    assert first["type"] == "files"
    assert first["layer_shifts"] == []
    assert first["version_id"] == 1
    assert {"description", "datapool", "created_at", "last_updated"} <= first.keys()
    # Epoch seconds, as the official SDK's DataStream model wants them (not ISO strings).
    for key in ("created_at", "last_updated"):
        assert _is_number(first[key]) and before - 60 < first[key] <= time.time(), key
    assert first["last_ingested"] is None and first["n_datasets"] == 0
    assert first["scripts"] == [] and first["hot_bytes"] == 0
    # One stream by id: the same object as in the listing.
    assert api.get("/stream/2").json() == streams[1]
    assert api.get("/stream/9").status_code == 404
    assert "error" in api.get("/stream/9").json()


def test_dataset_objects_have_the_real_fields_and_types(sb: Sandbox, api: httpx.Client) -> None:
    """Every field the official SDK's Dataset model requires, in its type, through the import."""
    data = payload(3000)  # single mode
    ing = create(api, "runs/r1.CSV", len(data), metadata={"rig": "r1"}, plugin_args="--x")
    by_id = {"id": ing["dataset_id"]}
    uploading = api.get("/datapool/default/dataset", params=by_id).json()
    assert uploading == {
        "id": ing["dataset_id"],
        "stream_id": 1,
        "datastream_id": 1,
        "datastream_version": 1,
        "datapool": "default",
        "path": "runs/r1.CSV",
        "metadata": {"rig": "r1"},
        "created_at": uploading["created_at"],
        "created_by": None,
        "import_status": "UPLOADING",
        "import_progress": None,
        "import_message": None,
        "import_time": None,
        "import_speed": None,
        "file_size": 3000,
        "cold_path": "",
        "cold_bytes": 0,
        "hot_bytes": 0,
        "backup_path": None,
        "backup_size": None,
        "plugin": "csv",
        "plugin_args": "--x",
        "n_signals": None,
        "n_datapoints": None,
        "timestamp_start": None,
        "timestamp_stop": None,
        "parquet_version": 1,
    }
    assert _is_number(uploading["created_at"])
    assert abs(uploading["created_at"] - time.time()) < 60
    assert put(ing["presigned_url"], data).status_code == 200
    assert complete(api, ing["ingestion_id"]).status_code == 200
    deadline = time.monotonic() + 30
    while status_of(api, ing["dataset_id"])["import_status"] != "FINISHED":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    done = api.get("/datapool/default/dataset", params=by_id).json()
    assert done["created_at"] == uploading["created_at"]
    assert done["import_status"] == "FINISHED" and done["import_progress"] == 100.0
    assert done["import_time"] == pytest.approx(0.2)  # small_config's import_seconds
    assert done["import_speed"] == pytest.approx(3000 / 0.2)
    assert done["backup_path"] == f"datasets/{ing['dataset_id']}" and done["backup_size"] == 3000
    assert done["cold_path"] == f"datapool=default/dataset={ing['dataset_id']}"
    assert done["cold_bytes"] == 3000
    assert (done["n_signals"], done["n_datapoints"]) == (0, 0)  # nothing is parsed
    stream = api.get("/stream/1").json()
    assert stream["n_datasets"] == 1 and stream["cold_bytes"] == 3000
    assert _is_number(stream["last_ingested"])
    assert stream["created_at"] <= stream["last_ingested"] <= time.time()
    # A failed upload never imported: no import time, no backup; no plugin_args → "".
    bad = create(api, "runs/none", 3000)
    api.post(f"/ingestion/{bad['ingestion_id']}/abort", json={"reason": "gave up"})
    failed = api.get("/datapool/default/dataset", params={"path": "runs/none"}).json()
    assert (failed["import_status"], failed["import_message"]) == ("FAILED", "gave up")
    assert failed["import_time"] is None and failed["backup_path"] is None
    assert (failed["plugin"], failed["plugin_args"]) == ("unknown", "")


def test_datapool_datasets_lists_every_stream_of_the_datapool(api: httpx.Client) -> None:
    assert api.get("/datapool/default/datasets").json() == []
    one = create(api, "a.csv", 10)
    two = api.post("/ingestion", json={"stream_id": 2, "dataset_name": "b.csv", "file_size": 5})
    listing = api.get("/datapool/default/datasets").json()
    assert [(d["id"], d["stream_id"]) for d in listing] == [
        (one["dataset_id"], 1),
        (two.json()["dataset_id"], 2),
    ]
    assert listing[0] == api.get("/stream/1/datasets").json()[0]
    assert api.get("/datapool/other/datasets").status_code == 404


def test_unknown_route_is_404_json_and_wrong_method_405(api: httpx.Client) -> None:
    answer = api.get("/no/such/route")
    assert answer.status_code == 404
    assert "error" in answer.json()
    answer = api.get("/ingestion")
    assert answer.status_code == 405
    assert "error" in answer.json()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ([], 400),
        ({"dataset_name": "a", "file_size": 1}, 400),
        ({"stream_id": "1", "dataset_name": "a", "file_size": 1}, 400),
        ({"stream_id": 1, "dataset_name": "", "file_size": 1}, 400),
        ({"stream_id": 1, "dataset_name": "/abs/a.csv", "file_size": 1}, 400),
        ({"stream_id": 1, "dataset_name": "a\x00b", "file_size": 1}, 400),
        ({"stream_id": 1, "dataset_name": "a", "file_size": 0}, 400),
        ({"stream_id": 1, "dataset_name": "a", "file_size": 256 * 1024**3 + 1}, 400),
        ({"stream_id": 1, "dataset_name": "a", "file_size": True}, 400),
        ({"stream_id": 1, "dataset_name": "a", "file_size": 1, "metadata": [1]}, 400),
        ({"stream_id": 1, "dataset_name": "a", "file_size": 1, "overwrite": "yes"}, 400),
        ({"stream_id": 99, "dataset_name": "a", "file_size": 1}, 404),
    ],
)
def test_create_ingestion_validation(api: httpx.Client, body: Any, status: int) -> None:
    answer = api.post("/ingestion", json=body)
    assert answer.status_code == status
    assert isinstance(answer.json()["error"], str)


def test_create_ingestion_rejects_invalid_json(api: httpx.Client) -> None:
    answer = api.post("/ingestion", content=b"{not json")
    assert answer.status_code == 400


def test_mode_follows_size_and_stream_override(tmp_path: Path) -> None:
    streams = [StreamDef(id=1, name="inbox"), StreamDef(id=5, name="forced", mode="server")]
    with (
        running_sandbox(small_config(tmp_path, streams=streams)) as sandbox,
        httpx.Client(base_url=sandbox.url, headers=AUTH) as api,
    ):
        modes = [create(api, f"f{size}", size)["mode"] for size in (1, 1000, 1001, 4000, 4001)]
        assert modes == ["server", "server", "single", "single", "multipart"]
        answer = api.post(
            "/ingestion", json={"stream_id": 5, "dataset_name": "x", "file_size": 10**6}
        )
        assert answer.json()["mode"] == "server"


# ------------------------------------------------------------------------- happy paths


def test_server_mode_happy_path(sb: Sandbox, api: httpx.Client) -> None:
    data = payload(700)
    ing = create(api, "runs/a.csv", len(data), metadata={"driver": "Kate"})
    assert ing["mode"] == "server"
    assert ing["presigned_url"] is None
    assert ing["part_size"] is None
    assert ing["expires_in"] == 3600
    assert sb.datasets[ing["dataset_id"]].import_status == "UPLOADING"
    answer = api.post(
        f"/ingestion/{ing['ingestion_id']}/upload/server",
        files={"file": ("a.csv", data, "text/csv")},
        data={"other": "ignored"},
    )
    assert answer.json() == {"status": "success"}
    assert complete(api, ing["ingestion_id"]).json() == {"status": "success"}
    assert sb.dataset_bytes(ing["dataset_id"]) == data
    assert sb.dataset_path(ing["dataset_id"]).read_bytes() == data
    assert sb.ingestions[ing["ingestion_id"]].state == "COMPLETED"
    dataset = api.get("/datapool/default/dataset", params={"id": ing["dataset_id"]}).json()
    assert dataset["path"] == "runs/a.csv"
    assert dataset["metadata"] == {"driver": "Kate"}
    assert dataset["stream_id"] == dataset["datastream_id"] == 1
    assert dataset["file_size"] == 700
    assert dataset["import_status"] in ("WAITING", "IMPORTING", "FINISHED")


def test_single_mode_happy_path(sb: Sandbox, api: httpx.Client) -> None:
    data = payload(3000)
    ing = create(api, "b.bin", len(data))
    assert ing["mode"] == "single"
    url = ing["presigned_url"]
    assert url.startswith(sb.url.removesuffix("/api/v1") + "/storage/")
    answer = put(url, data)
    assert answer.status_code == 200
    assert answer.headers["etag"] == f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'
    assert put(url, data).status_code == 200  # a retried PUT overwrites
    assert complete(api, ing["ingestion_id"]).json() == {"status": "success"}
    assert sb.dataset_bytes(ing["dataset_id"]) == data
    storage = [r for r in sb.requests if r.kind == "storage"]
    assert len(storage) == 2
    assert not any(r.has_authorization for r in storage)
    assert all(r.status == 200 for r in storage)


def test_multipart_happy_path(sb: Sandbox, api: httpx.Client) -> None:
    data = payload(5000)
    ing = create(api, "c.mf4", len(data))
    assert ing["mode"] == "multipart"
    assert ing["part_size"] == PART
    assert ing["presigned_url"] is None
    first = api.get(f"/ingestion/{ing['ingestion_id']}/upload/part-urls", params={"start_part": 1})
    body = first.json()
    assert [p["part_number"] for p in body["parts"]] == [1, 2, 3, 4, 5]
    assert body["next_part"] is None
    assert body["expires_in"] == 3600
    upload_parts(api, ing, data)
    assert complete(api, ing["ingestion_id"]).json() == {"status": "success"}
    assert sb.dataset_bytes(ing["dataset_id"]) == data
    # The parts are gone once assembled.
    assert not (sb.config.data_dir / "ingestions" / str(ing["ingestion_id"])).exists()


def test_part_urls_validation(tmp_path: Path) -> None:
    config = small_config(tmp_path, part_url_batch_max=3)
    with (
        running_sandbox(config) as sandbox,
        httpx.Client(base_url=sandbox.url, headers=AUTH) as api,
    ):
        ing = create(api, "m", 10 * PART)
        path = f"/ingestion/{ing['ingestion_id']}/upload/part-urls"
        assert api.get(path).status_code == 400
        for bad in ({"start_part": 0}, {"start_part": 11}, {"start_part": "x"}):
            assert api.get(path, params=bad).status_code == 400
        assert api.get(path, params={"start_part": 1, "count": 0}).status_code == 400
        capped = api.get(path, params={"start_part": 2, "count": 50}).json()
        assert [p["part_number"] for p in capped["parts"]] == [2, 3, 4]
        assert capped["next_part"] == 5
        last = api.get(path, params={"start_part": 10}).json()
        assert [p["part_number"] for p in last["parts"]] == [10]
        assert last["next_part"] is None
        single = create(api, "s", SINGLE_MAX)
        answer = api.get(f"/ingestion/{single['ingestion_id']}/upload/part-urls?start_part=1")
        assert answer.status_code == 400
        assert api.get("/ingestion/999/upload/part-urls?start_part=1").status_code == 404


def test_parts_may_arrive_in_any_order_and_be_retried(sb: Sandbox, api: httpx.Client) -> None:
    data = payload(4 * PART + 10)
    ing = create(api, "order.bin", len(data))
    parts = api.get(
        f"/ingestion/{ing['ingestion_id']}/upload/part-urls", params={"start_part": 1}
    ).json()["parts"]
    for part in reversed(parts):
        n = part["part_number"]
        assert put(part["url"], data[(n - 1) * PART : n * PART]).status_code == 200
    assert put(parts[0]["url"], b"z" * PART).status_code == 200  # overwritten ...
    assert put(parts[0]["url"], data[:PART]).status_code == 200  # ... and put right again
    assert complete(api, ing["ingestion_id"]).status_code == 200
    assert sb.dataset_bytes(ing["dataset_id"]) == data


async def test_works_from_async_tests(tmp_path: Path) -> None:
    with running_sandbox(small_config(tmp_path)) as sandbox:
        async with httpx.AsyncClient(base_url=sandbox.url, headers=AUTH) as api:
            answer = await api.post(
                "/ingestion", json={"stream_id": 2, "dataset_name": "x", "file_size": 3}
            )
            ing = answer.json()
            await api.post(
                f"/ingestion/{ing['ingestion_id']}/upload/server", files={"file": ("x", b"abc")}
            )
            assert (await api.post(f"/ingestion/{ing['ingestion_id']}/upload/complete")).json() == {
                "status": "success"
            }
        assert sandbox.dataset_bytes(ing["dataset_id"]) == b"abc"


# ----------------------------------------------------------------------- conflicts, sizes


def test_duplicate_name_conflicts_and_overwrite_keeps_the_id(
    sb: Sandbox, api: httpx.Client
) -> None:
    first = create(api, "dup.csv", 10)
    api.post(f"/ingestion/{first['ingestion_id']}/upload/server", files={"file": ("d", b"0" * 10)})
    assert complete(api, first["ingestion_id"]).status_code == 200
    answer = api.post(
        "/ingestion", json={"stream_id": 1, "dataset_name": "dup.csv", "file_size": 5}
    )
    assert answer.status_code == 409
    assert "already exists" in answer.json()["error"]
    # Same name in another stream is a different dataset.
    other = api.post("/ingestion", json={"stream_id": 2, "dataset_name": "dup.csv", "file_size": 5})
    assert other.status_code == 200
    assert other.json()["dataset_id"] != first["dataset_id"]

    second = create(api, "dup.csv", 2000, overwrite=True, metadata={"v": 2})
    assert second["dataset_id"] == first["dataset_id"]
    assert second["ingestion_id"] != first["ingestion_id"]
    dataset = sb.datasets[first["dataset_id"]]
    assert dataset.import_status == "UPLOADING"
    assert dataset.metadata == {"v": 2}

    # Overwriting again supersedes the open ingestion: its URL and complete are refused.
    third = create(api, "dup.csv", 2000, overwrite=True)
    assert sb.ingestions[second["ingestion_id"]].state == "SUPERSEDED"
    refused = put(second["presigned_url"], payload(2000))
    assert refused.status_code == 403
    assert "<Code>AccessDenied</Code>" in refused.text
    assert complete(api, second["ingestion_id"]).status_code == 409
    assert put(third["presigned_url"], payload(2000)).status_code == 200
    assert complete(api, third["ingestion_id"]).status_code == 200
    assert sb.dataset_bytes(first["dataset_id"]) == payload(2000)


def test_size_mismatch_fails_the_ingestion(sb: Sandbox, api: httpx.Client) -> None:
    ing = create(api, "short.bin", 3000)
    assert put(ing["presigned_url"], payload(2999)).status_code == 200
    answer = complete(api, ing["ingestion_id"])
    assert answer.status_code == 400
    assert answer.json() == {"error": "size mismatch: expected 3000 bytes, got 2999"}
    assert sb.ingestions[ing["ingestion_id"]].state == "FAILED"
    status = status_of(api, ing["dataset_id"])
    assert status["import_status"] == "FAILED"
    assert "size mismatch" in status["import_message"]
    again = complete(api, ing["ingestion_id"])
    assert again.status_code == 409
    assert again.json() == {"error": "ingestion is not in UPLOADING state (state: FAILED)"}


def test_multipart_with_a_missing_part_is_a_size_mismatch(sb: Sandbox, api: httpx.Client) -> None:
    data = payload(5 * PART)
    ing = create(api, "gap.bin", len(data))
    parts = api.get(
        f"/ingestion/{ing['ingestion_id']}/upload/part-urls", params={"start_part": 1}
    ).json()["parts"]
    put(parts[0]["url"], data[:PART])
    put(parts[2]["url"], data[2 * PART : 3 * PART])
    answer = complete(api, ing["ingestion_id"])
    assert answer.status_code == 400
    assert answer.json()["error"].startswith(
        f"size mismatch: expected {5 * PART} bytes, got {2 * PART}"
    )


def test_complete_without_any_upload_is_a_size_mismatch(api: httpx.Client) -> None:
    ing = create(api, "nothing.bin", 10)
    answer = complete(api, ing["ingestion_id"])
    assert answer.status_code == 400
    assert answer.json() == {"error": "size mismatch: expected 10 bytes, got 0"}
    assert complete(api, 12345).status_code == 404


# --------------------------------------------------------------------- storage strictness


def test_expired_url_answers_like_s3(tmp_path: Path) -> None:
    with running_sandbox(small_config(tmp_path, url_ttl=0.05)) as sandbox:
        with httpx.Client(base_url=sandbox.url, headers=AUTH) as api:
            ing = create(api, "late.bin", 2000)
        assert ing["expires_in"] == 0.05
        time.sleep(0.1)
        answer = put(ing["presigned_url"], payload(2000))
        assert answer.status_code == 403
        assert answer.headers["content-type"].startswith("application/xml")
        assert (
            "<Error><Code>AccessDenied</Code><Message>Request has expired</Message>" in answer.text
        )


def test_tampered_or_unsigned_url_is_refused(sb: Sandbox, api: httpx.Client) -> None:
    ing = create(api, "sig.bin", 2000)
    url: str = ing["presigned_url"]
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    answer = put(tampered, payload(2000))
    assert answer.status_code == 403
    assert "<Code>SignatureDoesNotMatch</Code>" in answer.text
    answer = put(url.split("?")[0], payload(2000))
    assert answer.status_code == 403
    assert "<Code>AccessDenied</Code>" in answer.text


def test_authorization_header_on_storage_is_rejected(sb: Sandbox, api: httpx.Client) -> None:
    ing = create(api, "auth.bin", 2000)
    answer = put(ing["presigned_url"], payload(2000), headers=AUTH)
    assert answer.status_code == 400
    assert "<Code>InvalidArgument</Code><Message>Only one auth mechanism allowed" in answer.text
    assert sb.requests[-1].has_authorization
    assert sb.requests[-1].authorization == f"Bearer {TOKEN}"


def test_storage_put_needs_content_length(api: httpx.Client) -> None:
    ing = create(api, "chunked.bin", 2000)

    def body() -> Iterator[bytes]:
        yield payload(2000)

    answer = httpx.put(ing["presigned_url"], content=body())
    assert answer.status_code == 411
    assert "<Code>MissingContentLength</Code>" in answer.text


def test_cut_off_upload_leaves_no_partial_part(sb: Sandbox, api: httpx.Client) -> None:
    ing = create(api, "cut.bin", 3000)
    url = httpx.URL(ing["presigned_url"])
    part_dir = sb.config.data_dir / "ingestions" / str(ing["ingestion_id"])
    with socket.create_connection((url.host, url.port)) as raw:
        target = url.raw_path.decode()
        raw.sendall(
            f"PUT {target} HTTP/1.1\r\nHost: {url.host}\r\nContent-Length: 3000\r\n\r\n".encode()
            + b"x" * 1500
        )
        deadline = time.monotonic() + 2
        while not any(part_dir.glob("object.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 2
    while any(part_dir.glob("object*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(part_dir.glob("object*"))
    assert complete(api, ing["ingestion_id"]).json()["error"].endswith("got 0")


# ---------------------------------------------------------------------- server upload path


def test_server_upload_errors_and_fallback(sb: Sandbox, api: httpx.Client) -> None:
    data = payload(2500)
    ing = create(api, "fallback.bin", len(data))
    path = f"/ingestion/{ing['ingestion_id']}/upload/server"
    assert api.post(path, files={"other": ("x", b"1")}).status_code == 400
    assert api.post(path, content=b"raw", headers={"Content-Type": "text/plain"}).status_code == 400
    # The direct upload went wrong (a short body); the server upload replaces it.
    put(ing["presigned_url"], data[:100])
    assert api.post(path, files={"file": ("f", data)}).json() == {"status": "success"}
    assert complete(api, ing["ingestion_id"]).status_code == 200
    assert sb.dataset_bytes(ing["dataset_id"]) == data
    late = api.post(path, files={"file": ("f", data)})
    assert late.status_code == 409
    assert late.json() == {"error": "ingestion is not in UPLOADING state (state: COMPLETED)"}


def test_form_data_parser_handles_any_chunking() -> None:
    boundary = b"XyZ"
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
        b"line1\r\n--Xy not a boundary\r\nand --XyZ inline\r\n--XyZ--\r\n"
    )
    for size in (1, 2, 3, 7, len(body)):
        parser = FormDataParser(boundary)
        events = []
        for i in range(0, len(body), size):
            events.extend(parser.feed(body[i : i + size]))
        parser.close()
        starts = [e for e in events if isinstance(e, PartStart)]
        assert [(s.name, s.filename) for s in starts] == [("a", None), ("file", "f.bin")]
        data = b"".join(e.data for e in events if isinstance(e, PartData))
        assert data == b"value" + b"line1\r\n--Xy not a boundary\r\nand --XyZ inline"
        assert sum(isinstance(e, PartEnd) for e in events) == 2
    parser = FormDataParser(boundary)
    parser.feed(body[:40])
    with pytest.raises(FormDataError):
        parser.close()


# ------------------------------------------------------------------------ abort and import


def test_abort_records_the_reason_and_is_idempotent(sb: Sandbox, api: httpx.Client) -> None:
    ing = create(api, "abort.bin", 2000)
    answer = api.post(f"/ingestion/{ing['ingestion_id']}/abort", json={"reason": "disk on fire"})
    assert answer.json() == {"status": "success"}
    assert sb.ingestions[ing["ingestion_id"]].state == "ABORTED"
    assert sb.ingestions[ing["ingestion_id"]].abort_reason == "disk on fire"
    status = status_of(api, ing["dataset_id"])
    assert (status["import_status"], status["import_message"]) == ("FAILED", "disk on fire")
    assert api.post(f"/ingestion/{ing['ingestion_id']}/abort").json() == {"status": "success"}
    assert put(ing["presigned_url"], payload(2000)).status_code == 403
    assert complete(api, ing["ingestion_id"]).status_code == 409

    other = create(api, "abort2.bin", 5)
    assert api.post(f"/ingestion/{other['ingestion_id']}/abort").status_code == 200
    assert sb.datasets[other["dataset_id"]].import_message == "Unknown reason"

    done = create(api, "done.bin", 3)
    api.post(f"/ingestion/{done['ingestion_id']}/upload/server", files={"file": ("f", b"abc")})
    complete(api, done["ingestion_id"])
    assert api.post(f"/ingestion/{done['ingestion_id']}/abort").status_code == 409


def test_import_timeline_reaches_finished(sb: Sandbox, api: httpx.Client) -> None:
    ing = create(api, "import.csv", 3)
    api.post(f"/ingestion/{ing['ingestion_id']}/upload/server", files={"file": ("f", b"abc")})
    assert status_of(api, ing["dataset_id"])["import_status"] == "UPLOADING"
    complete(api, ing["ingestion_id"])
    seen: list[str] = []
    progress: list[float] = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        status = status_of(api, ing["dataset_id"])
        seen.append(status["import_status"])
        progress.append(status["import_progress"])
        if status["import_status"] == "FINISHED":
            break
        time.sleep(0.005)
    assert seen[-1] == "FINISHED"
    assert progress[-1] == 100.0
    assert "IMPORTING" in seen
    assert set(seen) <= {"WAITING", "IMPORTING", "FINISHED"}
    assert progress == sorted(progress)


def test_fail_import_glob(tmp_path: Path) -> None:
    config = small_config(tmp_path, import_seconds=0.0, faults=Faults(fail_import_glob="*.bad"))
    with (
        running_sandbox(config) as sandbox,
        httpx.Client(base_url=sandbox.url, headers=AUTH) as api,
    ):
        for name in ("x.bad", "x.good"):
            ing = create(api, name, 1)
            api.post(f"/ingestion/{ing['ingestion_id']}/upload/server", files={"file": ("f", b"1")})
            complete(api, ing["ingestion_id"])
        statuses = api.post("/stream/1/datasets/status", json=[1, 2, 77]).json()
        assert [(s["dataset_id"], s["import_status"]) for s in statuses] == [
            (1, "FAILED"),
            (2, "FINISHED"),
        ]
        assert "x.bad" in statuses[0]["import_message"]


def test_dataset_status_and_lookups(sb: Sandbox, api: httpx.Client) -> None:
    ing = create(api, "dir/look.csv", 5)
    assert api.post("/stream/1/datasets/status", json={"ids": [1]}).status_code == 400
    assert api.post("/stream/1/datasets/status", json=[True]).status_code == 400
    assert api.post("/stream/9/datasets/status", json=[1]).status_code == 404
    assert api.post("/stream/2/datasets/status", json=[ing["dataset_id"]]).json() == []
    by_path = api.get("/datapool/default/dataset", params={"path": "dir/look.csv"}).json()
    assert by_path["id"] == ing["dataset_id"]
    assert by_path["import_status"] == "UPLOADING"
    assert api.get("/datapool/default/dataset", params={"path": "nope"}).status_code == 404
    assert api.get("/datapool/other/dataset", params={"id": 1}).status_code == 404
    assert api.get("/datapool/default/dataset").status_code == 400
    listing = api.get("/stream/1/datasets").json()
    assert [d["path"] for d in listing] == ["dir/look.csv"]
    assert api.get("/stream/2/datasets").json() == []


# ---------------------------------------------------------------------------------- faults


def test_api_503_and_429_with_retry_after(sb: Sandbox, api: httpx.Client) -> None:
    sb.faults.api_503_rate = 1.0
    sb.faults.retry_after = 2
    answer = api.get("/streams")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "2"
    assert "error" in answer.json()
    assert httpx.get(f"{sb.url}/health").status_code == 200  # health is never faulted
    sb.faults.api_503_rate = 0.0
    sb.faults.api_429_rate = 1.0
    sb.faults.retry_after = 0.25
    answer = api.post("/ingestion", json={"stream_id": 1, "dataset_name": "r", "file_size": 1})
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "0.25"
    assert sb.datasets == {}  # answered before doing anything
    sb.faults.api_429_rate = 0.0
    assert api.get("/streams").status_code == 200


def test_dropped_response_still_creates_the_dataset(sb: Sandbox, api: httpx.Client) -> None:
    sb.faults.drop_response_rate = 1.0
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        api.post("/ingestion", json={"stream_id": 1, "dataset_name": "lost", "file_size": 5})
    sb.faults.drop_response_rate = 0.0
    assert [d.name for d in sb.datasets.values()] == ["lost"]
    record = next(r for r in sb.requests if r.route == "POST /ingestion")
    assert record.dropped
    assert record.status == 200
    # A naive retry now collides with the dataset the lost response created.
    answer = api.post("/ingestion", json={"stream_id": 1, "dataset_name": "lost", "file_size": 5})
    assert answer.status_code == 409


def test_fail_next_scripts_exact_api_failures(sb: Sandbox, api: httpx.Client) -> None:
    ing = create(api, "script.bin", 3)
    api.post(f"/ingestion/{ing['ingestion_id']}/upload/server", files={"file": ("f", b"abc")})
    sb.faults.fail_next["POST /ingestion/{id}/upload/complete"] = [503, 0]
    assert complete(api, ing["ingestion_id"]).status_code == 503
    assert sb.ingestions[ing["ingestion_id"]].state == "UPLOADING"
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        complete(api, ing["ingestion_id"])
    assert sb.ingestions[ing["ingestion_id"]].state == "COMPLETED"
    third = complete(api, ing["ingestion_id"])
    assert third.status_code == 409
    assert "state: COMPLETED" in third.json()["error"]
    assert sb.faults.fail_next["POST /ingestion/{id}/upload/complete"] == []
    # A concrete path works as a key too.
    sb.faults.fail_next["GET /streams"] = [502]
    assert api.get("/streams").status_code == 502
    assert api.get("/streams").status_code == 200


def test_fail_next_and_faults_on_storage(sb: Sandbox, api: httpx.Client) -> None:
    data = payload(2000)
    ing = create(api, "store.bin", len(data))
    url = ing["presigned_url"]
    sb.faults.fail_next["PUT storage"] = [500, 503, 0]
    first = put(url, data)
    assert first.status_code == 500
    assert "<Code>InternalError</Code>" in first.text
    second = put(url, data)
    assert second.status_code == 503
    assert "<Code>SlowDown</Code>" in second.text
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        put(url, data)  # stored, but the answer is lost
    assert complete(api, ing["ingestion_id"]).status_code == 200
    assert sb.dataset_bytes(ing["dataset_id"]) == data

    other = create(api, "store2.bin", len(data))
    sb.faults.storage_fail_always = True
    assert put(other["presigned_url"], data).status_code == 500
    sb.faults.storage_fail_always = False
    sb.faults.storage_503_rate = 1.0
    assert put(other["presigned_url"], data).status_code == 503
    sb.faults.storage_503_rate = 0.0
    sb.faults.storage_delay_per_mib = 0.2 * 1024 * 1024 / len(data)  # 0.2 s for this body
    started = time.monotonic()
    assert put(other["presigned_url"], data).status_code == 200
    assert time.monotonic() - started >= 0.18


def test_request_log(sb: Sandbox, api: httpx.Client) -> None:
    api.get("/streams", params={"x": "1"})
    record = sb.requests[-1]
    assert (record.method, record.path, record.query) == ("GET", "/api/v1/streams", "x=1")
    assert record.kind == "api"
    assert record.status == 200
    assert record.has_authorization
    assert record.route == "GET /streams"


# ------------------------------------------------------------------------------- CLI glue


def test_cli_retry_after_is_whole_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """HTTP's Retry-After has no fractions (urllib3, under the official SDK, refuses them)."""
    from urllib3.util.retry import Retry

    parser = argparse.ArgumentParser()
    add_sandbox_arguments(parser)
    for bad in ("0.5", "1e3", "-1", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--retry-after", bad])
        assert "whole seconds" in capsys.readouterr().err
    args = ["--port", "0", "--data-dir", str(tmp_path), "--token", TOKEN]
    config = config_from_args(
        parser.parse_args([*args, "--retry-after", "1", "--api-429-rate", "1"])
    )
    with running_sandbox(config) as sandbox:
        answer = httpx.get(f"{sandbox.url}/streams", headers=AUTH)
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "1"
    assert Retry().parse_retry_after(answer.headers["retry-after"]) == 1


def test_cli_arguments_and_ready_message(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_sandbox_arguments(parser)
    ns = parser.parse_args(
        [
            "--port", "0", "--data-dir", str(tmp_path), "--token", "T", "--part-size", "2048",
            "--url-ttl", "60", "--api-503-rate", "0.1", "--retry-after", "2",
            "--fail-import-glob", "*.x", "--stream-mode", "2=single", "--seed", "7",
        ]
    )  # fmt: skip
    config = config_from_args(ns)
    assert config.token == "T"
    assert config.part_size == 2048
    assert config.url_ttl == 60
    assert config.faults.api_503_rate == 0.1
    assert config.faults.retry_after == 2
    assert config.faults.fail_import_glob == "*.x"
    assert [s.mode for s in config.streams] == [None, "single"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--stream-mode", "2=bogus"])
    with pytest.raises(ValueError, match="no stream"):
        config_from_args(parser.parse_args(["--stream-mode", "9=server", "--data-dir", "."]))
    config = build_parser_args_into_config(["--port", "0", "--data-dir", str(tmp_path)])
    with running_sandbox(config) as sandbox:
        snippet = tomllib.loads(ready_message(sandbox))
        assert snippet == {"api": {"url": sandbox.url, "token": TOKEN}, "upload": {"stream": 1}}
        assert httpx.get(f"{snippet['api']['url']}/health").status_code == 200


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"storage": "s3"}, "s3_endpoint"),
        ({"storage": "discard"}, "discard_url"),
        ({"storage": "ftp"}, "storage must be"),
        ({"streams": [StreamDef(id=1, name="a", mode="azure")]}, "azure_account_url"),
        ({"streams": [StreamDef(id=1, name="a"), StreamDef(id=1, name="b")]}, "unique"),
    ],
)
def test_invalid_configs_are_refused(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sandbox(small_config(tmp_path, **changes))


def test_discard_storage_skips_checks(tmp_path: Path) -> None:
    config = small_config(tmp_path, storage="discard", discard_url="http://127.0.0.1:9/sink/")
    with (
        running_sandbox(config) as sandbox,
        httpx.Client(base_url=sandbox.url, headers=AUTH) as api,
    ):
        single = create(api, "d1", 2000)
        assert single["presigned_url"] == f"http://127.0.0.1:9/sink/{single['ingestion_id']}/object"
        multi = create(api, "d2", 5 * PART)
        urls = api.get(
            f"/ingestion/{multi['ingestion_id']}/upload/part-urls", params={"start_part": 1}
        ).json()["parts"]
        assert urls[2]["url"] == f"http://127.0.0.1:9/sink/{multi['ingestion_id']}/part/3"
        assert complete(api, multi["ingestion_id"]).json() == {"status": "success"}
        with pytest.raises(LookupError):
            sandbox.dataset_bytes(multi["dataset_id"])


# ------------------------------------------------------------------------------ emulators


# ------------------------------------------------------------- dataset operations (SDK)


def _uploaded(api: httpx.Client, name: str, data: bytes, **extra: Any) -> int:
    """A dataset whose server-mode upload completed; its id."""
    ing = create(api, name, len(data), **extra)
    answer = api.post(
        f"/ingestion/{ing['ingestion_id']}/upload/server", files={"file": (name, data)}
    )
    assert answer.status_code == 200, answer.text
    assert complete(api, ing["ingestion_id"]).status_code == 200
    dataset_id: int = ing["dataset_id"]
    return dataset_id


def test_update_metadata_replaces_it_and_checks_the_body(sb: Sandbox, api: httpx.Client) -> None:
    dataset_id = _uploaded(api, "meta.csv", payload(100), metadata={"a": 1})
    url = f"/stream/1/dataset/{dataset_id}/metadata"
    assert api.post(url, json={"b": [1, "x"], "c": None}).json() == {"status": "success"}
    shown = api.get("/datapool/default/dataset", params={"id": dataset_id}).json()
    assert shown["metadata"] == {"b": [1, "x"], "c": None}  # replaced, not merged
    for body in (b"[1, 2]", b'"text"', b"3", b"null"):
        answer = api.post(url, content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400
        assert answer.json() == {"error": "metadata must be a JSON object"}
    answer = api.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "invalid JSON body" in answer.json()["error"]
    assert sb.datasets[dataset_id].metadata == {"b": [1, "x"], "c": None}  # refusals kept it
    # An unknown dataset, a dataset of another stream, an unknown stream: all 404.
    assert api.post("/stream/1/dataset/999/metadata", json={}).json() == {
        "error": "dataset 999 not found in stream 1"
    }
    assert api.post(f"/stream/2/dataset/{dataset_id}/metadata", json={}).status_code == 404
    assert api.post(f"/stream/9/dataset/{dataset_id}/metadata", json={}).json() == {
        "error": "stream 9 not found"
    }


def test_delete_removes_the_dataset_and_its_bytes(sb: Sandbox, api: httpx.Client) -> None:
    dataset_id = _uploaded(api, "gone/del.csv", payload(300))
    stored = sb.dataset_path(dataset_id)
    assert stored.exists()
    assert api.post(f"/stream/2/dataset/{dataset_id}/delete").status_code == 404  # foreign
    assert api.post(f"/stream/1/dataset/{dataset_id}/delete").json() == {"status": "success"}
    assert not stored.exists()
    assert dataset_id not in sb.datasets
    lookup = api.get("/datapool/default/dataset", params={"id": dataset_id})
    assert lookup.status_code == 404
    assert api.get("/datapool/default/dataset", params={"path": "gone/del.csv"}).status_code == 404
    assert dataset_id not in [d["id"] for d in api.get("/stream/1/datasets").json()]
    assert dataset_id not in [d["id"] for d in api.get("/datapool/default/datasets").json()]
    assert api.post("/stream/1/datasets/status", json=[dataset_id]).json() == []
    again = api.post(f"/stream/1/dataset/{dataset_id}/delete")
    assert again.status_code == 404
    assert again.json() == {"error": f"dataset {dataset_id} not found in stream 1"}
    # The name is free again: a new upload makes a new dataset.
    assert _uploaded(api, "gone/del.csv", payload(10)) != dataset_id


def test_delete_aborts_an_upload_still_running_into_the_dataset(
    sb: Sandbox, api: httpx.Client
) -> None:
    ing = create(api, "half.bin", 2000)  # single mode: a presigned PUT
    assert put(ing["presigned_url"], payload(2000)).status_code == 200
    answer = api.post(f"/stream/1/dataset/{ing['dataset_id']}/delete")
    assert answer.json() == {"status": "success"}
    ingestion = sb.ingestions[ing["ingestion_id"]]
    assert (ingestion.state, ingestion.abort_reason) == ("ABORTED", "the dataset was deleted")
    assert not (sb.config.data_dir / "ingestions" / str(ingestion.id)).exists()
    refused = complete(api, ing["ingestion_id"])
    assert refused.status_code == 409 and "ABORTED" in refused.json()["error"]
    assert put(ing["presigned_url"], payload(2000)).status_code == 403


def test_backup_url_serves_the_original_named_after_the_file(
    sb: Sandbox, api: httpx.Client
) -> None:
    data = payload(4 * PART + 5)  # multipart: the file is assembled from its parts
    ing = create(api, "runs/day 1/log #2.csv", len(data))
    upload_parts(api, ing, data)
    url = f"/stream/1/dataset/{ing['dataset_id']}/backup"
    assert api.get(f"/stream/2/dataset/{ing['dataset_id']}/backup").status_code == 404
    early = api.get(url)  # uploaded, but not completed yet
    assert early.status_code == 409
    assert "its upload did not complete (status UPLOADING)" in early.json()["error"]
    assert complete(api, ing["ingestion_id"]).status_code == 200

    link: str = api.get(url).json()["path"]
    parts = urlsplit(link)
    assert link.startswith(sb.origin + "/")
    # The SDK's own derivation of the local file name, percent-encoded as in the URL.
    assert parts.path.rsplit("/")[1] == quote("log #2.csv", safe="")
    fetched = httpx.get(link)  # no token, as urllib's urlretrieve sends none
    assert fetched.status_code == 200 and fetched.content == data
    assert fetched.headers["content-length"] == str(len(data))
    assert fetched.headers["content-disposition"].endswith(quote("log #2.csv", safe=""))
    assert sb.requests[-1].kind == "storage"  # no Marple token checked, no API faults

    query = parse_qs(parts.query)
    forged = f"{sb.origin}{parts.path}?exp={query['exp'][0]}&sig={'0' * 64}"
    refused = httpx.get(forged)
    assert refused.status_code == 403 and "<Code>SignatureDoesNotMatch</Code>" in refused.text
    assert httpx.get(f"{sb.origin}{parts.path}").status_code == 403  # unsigned
    other = _uploaded(api, "other.csv", payload(50))  # a valid signature is for one dataset
    moved = link.replace(f"/backup/{ing['dataset_id']}?", f"/backup/{other}?")
    assert httpx.get(moved).status_code == 403


def test_backup_url_expires_and_dies_with_the_dataset(tmp_path: Path) -> None:
    with (
        running_sandbox(small_config(tmp_path, url_ttl=60)) as sandbox,
        httpx.Client(base_url=sandbox.url, headers=AUTH) as api,
    ):
        dataset_id = _uploaded(api, "ttl.csv", payload(100))
        link: str = api.get(f"/stream/1/dataset/{dataset_id}/backup").json()["path"]
        assert httpx.get(link).status_code == 200
        # A short life only for the link that must expire: a loaded machine can take longer
        # than that between two requests.
        sandbox.config.url_ttl = 0.3
        link = api.get(f"/stream/1/dataset/{dataset_id}/backup").json()["path"]
        sandbox.config.url_ttl = 60
        deadline = time.monotonic() + 30
        while (answer := httpx.get(link)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answer.status_code == 403
        assert "<Message>Request has expired</Message>" in answer.text

        fresh = api.get(f"/stream/1/dataset/{dataset_id}/backup").json()["path"]
        assert api.post(f"/stream/1/dataset/{dataset_id}/delete").status_code == 200
        assert api.get(f"/stream/1/dataset/{dataset_id}/backup").status_code == 404
        gone = httpx.get(fresh)  # signed and unexpired, but the file is deleted
        assert gone.status_code == 404 and "<Code>NoSuchKey</Code>" in gone.text


def test_a_failed_upload_has_no_backup(api: httpx.Client) -> None:
    ing = create(api, "short.csv", 500)
    api.post(f"/ingestion/{ing['ingestion_id']}/upload/server", files={"file": ("s", b"x")})
    assert complete(api, ing["ingestion_id"]).status_code == 400
    answer = api.get(f"/stream/1/dataset/{ing['dataset_id']}/backup")
    assert answer.status_code == 409
    assert "did not complete (status FAILED)" in answer.json()["error"]


def test_reingest_runs_the_import_again(sb: Sandbox, api: httpx.Client) -> None:
    dataset_id = _uploaded(api, "again.csv", payload(100))
    url = f"/stream/1/dataset/{dataset_id}/reingest"
    assert api.post(url).status_code == 409  # the first import still runs
    wait_for(lambda: sb.datasets[dataset_id].import_status == "FINISHED", 30, "import")
    assert api.post(url, json={"plugin_args": "--fast"}).json() == {"status": "success"}
    assert sb.datasets[dataset_id].import_status in ("WAITING", "IMPORTING")
    assert sb.datasets[dataset_id].plugin_args == "--fast"
    assert api.post(url, json={"plugin_args": 3}).status_code == 400
    pending = create(api, "pending.csv", 100)
    answer = api.post(f"/stream/1/dataset/{pending['dataset_id']}/reingest")
    assert answer.status_code == 409 and "no original file" in answer.json()["error"]


def test_lake_operations_answer_501_after_the_404s(api: httpx.Client) -> None:
    dataset_id = _uploaded(api, "lake.csv", payload(100))
    one = f"/stream/1/dataset/{dataset_id}"
    calls = [
        ("GET", f"{one}/signals"),
        ("POST", f"{one}/signals"),
        ("GET", f"{one}/signal/4"),
        ("POST", f"{one}/append"),
        ("POST", f"{one}/cool"),
        ("POST", "/stream/1/dataset/add"),
        ("GET", "/datapool/default/signal_map"),
    ]
    for method, path in calls:
        answer = api.request(method, path)
        assert answer.status_code == 501, (method, path)
        assert "needs a data lake" in answer.json()["error"]
    assert api.get("/stream/1/dataset/999/signals").status_code == 404
    assert api.get("/datapool/nowhere/signal_map").status_code == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # moto's 5 MiB minimum part size, lowered so tests can use KiB-sized parts.
        mp.setenv("S3_UPLOAD_PART_MIN_SIZE", "1024")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.mark.emulator
def test_s3_single_and_multipart_with_moto(tmp_path: Path, moto_endpoint: str) -> None:
    config = small_config(tmp_path, storage="s3", s3_endpoint=moto_endpoint)
    with (
        running_sandbox(config) as sandbox,
        httpx.Client(base_url=sandbox.url, headers=AUTH) as api,
    ):
        single_data = payload(3000)
        single = create(api, "s3/single.bin", len(single_data))
        assert single["presigned_url"].startswith(moto_endpoint)
        assert put(single["presigned_url"], single_data).status_code == 200
        assert complete(api, single["ingestion_id"]).status_code == 200
        assert sandbox.dataset_bytes(single["dataset_id"]) == single_data

        data = payload(5 * PART + 100)
        multi = create(api, "s3/multi.bin", len(data))
        upload_parts(api, multi, data)
        assert complete(api, multi["ingestion_id"]).json() == {"status": "success"}
        assert sandbox.dataset_bytes(multi["dataset_id"]) == data

        # The original comes back relayed from S3 through the sandbox; a delete removes it.
        one = f"/stream/1/dataset/{multi['dataset_id']}"
        link = api.get(f"{one}/backup").json()["path"]
        assert urlsplit(link).path.rsplit("/")[1] == "multi.bin"
        fetched = httpx.get(link)
        assert fetched.status_code == 200 and fetched.content == data
        assert api.post(f"{one}/delete").json() == {"status": "success"}
        key = f"ingestions/{multi['ingestion_id']}/object"
        assert S3Backend(moto_endpoint, config.s3_bucket).object_size(key) is None


@pytest.mark.emulator
def test_s3_size_mismatch_and_abort_with_moto(tmp_path: Path, moto_endpoint: str) -> None:
    config = small_config(tmp_path, storage="s3", s3_endpoint=moto_endpoint)
    with (
        running_sandbox(config) as sandbox,
        httpx.Client(base_url=sandbox.url, headers=AUTH) as api,
    ):
        data = payload(5 * PART)
        short = create(api, "s3/short.bin", 5 * PART)
        upload_parts(api, short, data[: 2 * PART])
        answer = complete(api, short["ingestion_id"])
        assert answer.status_code == 400
        assert answer.json()["error"].startswith(f"size mismatch: expected {5 * PART} bytes")
        assert sandbox.ingestions[short["ingestion_id"]].state == "FAILED"

        aborted = create(api, "s3/abort.bin", 5 * PART)
        assert api.post(f"/ingestion/{aborted['ingestion_id']}/abort").status_code == 200
        assert sandbox.datasets[aborted["dataset_id"]].import_status == "FAILED"


@pytest.fixture(scope="module")
def azurite_url() -> Iterator[str]:
    """Azurite's account URL (skipped locally when not installed, failed in CI)."""
    with azurite_server(require_azurite()) as server:
        yield server.account_url


@pytest.mark.emulator
def test_azure_mode_with_azurite(tmp_path: Path, azurite_url: str) -> None:
    streams = [StreamDef(id=1, name="inbox", mode="azure")]
    config = small_config(tmp_path, streams=streams, azure_account_url=azurite_url)
    with (
        running_sandbox(config) as sandbox,
        httpx.Client(base_url=sandbox.url, headers=AUTH) as api,
    ):
        data = payload(5000)
        ing = create(api, "az dir/blob #1.bin", len(data))
        assert ing["mode"] == "azure"
        url = ing["presigned_url"]
        assert "sv=2025-01-05" in url
        assert "sp=cw" in url
        answer = put(url, data, headers={"x-ms-blob-type": "BlockBlob"})
        assert answer.status_code == 201, answer.text
        assert complete(api, ing["ingestion_id"]).json() == {"status": "success"}
        assert sandbox.dataset_bytes(ing["dataset_id"]) == data

        empty = create(api, "az/empty.bin", 10)
        answer = complete(api, empty["ingestion_id"])
        assert answer.json() == {"error": "size mismatch: expected 10 bytes, got 0"}

        # The SAS is really checked: a tampered signature is refused by Azurite.
        other = create(api, "az/other.bin", 10)
        bad = other["presigned_url"].replace("sp=cw", "sp=rcw")
        refused = put(bad, b"0123456789", headers={"x-ms-blob-type": "BlockBlob"})
        assert refused.status_code == 403

        # The original comes back through the sandbox, and a delete removes the blob.
        one = f"/stream/1/dataset/{ing['dataset_id']}"
        link = api.get(f"{one}/backup").json()["path"]
        assert urlsplit(link).path.rsplit("/")[1] == quote("blob #1.bin", safe="")
        assert httpx.get(link).content == data
        blob = sandbox.datasets[ing["dataset_id"]].backup_path
        assert blob == f"azure:{ing['ingestion_id']}/az dir/blob #1.bin"
        assert api.post(f"{one}/delete").json() == {"status": "success"}
        azure = AzureBackend(
            azurite_url, config.azure_account_name, config.azure_account_key, config.azure_container
        )
        assert anyio.run(azure.blob_size, blob.removeprefix("azure:")) is None
