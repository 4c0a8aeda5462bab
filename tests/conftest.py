"""Shared fixtures: a real sandbox server over loopback, real files, real SQLite."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from daemon.client import MarpleClient
from daemon.sandbox import Sandbox, SandboxConfig, running_sandbox

# Storage-emulator fixtures (moto's S3 server, Azurite), shared by every test module.
from tests.emulators import azurite, moto_s3, moto_s3_server_for_module  # noqa: F401

MiB = 1024 * 1024
TOKEN = "test-token-s3cr3t-value"

# The official SDK's test needs marpledata (pandas, pyarrow...), which lives in its own venv
# (.ci/sdk.sh makes .venv-sdk and runs tests/sdk there); any other venv leaves the folder out.
collect_ignore = [] if importlib.util.find_spec("marple") else ["sdk"]


@pytest.fixture
def sandbox_config(tmp_path: Path) -> SandboxConfig:
    """Small thresholds so every mode is reachable with small files."""
    return SandboxConfig(
        data_dir=tmp_path / "sandbox",
        token=TOKEN,
        server_max_bytes=64 * 1024,
        single_max_bytes=512 * 1024,
        part_size=256 * 1024,
        import_seconds=0.2,
    )


@pytest.fixture
def sandbox(sandbox_config: SandboxConfig) -> Iterator[Sandbox]:
    with running_sandbox(sandbox_config) as sb:
        yield sb


@pytest.fixture
def client_factory(sandbox: Sandbox):  # type: ignore[no-untyped-def]
    def make(token: str = TOKEN, timeout: float = 10.0) -> MarpleClient:
        return MarpleClient(sandbox.url, SecretStr(token), timeout=timeout)

    return make


def write_file(path: Path, size: int, seed: int = 0) -> bytes:
    """Write ``size`` deterministic pseudo-random bytes; returns them for comparison."""
    import random

    rnd = random.Random(seed)
    data = rnd.randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def content_hash_of(data: bytes, segment: int) -> str:
    """daemon/content.py's content hash of ``data`` cut into ``segment``-byte segments,
    written out here on its own from the definition, to check the daemon's against."""
    import xxhash

    parts = [data[i : i + segment] for i in range(0, len(data), segment)]
    joined = segment.to_bytes(8, "big") + b"".join(xxhash.xxh3_128(p).digest() for p in parts)
    return f"xxh3-128:{segment}:{xxhash.xxh3_128(joined).hexdigest()}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", "1024")
