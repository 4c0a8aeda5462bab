"""The older Marple API in the sandbox: a file server library, imports, metadata and shares.

Served beside the Marple DB API under the same ``/api/v1`` prefix (the paths do not overlap),
with the same gate in front: the sandbox's faults (503/429 rates, ``Retry-After``, lost
responses, ``fail_next`` on route keys such as ``"POST /library/file/import"``) and its token
check. What differs is the wire format: every answer, errors included, is the envelope
``{"request_time": seconds, "message": data}`` of ``marple-api-guide.txt``.

The model, as strict as the guide allows:

* ``POST /library/folder/add {"path": <parent>, "new_folder_name": <name>}`` creates one folder
  in an existing one (404 if the parent does not exist, 409 if the folder does); the root ``/``
  always exists.
* ``POST /library/file/upload?path=<folder>`` stores the multipart field ``file`` at
  ``<folder>/<file name>``, streamed to disk and published atomically; a second upload to the
  same path replaces the file (an upload cut off half-way leaves the old one in place). The
  folder must exist — the guide's ``path`` is "the directory where the file should be
  uploaded" — else 404: folders are made with ``folder/add``, never by an upload.
* ``POST /library/file/import {"path", "plugin"}`` turns a stored file into a *source*. Sources
  are keyed by path (``/sources/lookup`` answers one id per path), so importing a path that
  already has a source re-imports it in place: same id, status back to 0 — the app's
  "Re-import" of a file. The status then climbs 0 → 100 over ``import_seconds``, or ends at
  -1 with a message when the path matches ``fail_import_glob``.
* ``GET /sources/status?id=1&id=2`` answers ``[{"source_id", "status"}]`` for the ids it knows
  (``"message"`` too for a failed import); ``GET /sources/lookup?path=`` answers
  ``{"source_id", "path"}`` or 404.
* ``POST /library/metadata {"source_id" | "path", "metadata": [{"name", "value"}]}`` sets
  those keys (repeating it changes nothing).
* ``POST /library/share/new {"workbook_name", "source_ids"}`` answers a new share id;
  ``POST /library/share/{id}/add {"workbook_name"?, "source_ids"}`` answers a *new* share id
  holding the old one's sources and these (the guide: "Returns new share id with updated
  content"; the old id keeps its content); ``GET``/``POST /library/share/{id}/link`` (the guide
  shows both verbs) answers the link, on the base ``url`` given (query or JSON body) or the
  sandbox's own.
* ``GET /version`` answers the version string, without a token (the official clients call it
  before they send one); ``GET /`` is their token check: 200 with the token, 403 without.
* ``POST /sources/search {"library_filter": {}}`` lists the sources (as the SDK's ``Insight``
  client asks); ``library_filter`` may hold ``path``, a folder to list the sources under.

Tests inspect ``files``, ``folders``, ``sources``, ``shares`` and the sandbox's shared request
log.
"""

from __future__ import annotations

import fnmatch
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from daemon.sandbox import files
from daemon.sandbox.common import (
    SandboxError,
    drain,
    internal_error_message,
    is_int,
    read_json,
    route_key,
    storage_delay,
)
from daemon.sandbox.config import GiB, SandboxConfig
from daemon.sandbox.formdata import (
    FormDataError,
    FormDataParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_from_content_type,
)

VERSION = "2.2.0+inboxd-sandbox"
#: Import plugins the sandbox knows; importing with any other is a 400, as on a real server.
PLUGINS = frozenset(
    {
        "csv_plugin",
        "csv_zip_plugin",
        "mat_plugin",
        "hdf5_plugin",
        "mdf_plugin",
        "parquet_plugin",
        "ulog_plugin",
        "tdms_plugin",
    }
)
IMPORTED = 100
IMPORT_FAILED = -1
_MAX_PATH = 1024
_MAX_NAME = 255
_MAX_STATUS_IDS = 1000

Handler = Callable[[Request], Awaitable[Any]]


class LegacyError(SandboxError):
    """Answered as the envelope ``{"request_time", "message": message}`` with ``status``."""


def envelope(message: Any, *, status: int = 200, started: float | None = None) -> JSONResponse:
    """The older API's answer: ``{"request_time": seconds spent, "message": message}``."""
    spent = 0.0 if started is None else time.perf_counter() - started
    return JSONResponse({"request_time": round(spent, 6), "message": message}, status_code=status)


@dataclass
class LibraryFile:
    """A file stored on the file server."""

    path: str
    size: int
    disk_path: Path
    uploads: int = 1
    uploaded_at: float = field(default_factory=time.time)


