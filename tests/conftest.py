"""Shared fixtures only: a real sandbox server over loopback, the storage emulators.

What tests import as a library lives in ``tests/support/`` (this module is not imported).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from daemon.delivery.marple_db.client import MarpleClient
from daemon.sandbox import Sandbox, SandboxConfig, running_sandbox
from tests.support.data import TOKEN

# Storage-emulator fixtures (moto's S3 server, Azurite), shared by every test module.
from tests.support.emulators import azurite, moto_s3, moto_s3_server_for_module  # noqa: F401

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


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", "1024")
