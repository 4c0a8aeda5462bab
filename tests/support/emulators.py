"""Storage emulators for tests: moto's S3 server and Azurite, with request logs and helpers.

``tests/conftest.py`` imports the fixtures, so every test module can ask for them:

* ``moto_s3`` - an in-process moto S3 server (one per module, reset around every test) whose
  ``requests`` list records every request it received (method, path, query, headers, status).
* ``azurite`` - an Azurite blob service (one per module) started from
  ``node_modules/.bin/azurite-blob`` (``npm ci`` installs it) or ``$INBOXD_AZURITE_BIN``.
  Missing locally: the tests are skipped with the reason. Missing in CI (``$CI`` set): they fail.

Both servers listen on 127.0.0.1 on a free port. Facts about them: shared/docs/test-rig-notes.md.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from daemon.sandbox.config import AZURITE_DEV_KEY
from daemon.sandbox.signing import account_sas, blob_sas
from tests.support.waits import wait_for

# moto reads this when it is first imported; conftest.py sets it too.
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", "1024")

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE_ACCOUNT = "devstoreaccount1"
#: The x-ms-version the helpers below send (Azurite runs with --skipApiVersionCheck).
AZURE_VERSION = "2023-11-03"
START_TIMEOUT = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller must cope with losing a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------- moto S3


@dataclass
class S3Request:
    """One request moto received."""

    method: str
    path: str
    query: dict[str, list[str]]
    #: Header names in lower case.
    headers: dict[str, str]
    status: int | None = None

    @property
    def presigned(self) -> bool:
        """Authorised by a presigned query string (what inboxd sends), not by a header."""
        return "X-Amz-Signature" in self.query

    @property
    def part_number(self) -> int | None:
        values = self.query.get("partNumber")
        return int(values[0]) if values else None

    def text(self) -> str:
        """Everything of the request but its body, to search for leaked secrets."""
        query = "&".join(f"{k}={v}" for k, vs in self.query.items() for v in vs)
        heads = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
        return f"{self.method} {self.path}?{query}\n{heads}"


class _RequestLog:
    """WSGI middleware that records every request before moto sees it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.records: list[S3Request] = []
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        headers = {
            key[5:].replace("_", "-").lower(): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = str(environ[key])
        record = S3Request(
            method=str(environ["REQUEST_METHOD"]),
            path=str(environ.get("PATH_INFO", "")),
            query=parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True),
            headers=headers,
        )
        with self._lock:
            self.records.append(record)

        def recording_start_response(status: str, *args: Any) -> Any:
            record.status = int(status.split()[0])
            return start_response(status, *args)

        return self.app(environ, recording_start_response)

    def clear(self) -> None:
        with self._lock:
            self.records.clear()


@dataclass
class MotoS3:
    """A running moto S3 server."""

    endpoint: str
    _log: _RequestLog = field(repr=False)

    @property
    def requests(self) -> list[S3Request]:
        """Every request since the last reset, oldest first (a snapshot)."""
        return list(self._log.records)

    def client(self) -> Any:
        """A boto3 S3 client for checks from the test side (blocking calls)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # the emulator's dummy credentials
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def reset(self) -> None:
        """Forget every bucket and object (moto keeps them in memory) and the request log."""
        httpx.post(f"{self.endpoint}/moto-api/reset", timeout=10).raise_for_status()
        self._log.clear()
        # moto keeps request bodies alive until the garbage collector runs.
        gc.collect()


@contextmanager
def moto_s3_server() -> Iterator[MotoS3]:
    """Run moto's S3 server in this process on 127.0.0.1 and a free port."""
    from moto import settings
    from moto.server import ThreadedMotoServer

    if settings.S3_UPLOAD_PART_MIN_SIZE > 64 * 1024:
        raise RuntimeError(
            "moto was imported before S3_UPLOAD_PART_MIN_SIZE was set: parts under "
            f"{settings.S3_UPLOAD_PART_MIN_SIZE} bytes would be refused"
        )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        # Put the request log in front of moto's WSGI app (no request has been served yet).
        wsgi_server = getattr(server, "_server", None)
        if wsgi_server is None or not hasattr(wsgi_server, "app"):
            raise RuntimeError("this moto version's ThreadedMotoServer has no WSGI server to wrap")
        log = _RequestLog(wsgi_server.app)
        wsgi_server.app = log
        host, port = server.get_host_and_port()
        moto = MotoS3(endpoint=f"http://{host}:{port}", _log=log)
        wait_for(lambda: _port_open(host, port), START_TIMEOUT, "moto accepting connections")
        yield moto
    finally:
        server.stop()
        gc.collect()


@pytest.fixture(scope="module")
def moto_s3_server_for_module() -> Iterator[MotoS3]:
    with moto_s3_server() as moto:
        yield moto


@pytest.fixture
def moto_s3(moto_s3_server_for_module: MotoS3) -> Iterator[MotoS3]:
    """The module's moto server, empty at the start of the test and reset after it.

    moto's state is global to the process: a reset also empties any other in-process moto.
    """
    moto_s3_server_for_module.reset()
    yield moto_s3_server_for_module
    moto_s3_server_for_module.reset()


# ---------------------------------------------------------------------------------- Azurite