@dataclass
class Source:
    """An imported (or importing) file: the unit metadata and shares refer to."""

    id: int
    path: str
    plugin: str
    metadata: dict[str, Any] = field(default_factory=dict)
    #: how often the path was imported (1 = once; a re-import adds one)
    import_count: int = 1
    import_started: float = field(default_factory=time.monotonic)
    import_seconds: float = 0.0
    failure: str | None = None

    @property
    def status(self) -> int:
        """The status code a client polling now would see: 0..100, or -1 when it failed."""
        elapsed = time.monotonic() - self.import_started
        share = 1.0 if self.import_seconds <= 0 else elapsed / self.import_seconds
        if share >= 1.0:
            return IMPORT_FAILED if self.failure is not None else IMPORTED
        return min(IMPORTED - 1, int(share * IMPORTED))

    def restart_import(self, plugin: str, seconds: float, failure: str | None) -> None:
        """Import the path again (the new bytes, maybe another plugin), keeping the id."""
        self.plugin = plugin
        self.import_count += 1
        self.import_started = time.monotonic()
        self.import_seconds = seconds
        self.failure = failure


@dataclass
class Share:
    """A share id: a workbook opened with some sources."""

    id: str
    workbook: str
    source_ids: list[int]
    links: int = 0


class LegacyApi:
    """The older Marple API's routes and state, served by the sandbox beside its own.

    ``config`` is the sandbox's (its data folder, import time and live faults); ``origin``
    says where the sandbox is reached, for share links.
    """

    def __init__(self, config: SandboxConfig, origin: Callable[[], str]) -> None:
        self.config = config
        self._origin = origin
        self.files: dict[str, LibraryFile] = {}
        #: folders of the file server ("/" always exists)
        self.folders: set[str] = {"/"}
        self.sources: dict[int, Source] = {}
        self.shares: dict[str, Share] = {}
        self.plugins: set[str] = set(PLUGINS)
        #: largest upload accepted (413 above); a test may lower it
        self.max_upload_bytes = 256 * GiB
        #: seconds the import handler waits after creating the source, before it answers (a
        #: test stops a client "during" the import this way)
        self.import_answer_delay = 0.0
        self._next_source = 1
        self._prefix = ""
        self.route_keys: set[str] = set()
        #: route keys answered without a token (the sandbox's gate still injects faults)
        self.public_routes = frozenset({"GET /version"})

    # ------------------------------------------------------------------------ registration

    def routes(self, prefix: str) -> list[BaseRoute]:
        """The Starlette routes, under ``prefix`` (the sandbox's ``/api/v1``)."""
        self._prefix = prefix
        table: list[tuple[str, Handler, list[str]]] = [
            ("/", self._token_check, ["GET"]),
            ("/version", self._version, ["GET"]),
            ("/sources/search", self._search, ["POST"]),
            ("/library/file/upload", self._upload, ["POST"]),
            ("/library/file/import", self._import, ["POST"]),
            ("/sources/lookup", self._lookup, ["GET"]),
            ("/sources/status", self._status, ["GET"]),
            ("/library/metadata", self._metadata, ["POST"]),
            ("/library/share/new", self._share_new, ["POST"]),
            ("/library/share/{share_id}/link", self._share_link, ["GET", "POST"]),
            ("/library/folder/add", self._folder_add, ["POST"]),
            ("/library/share/{share_id}/add", self._share_add, ["POST"]),
        ]
        out: list[BaseRoute] = []
        for path, handler, methods in table:
            route = Route(prefix + path, self._enveloped(handler), methods=methods)
            out.append(route)
            self.route_keys.add(route_key(route, prefix))  # as the sandbox's gate keys it
        return out

    def gate_answer(self, route: str | None, answer: Response) -> Response:
        """The sandbox gate's early answer (fault, refused token) in this API's envelope."""
        if route not in self.route_keys:
            return answer
        try:
            body = json.loads(bytes(answer.body))
        except ValueError:
            body = {}
        text = body.get("error") or body.get("detail") if isinstance(body, dict) else None
        wrapped = envelope(text or "error", status=answer.status_code)
        retry_after = answer.headers.get("retry-after")
        if retry_after is not None:
            wrapped.headers["Retry-After"] = retry_after
        return wrapped

    def _enveloped(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                message = await handler(request)
            except LegacyError as exc:
                return envelope(exc.message, status=exc.status, started=started)
            except ClientDisconnect:
                return Response(status_code=400)  # the client is gone; nobody reads this
            except Exception as exc:  # the envelope holds even for the sandbox's own bugs
                return envelope(internal_error_message(exc), status=500, started=started)
            return envelope(message, started=started)

        return endpoint

    # ---------------------------------------------------------------------- introspection

    def file_bytes(self, path: str) -> bytes:
        """The stored bytes of a library file (for tests; blocking). KeyError if absent."""
        return self.files[path].disk_path.read_bytes()

    def source_for(self, path: str) -> Source | None:
        """The source of a library path, if it was imported."""
        for source in self.sources.values():
            if source.path == path:
                return source
        return None

    # ---------------------------------------------------------------------------- helpers

    def _root(self) -> Path:
        return self.config.data_dir / "library"

    @staticmethod
    def _clean_path(value: object, what: str) -> str:
        """An absolute library path, normalised; LegacyError 400 when it is not acceptable."""
        if not isinstance(value, str) or not value.strip():
            raise LegacyError(400, f"{what} must be a non-empty string")
        if len(value) > _MAX_PATH:
            raise LegacyError(400, f"{what} is longer than {_MAX_PATH} characters")
        if "\x00" in value or "\\" in value:
            raise LegacyError(400, f"{what} must not contain NUL or backslashes")
        if not value.startswith("/"):
            raise LegacyError(400, f"{what} must be absolute (start with '/'): {value!r}")
        parts = [p for p in value.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise LegacyError(400, f"{what} must not contain '.' or '..': {value!r}")
        return "/" + "/".join(parts)

    @staticmethod
    def _clean_name(value: str | None) -> str:
        if not value or value in (".", ".."):
            raise LegacyError(400, "the 'file' field needs a file name")
        if "/" in value or "\\" in value or "\x00" in value:
            raise LegacyError(400, f"invalid file name {value!r}")
        if len(value.encode("utf-8", "surrogatepass")) > _MAX_NAME:
            raise LegacyError(400, f"file name longer than {_MAX_NAME} bytes")
        return value

    @staticmethod
    async def _read_json(request: Request, *, optional: bool = False) -> dict[str, Any]:
        """A JSON object body; with ``optional`` an empty body is an empty object."""
        body = await read_json(request, LegacyError, too_large=413, optional=optional)
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise LegacyError(400, "body must be a JSON object")
        return body

    def _source(self, value: object) -> Source:
        if not is_int(value):
            raise LegacyError(400, "source_id must be an integer")
        source = self.sources.get(value)
        if source is None:
            raise LegacyError(404, f"source {value} not found")
        return source

    def _failure_for(self, path: str) -> str | None:
        glob = self.config.faults.fail_import_glob
        if glob is None:
            return None
        name = PurePosixPath(path).name
        rel = path.lstrip("/")
        if any(fnmatch.fnmatchcase(p, glob) for p in (path, rel, name)):
            return f"Import failed: the plugin could not read {path!r} (injected fault)"
        return None

    # ------------------------------------------------------------------------------ routes

    async def _version(self, request: Request) -> Any:
        return VERSION

    async def _token_check(self, request: Request) -> Any:
        # The gate has checked the token by now; the clients only look at the status code.
        return f"Marple API {VERSION}: token accepted"

    async def _search(self, request: Request) -> Any:
        body = await self._read_json(request)
        unknown = set(body) - {"library_filter"}
        if unknown:
            raise LegacyError(
                400, f"unknown fields {sorted(unknown)}; this server reads library_filter"
            )
        library_filter = body.get("library_filter", {})
        if not isinstance(library_filter, dict):
            raise LegacyError(400, "library_filter must be an object")
        unknown = set(library_filter) - {"path"}
        if unknown:
            raise LegacyError(
                400, f"library_filter: unknown keys {sorted(unknown)}; the sandbox filters on path"
            )
        folder = None
        if "path" in library_filter:
            folder = self._clean_path(library_filter["path"], "library_filter.path").rstrip("/")
        found = []
        for source in self.sources.values():
            if folder is not None and not source.path.startswith(f"{folder}/"):
                continue
            found.append(
                {
                    "source_id": source.id,
                    "path": source.path,
                    "name": PurePosixPath(source.path).name,
                    "plugin": source.plugin,
                    "status": source.status,
                    "metadata": [{"name": k, "value": v} for k, v in source.metadata.items()],
                    "dataset_filter": {"source_id": source.id},
                    # The data's time range: the sandbox parses nothing, so it has none.
                    "timestamp_start": None,
                    "timestamp_stop": None,
                }
            )
        return found

    async def _upload(self, request: Request) -> Any:
        folder = self._clean_path(request.query_params.get("path"), "path")
        raw_length = request.headers.get("content-length")
        if raw_length is None or not raw_length.isdigit():
            raise LegacyError(411, "Content-Length required")
        if int(raw_length) > self.max_upload_bytes + 64 * 1024:
            await drain(request)
            raise LegacyError(413, f"file larger than {self.max_upload_bytes} bytes")
        try:
            parser = FormDataParser(boundary_from_content_type(request.headers.get("content-type")))
        except FormDataError as exc:
            raise LegacyError(400, str(exc)) from exc
        sink: files.AtomicSink | None = None
        name: str | None = None
        in_file = file_done = committed = no_folder = False
        owed_sleep = 0.0
        try:
            async for chunk in request.stream():
                for event in parser.feed(chunk):
                    if isinstance(event, PartStart):
                        # Only the first `file` field counts; other fields are ignored.
                        in_file = event.name == "file" and sink is None and not no_folder
                        if in_file:
                            name = self._clean_name(event.filename)
                            if folder not in self.folders:
                                # Read the rest (the client gets our answer), store nothing.
                                in_file, no_folder = False, True
                                continue
                            target = self._root() / folder.lstrip("/") / name
                            sink = files.AtomicSink(target)
                            await sink.open()
                    elif isinstance(event, PartData) and in_file:
                        assert sink is not None
                        await sink.write(event.data)
                        if sink.size > self.max_upload_bytes:
                            raise LegacyError(413, f"file larger than {self.max_upload_bytes}")
                        # The file server is this API's storage: the storage delay applies.
                        owed_sleep = await storage_delay(
                            self.config.faults, owed_sleep, len(event.data)
                        )
                    elif isinstance(event, PartEnd) and in_file:
                        in_file = False
                        file_done = True
            parser.close()
            if no_folder:
                raise LegacyError(
                    404,
                    f"no folder {folder!r} on the file server; create it first with "
                    "POST /library/folder/add",
                )
            if sink is None or not file_done or name is None:
                raise LegacyError(400, "missing 'file' field")
            await sink.commit()
            committed = True
        except FormDataError as exc:
            raise LegacyError(400, f"malformed multipart body: {exc}") from exc
        finally:
            if sink is not None and not committed:
                await sink.discard()
        path = f"{folder.rstrip('/')}/{name}"
        old = self.files.get(path)
        self.files[path] = LibraryFile(
            path=path,
            size=sink.size,
            disk_path=sink.target,
            uploads=1 if old is None else old.uploads + 1,
        )
        return {"status": "OK", "path": folder.lstrip("/")}

    async def _import(self, request: Request) -> Any:
        body = await self._read_json(request)
        path = self._clean_path(body.get("path"), "path")
        plugin = body.get("plugin")
        if not isinstance(plugin, str) or not plugin:
            raise LegacyError(400, "plugin must be a non-empty string")
        if plugin not in self.plugins:
            known = ", ".join(sorted(self.plugins))
            raise LegacyError(400, f"unknown plugin {plugin!r}; this server has: {known}")
        if path not in self.files:
            raise LegacyError(404, f"no file {path!r} on the file server")
        seconds = self.config.import_seconds
        failure = self._failure_for(path)
        source = self.source_for(path)
        if source is None:
            source = Source(
                id=self._next_source,
                path=path,
                plugin=plugin,
                import_seconds=seconds,
                failure=failure,
            )
            self._next_source += 1
            self.sources[source.id] = source
        else:
            source.restart_import(plugin, seconds, failure)
        held = time.monotonic()
        # Re-read each time: a test that lowers the delay lets a held answer go at once.
        while time.monotonic() - held < self.import_answer_delay:
            await anyio.sleep(0.02)
        metadata = [{"name": k, "value": v} for k, v in source.metadata.items()]
        return {"source_id": source.id, "metadata": metadata}

    async def _lookup(self, request: Request) -> Any:
        path = self._clean_path(request.query_params.get("path"), "path")
        source = self.source_for(path)
        if source is None:
            raise LegacyError(404, f"no source for {path!r}")
        return {"source_id": source.id, "path": source.path}

    async def _status(self, request: Request) -> Any:
        raw = request.query_params.getlist("id")
        if not raw:
            raise LegacyError(400, "id is required (repeat it for several sources: id=1&id=2)")
        if len(raw) > _MAX_STATUS_IDS:
            raise LegacyError(400, f"at most {_MAX_STATUS_IDS} ids per request")
        try:
            ids = [int(value) for value in raw]
        except ValueError as exc:
            raise LegacyError(400, "every id must be an integer") from exc
        answer = []
        for source_id in dict.fromkeys(ids):
            source = self.sources.get(source_id)
            if source is None:
                continue
            entry: dict[str, Any] = {"source_id": source.id, "status": source.status}
            if entry["status"] == IMPORT_FAILED:
                entry["message"] = source.failure
            answer.append(entry)
        return answer

    async def _metadata(self, request: Request) -> Any:
        body = await self._read_json(request)
        entries = body.get("metadata")
        if not isinstance(entries, list):
            raise LegacyError(400, "metadata must be a list of {name, value} objects")
        updates: dict[str, Any] = {}
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"name", "value"}:
                raise LegacyError(400, "each metadata entry must be {name, value}")
            name, value = entry["name"], entry["value"]
            if not isinstance(name, str) or not name.strip():
                raise LegacyError(400, "metadata names must be non-empty strings")
            if not (value is None or isinstance(value, str | int | float | bool)):
                raise LegacyError(400, f"metadata {name!r}: value must be a string or a number")
            updates[name] = value
        # The body is checked before the source is looked for: a malformed request is a 400.
        if "source_id" in body:
            source = self._source(body["source_id"])
        else:
            path = self._clean_path(body.get("path"), "source_id or path")
            found = self.source_for(path)
            if found is None:
                raise LegacyError(404, f"no source for {path!r}")
            source = found
        source.metadata.update(updates)
        return {"source_id": source.id, "status": "OK"}

    def _share_body(self, body: dict[str, Any], workbook: object) -> tuple[str, list[int]]:
        """``workbook_name`` (``workbook`` when absent) and ``source_ids`` of a share request,
        every id an existing source; LegacyError otherwise."""
        workbook = body.get("workbook_name", workbook)
        if not isinstance(workbook, str) or not workbook.strip():
            raise LegacyError(400, "workbook_name must be a non-empty string")
        ids = body.get("source_ids")
        if not isinstance(ids, list) or not ids or not all(is_int(i) for i in ids):
            raise LegacyError(400, "source_ids must be a non-empty list of integers")
        for source_id in ids:
            self._source(source_id)
        return workbook, list(ids)

    async def _share_new(self, request: Request) -> Any:
        workbook, ids = self._share_body(await self._read_json(request), None)
        share = Share(id=secrets.token_hex(8), workbook=workbook, source_ids=ids)
        self.shares[share.id] = share
        return share.id

    async def _folder_add(self, request: Request) -> Any:
        body = await self._read_json(request)
        parent = self._clean_path(body.get("path"), "path")
        name = body.get("new_folder_name")
        if not isinstance(name, str) or not name.strip():
            raise LegacyError(400, "new_folder_name must be a non-empty string")
        if name in (".", "..") or any(c in name for c in "/\\\x00"):
            raise LegacyError(400, f"invalid folder name {name!r}")
        if len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME:
            raise LegacyError(400, f"folder name longer than {_MAX_NAME} bytes")
        if parent not in self.folders:
            raise LegacyError(404, f"no folder {parent!r} to create {name!r} in")
        path = f"{parent.rstrip('/')}/{name}"
        if path in self.folders:
            raise LegacyError(409, f"folder {path!r} already exists")
        if path in self.files:
            raise LegacyError(409, f"{path!r} is a file")
        self.folders.add(path)  # before the await: a concurrent request sees it exists
        await anyio.Path(self._root() / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        return {"status": "OK", "path": path}

    async def _share_add(self, request: Request) -> Any:
        share = self.shares.get(request.path_params["share_id"])
        if share is None:
            raise LegacyError(404, "share not found")
        # "change project for this share": the workbook is optional here.
        workbook, ids = self._share_body(await self._read_json(request), share.workbook)
        merged = list(dict.fromkeys([*share.source_ids, *ids]))
        added = Share(id=secrets.token_hex(8), workbook=workbook, source_ids=merged)
        self.shares[added.id] = added
        return added.id

    async def _share_link(self, request: Request) -> Any:
        share = self.shares.get(request.path_params["share_id"])
        if share is None:
            raise LegacyError(404, "share not found")
        base: object = request.query_params.get("url")
        if request.method == "POST":
            base = (await self._read_json(request, optional=True)).get("url", base)
        if base is not None and not (isinstance(base, str) and base.startswith("http")):
            raise LegacyError(400, "url must be an http(s) URL")
        share.links += 1
        root = str(base).rstrip("/") if base else self._origin()
        return f"{root}/?share={share.id}"
