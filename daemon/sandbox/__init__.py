"""A strict local Marple DB: the API of docs/marple-db-contract.md, storage, and faults.

Used by the tests, the demo and `inboxd sandbox`:

    with running_sandbox(SandboxConfig(data_dir=tmp_path)) as sb:
        httpx.get(f"{sb.url}/streams", headers={"Authorization": f"Bearer {sb.config.token}"})

Layout: `config` (settings and CLI options), `models` (datasets, ingestions, request log),
`app` (the ASGI app and the Marple DB routes), `legacy` (the older Marple API beside it),
`dataservice` (the spreadsheet data service under /data-service), `common` (what those three
share: the request log, fault gates, route keys, JSON bodies, error answers), `injection`
(lost responses, canned errors), `server` (running it), `signing` (signed URLs, Azure SAS),
`backends` (S3 and Azure), `formdata` and `files` (streaming bodies to disk).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from daemon.sandbox.config import (
    Faults,
    SandboxConfig,
    StreamDef,
    add_sandbox_arguments,
    build_parser_args_into_config,
    config_from_args,
)

if TYPE_CHECKING:
    from daemon.sandbox.app import Sandbox
    from daemon.sandbox.models import Dataset, Ingestion, RequestRecord
    from daemon.sandbox.server import ready_message, running_sandbox, serve_forever

# The server side (starlette, uvicorn) loads on first use: the CLI builds its `sandbox`
# options from the config module on every start, and `inboxd push` should not pay for it.
_LAZY = {
    "Sandbox": "daemon.sandbox.app",
    "Dataset": "daemon.sandbox.models",
    "Ingestion": "daemon.sandbox.models",
    "RequestRecord": "daemon.sandbox.models",
    "ready_message": "daemon.sandbox.server",
    "running_sandbox": "daemon.sandbox.server",
    "serve_forever": "daemon.sandbox.server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'daemon.sandbox' has no attribute {name!r}")


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
