"""A strict local Marple DB: the API of docs/marple-db-contract.md, storage, and faults.

Used by the tests, the demo and `inboxd sandbox`:

    with running_sandbox(SandboxConfig(data_dir=tmp_path)) as sb:
        httpx.get(f"{sb.url}/streams", headers={"Authorization": f"Bearer {sb.config.token}"})

Layout: `config` (settings and CLI options), `models` (datasets, ingestions, request log),
`app` (the ASGI app and its routes), `injection` (lost responses, canned errors), `server`
(running it), `signing` (signed URLs, Azure SAS), `backends` (S3 and Azure), `formdata` and
`files` (streaming bodies to disk).
"""

from __future__ import annotations

from daemon.sandbox.app import Sandbox
from daemon.sandbox.config import (
    Faults,
    SandboxConfig,
    StreamDef,
    add_sandbox_arguments,
    build_parser_args_into_config,
    config_from_args,
)
from daemon.sandbox.models import Dataset, Ingestion, RequestRecord
from daemon.sandbox.server import ready_message, running_sandbox, serve_forever

__all__ = [
    "Dataset",
    "Faults",
    "Ingestion",
    "RequestRecord",
    "Sandbox",
    "SandboxConfig",
    "StreamDef",
    "add_sandbox_arguments",
    "build_parser_args_into_config",
    "config_from_args",
    "ready_message",
    "running_sandbox",
    "serve_forever",
]