@dataclass
class Azurite:
    """A running Azurite blob service with the well-known development account."""

    host: str
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def account_url(self) -> str:
        return f"http://{self.host}:{self.port}/{AZURITE_ACCOUNT}"

    def blob_url(self, container: str, blob: str, permissions: str = "r", ttl: float = 300) -> str:
        """A SAS URL of ``blob`` (unencoded name) in ``container``."""
        from urllib.parse import quote

        sas = blob_sas(
            account_name=AZURITE_ACCOUNT,
            account_key=AZURITE_DEV_KEY,
            container=container,
            blob=blob,
            permissions=permissions,
            expiry=time.time() + ttl,
        )
        return f"{self.account_url}/{container}/{quote(blob, safe='/')}?{sas}"

    def delete_container(self, container: str) -> None:
        """Delete a container and its blobs (frees Azurite's memory); missing is fine."""
        sas = account_sas(
            account_name=AZURITE_ACCOUNT,
            account_key=AZURITE_DEV_KEY,
            permissions="d",
            resource_types="c",
            expiry=time.time() + 300,
        )
        answer = httpx.delete(
            f"{self.account_url}/{container}?restype=container&{sas}",
            headers={"x-ms-version": AZURE_VERSION},
            timeout=30,
        )
        if answer.status_code not in (202, 404):
            raise RuntimeError(f"Delete Container answered {answer.status_code}: {answer.text}")

    async def block_list(self, read_url: str) -> BlockList:
        """Get Block List (committed and uncommitted) of the blob behind a readable SAS URL."""
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.get(
                f"{read_url}&comp=blocklist&blocklisttype=all",
                headers={"x-ms-version": AZURE_VERSION},
            )
        if answer.status_code != 200:
            raise RuntimeError(f"Get Block List answered {answer.status_code}: {answer.text}")
        return parse_block_list(answer.content)

    async def put_blocks(self, write_url: str, blocks: Iterable[tuple[str, bytes]]) -> None:
        """Put Block each (id, data) to the blob behind a writable SAS URL (left uncommitted)."""
        from urllib.parse import quote

        async with httpx.AsyncClient(timeout=30) as client:
            for block_id, data in blocks:
                answer = await client.put(
                    f"{write_url}&comp=block&blockid={quote(block_id, safe='')}",
                    content=data,
                    headers={"x-ms-version": AZURE_VERSION},
                )
                if answer.status_code != 201:
                    raise RuntimeError(f"Put Block answered {answer.status_code}: {answer.text}")

    async def blob_properties(self, read_url: str) -> httpx.Response:
        """Get Blob Properties (HEAD) of the blob behind a readable SAS URL."""
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.head(read_url, headers={"x-ms-version": AZURE_VERSION})


@dataclass(frozen=True)
class Block:
    """One block of a block blob, as Get Block List reports it."""

    id: str
    size: int


@dataclass(frozen=True)
class BlockList:
    committed: list[Block]
    uncommitted: list[Block]


def parse_block_list(xml: bytes) -> BlockList:
    """Parse a Get Block List answer."""
    root = ET.fromstring(xml)  # noqa: S314 - the answer of our own local emulator

    def blocks(section: str) -> list[Block]:
        node = root.find(section)
        if node is None:
            return []
        return [
            Block(id=b.findtext("Name") or "", size=int(b.findtext("Size") or -1))
            for b in node.findall("Block")
        ]

    return BlockList(blocks("CommittedBlocks"), blocks("UncommittedBlocks"))


def azurite_binary() -> Path:
    """``$INBOXD_AZURITE_BIN``, else the one ``npm ci`` installs into node_modules."""
    configured = os.environ.get("INBOXD_AZURITE_BIN")
    if configured:
        found = shutil.which(configured)
        return Path(found) if found else Path(configured)
    return REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"


@contextmanager
def azurite_server(binary: Path, host: str = "127.0.0.1") -> Iterator[Azurite]:
    """Run ``azurite-blob`` in memory on a free port; stop it afterwards."""
    with tempfile.TemporaryDirectory(prefix="inboxd-azurite-") as workdir:
        output = Path(workdir) / "azurite.log"
        process: subprocess.Popen[bytes] | None = None
        try:
            for attempt in range(3):
                port = free_port(host)
                with output.open("wb") as out:
                    process = subprocess.Popen(
                        [
                            str(binary),
                            "--blobHost",
                            host,
                            "--blobPort",
                            str(port),
                            "--inMemoryPersistence",
                            "--skipApiVersionCheck",
                            "--disableTelemetry",
                            "--silent",
                        ],
                        cwd=REPO_ROOT,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                proc = process
                wait_for(
                    lambda: proc.poll() is not None or _port_open(host, port),  # noqa: B023
                    START_TIMEOUT,
                    f"Azurite listening on {host}:{port}",
                )
                if process.poll() is None:
                    yield Azurite(host=host, port=port, process=process)
                    return
                text = output.read_text(errors="replace")
                if "EADDRINUSE" in text and attempt < 2:
                    continue  # lost the race for the free port: try another one
                raise RuntimeError(
                    f"Azurite ({binary}) exited with {process.returncode} during start-up:\n{text}"
                )
        finally:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


def require_azurite() -> Path:
    """The Azurite binary; skips the test locally when missing, fails it in CI."""
    binary = azurite_binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        reason = (
            f"Azurite is not installed ({binary} not found): run `npm ci` in {REPO_ROOT} "
            "or set INBOXD_AZURITE_BIN"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it (.ci/run runs `npm ci`)", pytrace=False)
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    """Azurite for the module (skipped locally when not installed, failed in CI)."""
    with azurite_server(require_azurite()) as server:
        yield server
