"""Running the sandbox: in a background thread for tests, or in the foreground for the CLI.

The socket is bound here, before uvicorn starts, so port 0 can be resolved to the real port
and the state (`Sandbox.url`) is correct the moment `running_sandbox` yields. The server thread
has its own event loop, so the context manager works from sync and async tests alike.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from daemon.sandbox.app import Sandbox
from daemon.sandbox.config import SandboxConfig

START_TIMEOUT = 10.0


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 = any free port)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server with a hook that runs once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None):
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self._on_started is not None:
            self._on_started()


def _uvicorn_config(sandbox: Sandbox, *, quiet: bool) -> uvicorn.Config:
    tls_cert, tls_key = sandbox.config.tls_certfile, sandbox.config.tls_keyfile
    return uvicorn.Config(
        sandbox,
        # HTTPS when a certificate is configured (the URLs handed out are then https:// too).
        ssl_certfile=str(tls_cert) if tls_cert is not None else None,
        ssl_keyfile=str(tls_key) if tls_key is not None else None,
        lifespan="off",
        ws="none",
        # In tests the host application owns logging; uvicorn must not reconfigure it.
        log_config=None if quiet else uvicorn.config.LOGGING_CONFIG,
        log_level="warning" if quiet else "info",
        access_log=not quiet,
        timeout_graceful_shutdown=2,
    )


@contextmanager
def running_sandbox(config: SandboxConfig) -> Iterator[Sandbox]:
    """Run a sandbox in a background thread; yield it once it accepts connections."""
    sandbox = Sandbox(config)
    sandbox.prepare()
    sock = _bind(config.host, config.port)
    sandbox.bound(config.host, sock.getsockname()[1])
    server = _Server(_uvicorn_config(sandbox, quiet=True))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="inboxd-sandbox", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the sandbox server thread stopped during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError("the sandbox server did not start in time")
            time.sleep(0.005)
        yield sandbox
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT)
        sock.close()


def ready_message(sb: Sandbox) -> str:
    """What the sandbox serves, and a config snippet for each of inboxd's three services."""
    from daemon.sandbox.dataservice import url_of

    stream = sb.config.streams[0].id if sb.config.streams else 1
    ds = sb.data_service.config
    tls = (
        "# served over HTTPS: set [api] ca_file to the CA that signed --tls-cert\n"
        if sb.config.tls_certfile is not None
        else ""
    )
    return (
        f"# inboxd sandbox at {sb.origin}; data in {sb.config.data_dir}\n"
        "# It serves all three services inboxd delivers to; the config below is for Marple DB.\n"
        "# For another, use the commented block instead. Check it: inboxd check --config FILE\n"
        f"{tls}"
        "[api]\n"
        f'url = "{sb.url}"\n'
        f'token = "{sb.config.token}"\n'
        "\n"
        "[upload]\n"
        f"stream = {stream}\n"
        "\n# The older Marple API (library upload + import):\n"
        f'# [api]\n# kind = "marple"\n# url = "{sb.url}"\n# token = "{sb.config.token}"\n'
        "\n# The spreadsheet data service (OAuth 1.0):\n"
        f'# [api]\n# kind = "data-service"\n# url = "{url_of(sb.origin)}"\n'
        f'# [data_service]\n# consumer_key = "{ds.consumer_key}"\n'
        f'# consumer_secret = "{ds.consumer_secret}"\n# token = "{ds.token}"\n'
        f'# token_secret = "{ds.token_secret}"\n'
    )


def serve_forever(config: SandboxConfig, on_ready: Callable[[Sandbox], None] | None = None) -> None:
    """Serve in the foreground until Ctrl-C / SIGTERM; `on_ready` runs once it listens."""
    sandbox = Sandbox(config)
    sandbox.prepare()
    sock = _bind(config.host, config.port)
    sandbox.bound(config.host, sock.getsockname()[1])

    def started() -> None:
        if on_ready is not None:
            on_ready(sandbox)

    server = _Server(_uvicorn_config(sandbox, quiet=False), on_started=started)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn re-raises the SIGINT it handled gracefully; the server has stopped by now.
        pass
    finally:
        sock.close()
