"""The sandbox itself: a strict, local Marple-DB-compatible API plus its own signed storage.

`Sandbox` is an ASGI application. The outer `__call__` records every request, injects the
configured faults and checks the token; the routes below it implement the upload contract of
docs/marple-db-contract.md and the dataset operations the official SDK calls after a push
(metadata, delete, backup download, reingest; 501 for what needs a data lake: docs/sandbox.md).
State lives in memory (plus files under `data_dir`) and is meant to be inspected by tests:
`sandbox.datasets`, `sandbox.ingestions`, `sandbox.requests`.

The server runs on its own event loop thread (see `server.py`) while tests read the state from
theirs; every mutation is a plain attribute or dict assignment (or a delete's dict pop), which
the GIL keeps atomic.

Why one module: the Marple DB API's routes as one server, read against the contract route by
route; the faults, route keys and answers shared with the other two APIs are in common.py.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import anyio.to_thread
import httpx
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from daemon.net.clients import build_client
from daemon.sandbox import files
from daemon.sandbox.backends import AzureBackend, S3Backend, StorageError
from daemon.sandbox.common import (
    ERROR_HANDLERS,
    FaultGate,
    RouteKeys,
    SandboxError,
    drain,
    is_int,
    read_json,
    recorded,
    route_key,
    storage_delay,
)
from daemon.sandbox.config import Faults, GiB, MiB, SandboxConfig, StreamDef
from daemon.sandbox.dataservice import PREFIX as DATA_SERVICE_PREFIX
from daemon.sandbox.dataservice import DataService
from daemon.sandbox.formdata import (
    FormDataError,
    FormDataParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_from_content_type,
)
from daemon.sandbox.injection import Control, install_log_filter, s3_error, storage_fault
from daemon.sandbox.legacy import LegacyApi
from daemon.sandbox.models import (
    ABORTED,
    COMPLETED,
    FAILED,
    SUPERSEDED,
    UPLOADING,
    Dataset,
    Ingestion,
    RequestRecord,
    iso8601,
)
from daemon.sandbox.signing import UrlSigner

API_PREFIX = "/api/v1"
MAX_FILE_SIZE = 256 * GiB
#: S3 allows at most 10 000 parts; the part size grows for bigger files, as a real server would.
MAX_PARTS = 10_000
DEFAULT_PART_URL_COUNT = 32
TOKEN_ERROR = "Invalid or missing token"  # noqa: S105 - an error message, not a secret
#: The sandbox's streams never change: every one is at its first version.
STREAM_VERSION = 1
#: The route key of the signed download of a dataset's original file (no token: urlretrieve).
BACKUP_ROUTE = "GET backup"
BACKUP_PATH = "/{name}/backup/{dataset_id:int}"
#: Why the routes that need a data lake answer 501.
NO_LAKE = (
    "not implemented by inboxd sandbox: {what} needs a data lake, and the sandbox parses no "
    "file and keeps no signals; use a real Marple DB for it"
)
_CTL = "inboxd.sandbox"


class ApiError(SandboxError):
    """An error of the Marple DB API, answered as `{"error": message}` with `status`."""


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _metadata(value: object) -> dict[str, Any]:
    """Dataset metadata as ingestion and ``/metadata`` accept it: any JSON object (its keys
    are strings by JSON's grammar; its values are kept as sent)."""
    if not isinstance(value, dict):
        raise ApiError(400, "metadata must be a JSON object")
    return value


class Sandbox:
    """A local Marple DB: the ASGI app and its state. Serve it with `running_sandbox`."""

    def __init__(self, config: SandboxConfig) -> None:
        config.validate()
        self.config = config
        self.datasets: dict[int, Dataset] = {}
        self.ingestions: dict[int, Ingestion] = {}
        self.requests: list[RequestRecord] = []
        self.origin = f"{config.scheme}://{config.host}:{config.port}"
        self.url = self.origin + API_PREFIX
        self._streams: dict[int, StreamDef] = {s.id: s for s in config.streams}
        self._signer = UrlSigner()
        self._gate = FaultGate(config)
        self._dataset_ids = itertools.count(1)
        self._ingestion_ids = itertools.count(1)
        self._started_at = time.time()
        self._s3: S3Backend | None = None
        if config.storage == "s3":
            assert config.s3_endpoint is not None
            self._s3 = S3Backend(config.s3_endpoint, config.s3_bucket)
        self._azure: AzureBackend | None = None
        if config.azure_account_url:
            self._azure = AzureBackend(
                config.azure_account_url,
                config.azure_account_name,
                config.azure_account_key,
                config.azure_container,
            )
        #: the older Marple API (library upload + import), served beside this one
        self.legacy = LegacyApi(config, lambda: self.origin)
        #: the spreadsheet data service (OAuth 1.0, adapters), served under /data-service
        self.data_service = DataService(config)
        self._app = Starlette(routes=self._routes(), exception_handlers=ERROR_HANDLERS)
        self._route_key = RouteKeys((route, self._key_of(route)) for route in self._app.routes)
        install_log_filter()

    # ----------------------------------------------------------------------------- public API

    @property
    def faults(self) -> Faults:
        """The live fault settings (the same object as `config.faults`)."""
        return self.config.faults

    @faults.setter
    def faults(self, value: Faults) -> None:
        self.config.faults = value

    def reseed_faults(self, seed: int | None) -> None:
        """Set ``faults.seed`` and start every random fault draw over from it, the data
        service's too (a test's reproducible run)."""
        self._gate.reseed(seed)
        self.data_service.gate.reseed(seed)

    def prepare(self) -> None:
        """Create directories, the S3 bucket and the Azure container (blocking)."""
        (self.config.data_dir / "ingestions").mkdir(parents=True, exist_ok=True)
        (self.config.data_dir / "datasets").mkdir(parents=True, exist_ok=True)
        if self._s3 is not None:
            self._s3.ensure_bucket()
        if self._azure is not None:
            self._azure.ensure_container()

    def bound(self, host: str, port: int) -> None:
        """Record where the server listens (sets `origin` and `url`)."""
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"  # a wildcard address is not something to connect to
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        self.origin = f"{self.config.scheme}://{host}:{port}"
        self.url = self.origin + API_PREFIX

    def dataset_path(self, dataset_id: int) -> Path:
        """Where the local storage keeps the completed object of a dataset."""
        return self.config.data_dir / "datasets" / str(dataset_id)

    def dataset_bytes(self, dataset_id: int) -> bytes:
        """The completed object of a dataset, wherever it is stored (for tests; blocking).

        Raises KeyError for an unknown dataset and LookupError when no upload was completed.
        """
        dataset = self.datasets[dataset_id]
        if dataset.location is None:
            raise LookupError(f"dataset {dataset_id} has no completed upload")
        kind, where = dataset.location
        if kind == "local":
            return Path(where).read_bytes()
        if kind == "s3" and self._s3 is not None:
            return self._s3.read(where)
        if kind == "azure" and self._azure is not None:
            return self._azure.read(where)
        raise LookupError(f"dataset {dataset_id} is stored in {kind!r}, which keeps no bytes")

    # ------------------------------------------------------------------------- ASGI plumbing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        route = self._route_key(scope)
        # A download is named after the file (the SDK takes the name from the URL's first path
        # segment), so a file called "data-service…" must still reach our route.
        if path.startswith(DATA_SERVICE_PREFIX) and route != BACKUP_ROUTE:
            await self.data_service(scope, receive, send)  # its own auth, limits and log
            return
        kind = "storage" if path.startswith("/storage/") or route == BACKUP_ROUTE else "api"
        with recorded(scope, send, self.requests, kind=kind, route=route) as (headers, ctl, sender):
            scope[_CTL] = ctl
            if kind == "api" and route is not None and route != "GET /health":
                early = self._api_gate(method, path, route, headers, ctl)
                if early is not None:
                    early = self.legacy.gate_answer(route, early)  # its own envelope
                    await early(scope, receive, sender)
                    return
            await self._app(scope, receive, sender)

    def _api_gate(
        self, method: str, path: str, route: str, headers: Headers, ctl: Control
    ) -> Response | None:
        """Faults, then the token check (not on public routes); returns the early answer."""
        fault = self._gate.api_fault((f"{method} {path.removeprefix(API_PREFIX)}", route), ctl)
        if fault is not None:
            return fault
        if route in self.legacy.public_routes:
            return None  # answered without a token, as on the real server
        if headers.get("authorization") != f"Bearer {self.config.token}":
            return JSONResponse({"detail": TOKEN_ERROR}, status_code=403)
        return None

    @staticmethod
    def _key_of(route: BaseRoute) -> str:
        assert isinstance(route, Route)
        if route.path.startswith("/storage/"):
            return "PUT storage"
        if route.path == BACKUP_PATH:
            return BACKUP_ROUTE
        return route_key(route, API_PREFIX)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        # Nothing to start: prepare() ran before the server did.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _routes(self) -> list[BaseRoute]:
        Endpoint = Callable[[Request], Awaitable[Response]]

        def api(path: str, endpoint: Endpoint, method: str = "GET") -> Route:
            return Route(API_PREFIX + path, endpoint, methods=[method])

        one = "/stream/{stream_id:int}/dataset/{dataset_id:int}"
        # What the SDK's Dataset and Signal call that reads or writes signals in the lake.
        lake = [
            ("GET", "/signals"),
            ("POST", "/signals"),
            ("POST", "/signals/delete"),
            ("GET", "/signal/{sig:int}"),
            ("POST", "/signal/uploads"),
            ("POST", "/signal/uploads/complete"),
            ("POST", "/append"),
            ("POST", "/cool"),
        ]
        return [
            api("/health", self._health, "GET"),
            api("/streams", self._list_streams, "GET"),
            api("/stream/{stream_id:int}", self._get_stream, "GET"),
            api("/ingestion", self._create_ingestion, "POST"),
            api("/ingestion/{id:int}/upload/server", self._upload_server, "POST"),
            api("/ingestion/{id:int}/upload/part-urls", self._part_urls, "GET"),
            api("/ingestion/{id:int}/upload/complete", self._complete, "POST"),
            api("/ingestion/{id:int}/abort", self._abort, "POST"),
            api("/stream/{stream_id:int}/datasets/status", self._datasets_status, "POST"),
            api("/stream/{stream_id:int}/datasets", self._list_datasets, "GET"),
            api("/datapool/{datapool}/dataset", self._get_dataset, "GET"),
            api("/datapool/{datapool}/datasets", self._list_datapool_datasets, "GET"),
            api(f"{one}/metadata", self._update_metadata, "POST"),
            api(f"{one}/delete", self._delete_dataset, "POST"),
            api(f"{one}/backup", self._backup, "GET"),
            api(f"{one}/reingest", self._reingest, "POST"),
            *[api(f"{one}{path}", self._needs_lake, method) for method, path in lake],
            api("/stream/{stream_id:int}/dataset/add", self._needs_lake, "POST"),
            api("/datapool/{datapool}/signal_map", self._needs_lake),
            api("/datapool/{datapool}/signal/{name}/id", self._needs_lake),
            api("/datapool/{datapool}/dataset/{id:int}/signal/{sig:int}/data", self._needs_lake),
            *self.legacy.routes(API_PREFIX),
            Route("/storage/{id:int}/object", self._storage_put, methods=["PUT"]),
            Route("/storage/{id:int}/part/{part:int}", self._storage_put, methods=["PUT"]),
            # Not under /api/v1: the URL's first path segment is the file's name (see _backup).
            Route(BACKUP_PATH, self._download, methods=["GET"]),
        ]

    # --------------------------------------------------------------------------- helpers

    def _ingestion(self, request: Request) -> Ingestion:
        ingestion_id: int = request.path_params["id"]
        ingestion = self.ingestions.get(ingestion_id)
        if ingestion is None:
            raise ApiError(404, f"ingestion {ingestion_id} not found")
        return ingestion

    @staticmethod
    def _require_uploading(ingestion: Ingestion) -> None:
        if ingestion.state != UPLOADING:
            raise ApiError(409, f"ingestion is not in UPLOADING state (state: {ingestion.state})")

    def _stream(self, stream_id: int) -> StreamDef:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ApiError(404, f"stream {stream_id} not found")
        return stream

    def _dataset_in_stream(self, request: Request) -> Dataset:
        """The dataset ``{dataset_id}`` of stream ``{stream_id}``: 404 for an unknown stream,
        an unknown dataset and a dataset of another stream alike."""
        stream_id: int = request.path_params["stream_id"]
        self._stream(stream_id)
        dataset_id: int = request.path_params["dataset_id"]
        dataset = self.datasets.get(dataset_id)
        if dataset is None or dataset.stream_id != stream_id:
            raise ApiError(404, f"dataset {dataset_id} not found in stream {stream_id}")
        return dataset

    def _find_dataset(self, stream_id: int, name: str) -> Dataset | None:
        for dataset in self.datasets.values():
            if dataset.stream_id == stream_id and dataset.path == name:
                return dataset
        return None

    def _ingestion_dir(self, ingestion_id: int) -> Path:
        return self.config.data_dir / "ingestions" / str(ingestion_id)

    def _mode_for(self, stream: StreamDef, file_size: int) -> str:
        if stream.mode is not None:
            return stream.mode
        if file_size <= self.config.server_max_bytes:
            return "server"
        if file_size <= self.config.single_max_bytes:
            return "single"
        return "multipart"

    def _part_size_for(self, file_size: int) -> int:
        size = self.config.part_size
        if -(-file_size // size) > MAX_PARTS:
            # Round the minimum part size up to whole MiB, as S3 clients commonly do.
            size = math.ceil(file_size / MAX_PARTS / MiB) * MiB
        return size

    def _local_url(self, request: Request, path: str) -> str:
        # The storage lives on the server the client already reached, so its own view of our
        # address (Host header) is the one that works, whatever we are bound to.
        # The signature covers the path as the server sees it (decoded); the URL carries it
        # percent-encoded.
        base = str(request.base_url).rstrip("/")
        return f"{base}{quote(path)}?{self._signer.sign(path, self.config.url_ttl)}"

    def _object_url(self, request: Request, ingestion: Ingestion) -> str:
        ttl = self.config.url_ttl
        if ingestion.backend == "azure":
            assert self._azure is not None and ingestion.azure_blob is not None
            return self._azure.blob_url(ingestion.azure_blob, "cw", ttl)
        if ingestion.backend == "discard":
            return f"{str(self.config.discard_url).rstrip('/')}/{ingestion.id}/object"
        return self._local_url(request, f"/storage/{ingestion.id}/object")

    def _dataset_json(self, dataset: Dataset) -> dict[str, Any]:
        stream = self._streams[dataset.stream_id]
        return dataset.as_json(datapool=stream.datapool, stream_version=STREAM_VERSION)

    def _stream_json(self, stream: StreamDef) -> dict[str, Any]:
        """A stream as ``GET /streams`` and ``GET /stream/{id}`` answer it.

        Times are epoch seconds, as the official SDK's ``DataStream`` model wants them; the
        statistics add up the stream's datasets as ``Dataset.as_json`` shows them.
        """
        mine = [d for d in self.datasets.values() if d.stream_id == stream.id]
        ingested = [d.completed_at for d in mine if d.completed_at is not None]
        imported = [d.size for d in mine if d.import_status == "FINISHED"]
        return {
            "id": stream.id,
            "name": stream.name,
            "type": stream.type,
            "description": f"sandbox stream {stream.name}",
            "datapool": stream.datapool,
            "layer_shifts": [],
            "version_id": STREAM_VERSION,
            "insight_workspace": None,
            "insight_project": None,
            "created_at": self._started_at,
            "last_updated": self._started_at,  # the sandbox's streams never change
            "last_ingested": max(ingested, default=None),
            "n_datasets": len(mine),
            "n_datapoints": 0,  # the sandbox parses no file: no datapoints anywhere
            "cold_bytes": sum(imported),
            "hot_bytes": 0,
            "plugin": None,
            "plugin_args": None,
            "signal_reduction": None,
            "scripts": [],
        }

    async def _cleanup(self, ingestion: Ingestion) -> None:
        """Free what an ingestion that will not complete holds (best effort)."""
        if ingestion.s3_upload_id and ingestion.s3_key and self._s3 is not None:
            await anyio.to_thread.run_sync(
                self._s3.abort_multipart, ingestion.s3_key, ingestion.s3_upload_id
            )
        await anyio.to_thread.run_sync(files.remove_tree, self._ingestion_dir(ingestion.id))

    # ---------------------------------------------------------------------------- API routes

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "healthy"})

    async def _list_streams(self, request: Request) -> Response:
        return JSONResponse({"streams": [self._stream_json(s) for s in self._streams.values()]})

    async def _get_stream(self, request: Request) -> Response:
        return JSONResponse(self._stream_json(self._stream(request.path_params["stream_id"])))

    async def _create_ingestion(self, request: Request) -> Response:
        body = await read_json(request, ApiError)
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        stream_id = body.get("stream_id")
        if not is_int(stream_id):
            raise ApiError(400, "stream_id must be an integer")
        name = body.get("dataset_name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "dataset_name must be a non-empty string")
        if "\x00" in name:
            raise ApiError(400, "dataset_name must not contain NUL")
        if name.startswith(("/", "\\")):
            raise ApiError(400, "dataset_name must be a relative path")
        file_size = body.get("file_size")
        if not is_int(file_size) or not 0 < file_size <= MAX_FILE_SIZE:
            raise ApiError(400, "file_size must be an integer > 0 and <= 256 GiB")
        raw_metadata = body.get("metadata")
        metadata = {} if raw_metadata is None else _metadata(raw_metadata)
        overwrite = body.get("overwrite")
        if overwrite is None:
            overwrite = False
        if not isinstance(overwrite, bool):
            raise ApiError(400, "overwrite must be a boolean")
        plugin_args = body.get("plugin_args")
        if plugin_args is not None and not isinstance(plugin_args, str):
            raise ApiError(400, "plugin_args must be a string")
        stream = self._stream(stream_id)
        if stream.type != "files":
            raise ApiError(400, f"stream {stream_id} is not a files stream")
        if self._find_dataset(stream_id, name) is not None and not overwrite:
            raise ApiError(409, f"dataset {name!r} already exists in stream {stream_id}")

        mode = self._mode_for(stream, file_size)
        if mode == "server":
            backend = "local"
        elif mode == "azure":
            backend = "azure"
        else:
            backend = self.config.storage
        ingestion = Ingestion(
            id=next(self._ingestion_ids),
            dataset_id=0,  # set below, once nothing can fail any more
            mode=mode,
            file_size=file_size,
            part_size=self._part_size_for(file_size) if mode == "multipart" else None,
            backend=backend,
        )
        presigned_url: str | None = None
        try:
            if backend == "s3" and mode in ("single", "multipart"):
                assert self._s3 is not None
                ingestion.s3_key = f"ingestions/{ingestion.id}/object"
                if mode == "multipart":
                    ingestion.s3_upload_id = await anyio.to_thread.run_sync(
                        self._s3.create_multipart, ingestion.s3_key
                    )
                else:
                    presigned_url = await anyio.to_thread.run_sync(
                        self._s3.presign_put, ingestion.s3_key, self.config.url_ttl
                    )
        except Exception as exc:
            raise ApiError(502, f"storage unavailable: {exc}") from exc
        if backend == "azure":
            ingestion.azure_blob = f"{ingestion.id}/{name}"

        # Re-check after the awaits above: a concurrent request may have taken the name.
        existing = self._find_dataset(stream_id, name)
        if existing is not None and not overwrite:
            await self._cleanup(ingestion)
            raise ApiError(409, f"dataset {name!r} already exists in stream {stream_id}")
        superseded: list[Ingestion] = []
        if existing is not None:
            for other in self.ingestions.values():
                if other.dataset_id == existing.id and other.state == UPLOADING:
                    other.state = SUPERSEDED
                    superseded.append(other)
            existing.reset_for_overwrite(metadata, file_size, plugin_args)
            dataset = existing
        else:
            dataset = Dataset(
                id=next(self._dataset_ids),
                stream_id=stream_id,
                path=name,
                metadata=metadata,
                size=file_size,
                plugin_args=plugin_args,
            )
            self.datasets[dataset.id] = dataset
        ingestion.dataset_id = dataset.id
        self.ingestions[ingestion.id] = ingestion
        for other in superseded:
            await self._cleanup(other)

        if mode in ("single", "azure") and presigned_url is None:
            presigned_url = self._object_url(request, ingestion)
        answer: dict[str, Any] = {
            "dataset_id": dataset.id,
            "ingestion_id": ingestion.id,
            "mode": mode,
            "presigned_url": presigned_url,
            "part_size": ingestion.part_size,
            "expires_in": _json_number(self.config.url_ttl),
        }
        for key, value in self.faults.mangle.get("POST /ingestion", {}).items():
            if value is None:
                answer.pop(key, None)
            else:
                answer[key] = value
        return JSONResponse(answer)

    async def _upload_server(self, request: Request) -> Response:
        ingestion = self._ingestion(request)
        self._require_uploading(ingestion)
        try:
            parser = FormDataParser(boundary_from_content_type(request.headers.get("content-type")))
        except FormDataError as exc:
            raise ApiError(400, str(exc)) from exc
        sink: files.AtomicSink | None = None
        in_file = False
        file_done = False
        committed = False
        try:
            async for chunk in request.stream():
                for event in parser.feed(chunk):
                    if isinstance(event, PartStart):
                        # Only the first `file` field counts; other fields are ignored.
                        in_file = event.name == "file" and sink is None
                        if in_file:
                            sink = files.AtomicSink(self._ingestion_dir(ingestion.id) / "server")
                            await sink.open()
                    elif isinstance(event, PartData):
                        if in_file:
                            assert sink is not None
                            await sink.write(event.data)
                    elif isinstance(event, PartEnd) and in_file:
                        in_file = False
                        file_done = True
            parser.close()
            if sink is None or not file_done:
                raise ApiError(400, "missing 'file' field")
            self._require_uploading(ingestion)  # it may have been aborted meanwhile
            await sink.commit()
            committed = True
        except FormDataError as exc:
            raise ApiError(400, f"malformed multipart body: {exc}") from exc
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening any more
        finally:
            if sink is not None and not committed:
                await sink.discard()
        ingestion.server_upload = True
        return JSONResponse({"status": "success"})

    async def _part_urls(self, request: Request) -> Response:
        ingestion = self._ingestion(request)
        if ingestion.mode != "multipart":
            raise ApiError(
                400, f"ingestion {ingestion.id} is not multipart (mode: {ingestion.mode})"
            )
        self._require_uploading(ingestion)
        total = ingestion.part_count
        raw_start = request.query_params.get("start_part")
        if raw_start is None:
            raise ApiError(400, "start_part is required")
        try:
            start = int(raw_start)
            count = int(request.query_params.get("count", DEFAULT_PART_URL_COUNT))
        except ValueError as exc:
            raise ApiError(400, "start_part and count must be integers") from exc
        if not 1 <= start <= total:
            raise ApiError(400, f"start_part must be between 1 and {total}")
        if count <= 0:
            raise ApiError(400, "count must be greater than 0")
        end = min(total, start + min(count, self.config.part_url_batch_max) - 1)
        numbers = range(start, end + 1)
        ttl = self.config.url_ttl
        if ingestion.backend == "s3":
            s3, key, upload_id = self._s3, ingestion.s3_key, ingestion.s3_upload_id
            assert s3 is not None and key is not None and upload_id is not None

            def presign_all() -> list[str]:
                return [s3.presign_part(key, upload_id, n, ttl) for n in numbers]

            urls = await anyio.to_thread.run_sync(presign_all)
        elif ingestion.backend == "discard":
            sink = str(self.config.discard_url).rstrip("/")
            urls = [f"{sink}/{ingestion.id}/part/{n}" for n in numbers]
        else:
            urls = [self._local_url(request, f"/storage/{ingestion.id}/part/{n}") for n in numbers]
        return JSONResponse(
            {
                "parts": [{"part_number": n, "url": u} for n, u in zip(numbers, urls, strict=True)],
                "expires_in": _json_number(ttl),
                "next_part": end + 1 if end < total else None,
            }
        )

    async def _complete(self, request: Request) -> Response:
        ingestion = self._ingestion(request)
        async with ingestion.lock:
            self._require_uploading(ingestion)
            dataset = self.datasets[ingestion.dataset_id]
            try:
                problem, location = await self._finish(ingestion)
            except StorageError as exc:
                # Nothing decided: the ingestion stays UPLOADING and complete may be retried.
                raise ApiError(502, f"storage error: {exc}") from exc
            # Overwrite does not take this lock: the ingestion may be SUPERSEDED by now.
            self._require_uploading(ingestion)
            if problem is not None:
                ingestion.state = FAILED
                dataset.fail(problem)
                await self._cleanup(ingestion)
                raise ApiError(400, problem)
            ingestion.state = COMPLETED
            dataset.location = location
            dataset.start_import(self.config.import_seconds, self._import_failure(dataset))
            await self._cleanup(ingestion)
        return JSONResponse({"status": "success"})

    def _import_failure(self, dataset: Dataset) -> str | None:
        """The message an import of ``dataset`` is set to fail with (``--fail-import-glob``)."""
        glob = self.faults.fail_import_glob
        if glob is not None and fnmatch.fnmatchcase(dataset.path, glob):
            return f"Import failed: no plugin could read {dataset.path!r} (injected fault)"
        return None

    async def _finish(self, ingestion: Ingestion) -> tuple[str | None, tuple[str, str] | None]:
        """Check what was uploaded and publish it; return (problem, location)."""
        expected = ingestion.file_size
        target = self.dataset_path(ingestion.dataset_id)
        directory = self._ingestion_dir(ingestion.id)

        def mismatch(got: int, detail: str = "") -> str:
            return f"size mismatch: expected {expected} bytes, got {got}{detail}"

        single_local = ingestion.backend == "local" and ingestion.mode != "multipart"
        if ingestion.server_upload or single_local:
            name = "server" if ingestion.server_upload or ingestion.mode == "server" else "object"
            source = directory / name
            got = await anyio.to_thread.run_sync(files.file_size, source) or 0
            if got != expected:
                return mismatch(got), None
            await anyio.to_thread.run_sync(files.move_file, source, target)
            return None, ("local", str(target))

        if ingestion.backend == "local":
            numbers = range(1, ingestion.part_count + 1)
            paths = [directory / f"part-{n}" for n in numbers]
            sizes = await anyio.to_thread.run_sync(lambda: [files.file_size(p) for p in paths])
            got = sum(s or 0 for s in sizes)
            for n, size in zip(numbers, sizes, strict=True):
                want = ingestion.expected_part_size(n)
                if size != want:
                    have = "missing" if size is None else f"{size} bytes"
                    return mismatch(got, f" (part {n}: {have}, expected {want} bytes)"), None
            await anyio.to_thread.run_sync(files.concat_files, paths, target)
            return None, ("local", str(target))

        if ingestion.backend == "s3":
            return await self._finish_s3(ingestion, mismatch)

        if ingestion.backend == "azure":
            assert self._azure is not None and ingestion.azure_blob is not None
            got = await self._azure.blob_size(ingestion.azure_blob) or 0
            if got != expected:
                return mismatch(got), None
            return None, ("azure", ingestion.azure_blob)

        # "discard": the bytes went to a sink that keeps nothing; there is nothing to check.
        return None, ("discard", "")

    async def _finish_s3(
        self, ingestion: Ingestion, mismatch: Callable[..., str]
    ) -> tuple[str | None, tuple[str, str] | None]:
        s3, key = self._s3, ingestion.s3_key
        assert s3 is not None and key is not None
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            if ingestion.s3_upload_id is not None:
                upload_id = ingestion.s3_upload_id
                parts = await anyio.to_thread.run_sync(s3.list_parts, key, upload_id)
                numbers = range(1, ingestion.part_count + 1)
                got = sum(parts[n][0] for n in numbers if n in parts)
                for n in numbers:
                    want = ingestion.expected_part_size(n)
                    have = parts.get(n)
                    if have is None or have[0] != want:
                        shown = "missing" if have is None else f"{have[0]} bytes"
                        return mismatch(got, f" (part {n}: {shown}, expected {want} bytes)"), None
                etags = [(n, parts[n][1]) for n in numbers]
                await anyio.to_thread.run_sync(s3.complete_multipart, key, upload_id, etags)
                ingestion.s3_upload_id = None  # completed: nothing left to abort
            size = await anyio.to_thread.run_sync(s3.object_size, key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(str(exc)) from exc
        if (size or 0) != ingestion.file_size:
            return mismatch(size or 0), None
        return None, ("s3", key)

    async def _abort(self, request: Request) -> Response:
        ingestion = self._ingestion(request)
        body = await read_json(request, ApiError, optional=True)
        reason: object = None
        if body is not None:
            if not isinstance(body, dict):
                raise ApiError(400, "body must be a JSON object")
            reason = body.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise ApiError(400, "reason must be a string")
        text = reason if isinstance(reason, str) and reason.strip() else "Unknown reason"
        async with ingestion.lock:
            if ingestion.state == COMPLETED:
                raise ApiError(409, f"ingestion {ingestion.id} is COMPLETED and cannot be aborted")
            if ingestion.state == UPLOADING:
                ingestion.state = ABORTED
                ingestion.abort_reason = text
                self.datasets[ingestion.dataset_id].fail(text)
                await self._cleanup(ingestion)
            # ABORTED / FAILED / SUPERSEDED: already over, so aborting again is a no-op success.
        return JSONResponse({"status": "success"})

    async def _datasets_status(self, request: Request) -> Response:
        stream_id: int = request.path_params["stream_id"]
        self._stream(stream_id)
        body = await read_json(request, ApiError)
        if not isinstance(body, list) or not all(is_int(i) for i in body):
            raise ApiError(400, "body must be a JSON array of dataset ids")
        answer = []
        for dataset_id in dict.fromkeys(body):
            dataset = self.datasets.get(dataset_id)
            if dataset is None or dataset.stream_id != stream_id:
                continue
            answer.append(
                {
                    "dataset_id": dataset.id,
                    "import_status": dataset.import_status,
                    "import_progress": dataset.import_progress,
                    "import_message": dataset.import_message,
                }
            )
        return JSONResponse(answer)

    async def _list_datasets(self, request: Request) -> Response:
        stream_id: int = request.path_params["stream_id"]
        self._stream(stream_id)
        return JSONResponse(
            [self._dataset_json(d) for d in self.datasets.values() if d.stream_id == stream_id]
        )

    def _datapool_streams(self, request: Request) -> set[int]:
        datapool: str = request.path_params["datapool"]
        streams = {s.id for s in self._streams.values() if s.datapool == datapool}
        if not streams:
            raise ApiError(404, f"datapool {datapool!r} not found")
        return streams

    async def _list_datapool_datasets(self, request: Request) -> Response:
        streams = self._datapool_streams(request)
        return JSONResponse(
            [self._dataset_json(d) for d in self.datasets.values() if d.stream_id in streams]
        )

    async def _get_dataset(self, request: Request) -> Response:
        streams = self._datapool_streams(request)
        raw_id = request.query_params.get("id")
        path = request.query_params.get("path")
        if raw_id is None and path is None:
            raise ApiError(400, "give either id or path")
        dataset_id: int | None = None
        if raw_id is not None:
            try:
                dataset_id = int(raw_id)
            except ValueError as exc:
                raise ApiError(400, "id must be an integer") from exc
        for dataset in self.datasets.values():
            if dataset.stream_id not in streams:
                continue
            if (dataset_id is None or dataset.id == dataset_id) and (
                path is None or dataset.path == path
            ):
                return JSONResponse(self._dataset_json(dataset))
        raise ApiError(404, "dataset not found")

    async def _update_metadata(self, request: Request) -> Response:
        """``POST …/metadata``: the body replaces the metadata (the SDK merges client-side)."""
        dataset = self._dataset_in_stream(request)
        dataset.metadata = _metadata(await read_json(request, ApiError))
        return JSONResponse({"status": "success"})

    async def _delete_dataset(self, request: Request) -> Response:
        """``POST …/delete``: the dataset and its original file go for good.

        An upload still running into it is aborted, as ``POST /ingestion/{id}/abort`` would
        (its storage PUTs and its complete are refused from then on): refusing would leave a
        dataset whose uploader died undeletable. The stored file is removed before the dataset
        is forgotten, so a storage error (502) leaves it listed and the delete can be retried.
        """
        dataset = self._dataset_in_stream(request)
        await self._abort_uploads_into(dataset.id)
        location = dataset.location
        if location is not None:
            try:
                await self._remove_stored(location)
            except StorageError as exc:
                raise ApiError(502, f"storage error, dataset {dataset.id} kept: {exc}") from exc
        if self.datasets.pop(dataset.id, None) is None:
            raise ApiError(404, f"dataset {dataset.id} not found")  # a concurrent delete won
        await self._abort_uploads_into(dataset.id)  # an overwrite that slipped in meanwhile
        return JSONResponse({"status": "success"})

    async def _abort_uploads_into(self, dataset_id: int) -> None:
        for ingestion in [i for i in self.ingestions.values() if i.dataset_id == dataset_id]:
            # The lock waits out a complete in progress, which then has published its file.
            async with ingestion.lock:
                if ingestion.state == UPLOADING:
                    ingestion.state = ABORTED
                    ingestion.abort_reason = "the dataset was deleted"
                    await self._cleanup(ingestion)

    async def _remove_stored(self, location: tuple[str, str]) -> None:
        kind, where = location
        if kind == "local":
            await anyio.to_thread.run_sync(lambda: Path(where).unlink(missing_ok=True))
        elif kind == "s3" and self._s3 is not None:
            await anyio.to_thread.run_sync(self._s3.delete, where)
        elif kind == "azure" and self._azure is not None:
            await self._azure.delete(where)

    async def _backup(self, request: Request) -> Response:
        """``GET …/backup``: ``{"path": url}``, a signed URL of the original file (no token).

        The SDK names the downloaded file after the URL path's first segment
        (``urlparse(url).path.rsplit("/")[1]``), so the URL is ``/<file name>/backup/<id>``.
        """
        dataset = self._dataset_in_stream(request)
        if dataset.location is None:
            raise ApiError(
                409,
                f"dataset {dataset.id} has no original file yet: its upload did not complete "
                f"(status {dataset.import_status})",
            )
        if dataset.location[0] == "discard":
            raise ApiError(404, f"dataset {dataset.id} was stored with --storage discard: no bytes")
        name = PurePosixPath(dataset.path).name or f"dataset-{dataset.id}"
        return JSONResponse({"path": self._local_url(request, f"/{name}/backup/{dataset.id}")})

    async def _reingest(self, request: Request) -> Response:
        """``POST …/reingest``: the simulated import runs again on the kept original file,
        with new ``plugin_args`` when the optional body gives them."""
        dataset = self._dataset_in_stream(request)
        body = await read_json(request, ApiError, optional=True)
        if body is not None and not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        plugin_args = None if body is None else body.get("plugin_args")
        if plugin_args is not None and not isinstance(plugin_args, str):
            raise ApiError(400, "plugin_args must be a string")
        if dataset.location is None:
            raise ApiError(409, f"dataset {dataset.id} has no original file to reingest")
        if dataset.import_status in ("WAITING", "IMPORTING"):
            raise ApiError(409, f"dataset {dataset.id} is still importing")
        if plugin_args is not None:
            dataset.plugin_args = plugin_args
        ingested = dataset.completed_at  # a reingest is no new upload: last_ingested stays
        dataset.start_import(self.config.import_seconds, self._import_failure(dataset))
        dataset.completed_at = ingested
        return JSONResponse({"status": "success"})

    async def _needs_lake(self, request: Request) -> Response:
        """The SDK's signal, append, cool and custom-dataset calls: 501, after the 404s."""
        if "dataset_id" in request.path_params:
            self._dataset_in_stream(request)
        elif "stream_id" in request.path_params:
            self._stream(request.path_params["stream_id"])
        else:
            self._datapool_streams(request)
        raise ApiError(501, NO_LAKE.format(what=self._route_key(request.scope)))

    # ----------------------------------------------------------------------------- download

    async def _download(self, request: Request) -> Response:
        """The signed URL ``_backup`` hands out: the original file, streamed."""
        problem = self._signed_url_problem(request, request.scope["path"])
        if problem is not None:
            return problem
        dataset = self.datasets.get(request.path_params["dataset_id"])
        if dataset is None or dataset.location is None:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        name = PurePosixPath(dataset.path).name or f"dataset-{dataset.id}"
        disposition = f"attachment; filename*=UTF-8''{quote(name, safe='')}"
        kind, where = dataset.location
        if kind == "local":
            # FileResponse reads the file in chunks from a worker thread: never whole.
            return FileResponse(where, headers={"content-disposition": disposition})
        if kind == "s3" and self._s3 is not None:
            url = await anyio.to_thread.run_sync(self._s3.presign_get, where, 300.0)
        elif kind == "azure" and self._azure is not None:
            url = self._azure.blob_url(where, "r", 300)
        else:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        return await self._relay(url, disposition)

    @staticmethod
    async def _relay(url: str, disposition: str) -> Response:
        """Stream an object from S3 or Azure through to the client, chunk by chunk."""
        client = build_client(timeout=30)
        try:
            upstream = await client.send(client.build_request("GET", url), stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            raise ApiError(502, f"storage unavailable: {exc}") from exc
        if upstream.status_code != 200:
            await upstream.aclose()
            await client.aclose()
            raise ApiError(502, f"storage answered {upstream.status_code}")

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await client.aclose()

        headers = {"content-disposition": disposition}
        if "content-length" in upstream.headers:
            headers["content-length"] = upstream.headers["content-length"]
        return StreamingResponse(body(), headers=headers, media_type="application/octet-stream")

    # ------------------------------------------------------------------------------ storage

    async def _storage_put(self, request: Request) -> Response:
        ingestion_id: int = request.path_params["id"]
        part: int | None = request.path_params.get("part")
        path = request.url.path
        faults = self.faults
        ctl: Control = request.scope[_CTL]

        forced = self._gate.next_forced((f"PUT {path}", "PUT storage"))
        if forced:
            await drain(request)
            return storage_fault(forced, faults.retry_after)
        if forced == 0:
            ctl.drop = True
        if faults.storage_fail_always:
            await drain(request)
            return storage_fault(500, faults.retry_after)
        if self._gate.roll(faults.storage_503_rate):
            await drain(request)
            return storage_fault(503, faults.retry_after)

        error = self._storage_precheck(request, path)
        if error is not None:
            await drain(request)
            return error
        length = int(request.headers["content-length"])
        ingestion = self.ingestions.get(ingestion_id)
        if ingestion is None or (part is not None and not 1 <= part <= ingestion.part_count):
            await drain(request)
            return s3_error(404, "NoSuchUpload", "The specified upload does not exist.")
        if ingestion.state != UPLOADING:
            await drain(request)
            return s3_error(
                403,
                "AccessDenied",
                f"Ingestion {ingestion.id} is not accepting uploads (state: {ingestion.state})",
            )

        name = "object" if part is None else f"part-{part}"
        sink = files.AtomicSink(self._ingestion_dir(ingestion.id) / name, md5=True)
        committed = False
        owed_sleep = 0.0
        try:
            await sink.open()
            async for chunk in request.stream():
                await sink.write(chunk)
                owed_sleep = await storage_delay(self.faults, owed_sleep, len(chunk))
            if sink.size != length:
                return s3_error(
                    400,
                    "IncompleteBody",
                    "You did not provide the number of bytes specified by the Content-Length "
                    "HTTP header.",
                )
            if ingestion.state != UPLOADING:  # aborted or superseded while we received
                return s3_error(403, "AccessDenied", f"Ingestion {ingestion.id} is closed")
            await sink.commit()
            committed = True
        except ClientDisconnect:
            return Response(status_code=400)  # the client is gone; nobody reads this
        finally:
            if not committed:
                await sink.discard()
        return Response(status_code=200, headers={"ETag": sink.etag()})

    def _storage_precheck(self, request: Request, path: str) -> Response | None:
        """The checks real S3 makes before reading a presigned PUT's body."""
        problem = self._signed_url_problem(request, path)
        if problem is not None:
            return problem
        raw_length = request.headers.get("content-length")
        if raw_length is None:
            return s3_error(
                411, "MissingContentLength", "You must provide the Content-Length HTTP header."
            )
        if not raw_length.isdigit():
            return s3_error(400, "InvalidArgument", "Invalid Content-Length")
        return None

    def _signed_url_problem(self, request: Request, path: str) -> Response | None:
        """What real S3 answers for a presigned URL that is not (or no longer) valid."""
        if "authorization" in request.headers:
            return s3_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be "
                "specified",
                ArgumentName="Authorization",
            )
        query = request.query_params
        problem = self._signer.check(path, query.get("exp"), query.get("sig"))
        if problem == "missing":
            return s3_error(
                403,
                "AccessDenied",
                "Query-string authentication requires the Signature, Expires and "
                "AWSAccessKeyId parameters",
            )
        if problem == "signature":
            return s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you "
                "provided. Check your key and signing method.",
            )
        if problem == "expired":
            return s3_error(
                403,
                "AccessDenied",
                "Request has expired",
                Expires=iso8601(float(query["exp"])),
                ServerTime=iso8601(time.time()),
            )
        return None
