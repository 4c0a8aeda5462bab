"""Security suite (issue #5): secrets stay secret, TLS is verified, state is private, and nothing
outside the inbox is read or moved.

* Token secrecy: a distinctive token goes through a daemon run (a real ``inboxd run`` process,
  debug JSON logs) that takes every upload mode, retries (503/429, storage 503, lost answers),
  a refused token (pause) and back, an import failure, ``status``/``--json``/``retry``,
  ``check`` with a wrong token, failing ``push``-es and config errors with the token in the
  file. Every log byte, every command output, every byte of the state database files and every
  exception text of the client is then searched for the token — plain, URL-encoded,
  base64-encoded (any alignment) and any 16-character fragment of it.
* Storage requests never carry the token, nor our ``X-Request-Source``/``User-Agent``.
* TLS (certificates from ``trustme``): verification is on by default, a private CA works through
  ``api.ca_file``, ``verify_tls = false`` works, a certificate for another host is refused.
* Permissions, checked with a permissive umask (0022): what inboxd itself guarantees for the
  state database, its folders and the archive folders (production adds the unit's UMask=0077).
* Symlinks and odd names: nothing outside the inbox is uploaded, read as metadata, moved or
  deleted; with ``strace`` (skipped when missing) the daemon's opens are checked too.

"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import http.server
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import anyio
import httpx
import pytest
import structlog
import trustme
from pydantic import SecretStr

from daemon.commands import cli
from daemon.config import load_settings
from daemon.delivery.files import FileRef
from daemon.delivery.flow import UploadOptions
from daemon.delivery.marple_db.client import MarpleClient, Stream
from daemon.delivery.marple_db.upload import UploadRequest, upload_file
from daemon.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    InboxdError,
    NotFoundError,
    RateLimitedError,
    RejectedError,
    ServerError,
    StorageError,
    TransportError,
)
from daemon.retry import RetryPolicy
from daemon.sandbox import Faults, Sandbox, SandboxConfig, StreamDef, running_sandbox
from tests.support.data import write_file
from tests.support.runner import REPO, daemon_sections, running_service, write_config, write_toml
from tests.support.waits import wait_for, wait_until

pytestmark = pytest.mark.slow  # about 45 s in all: real daemon processes, strace, emulators

KiB = 1024
FAST = RetryPolicy(attempts=6, base=0.01, cap=0.1)
STREAM = Stream(id=1, name="inbox", datapool="default")


# ------------------------------------------------------------------------ finding a secret


def new_secret(label: str = "tok") -> str:
    """A token nobody could confuse with anything else: ``tok-`` + 40 random hex digits."""
    return f"{label}-{secrets.token_hex(20)}"


def secret_forms(secret: str) -> dict[str, str]:
    """Every way the secret could show up: plain, URL/form-encoded, base64 (each alignment,
    standard and URL-safe alphabet, only the characters that depend on the secret alone) and
    every 16-character fragment of its random part (a truncated leak is still a leak)."""
    raw = secret.encode()
    forms = {"plain": secret, "url-encoded": quote(secret, safe=""), "form": quote_plus(secret)}
    for shift in range(3):
        for name, encode in (
            ("base64", base64.b64encode),
            ("base64url", base64.urlsafe_b64encode),
        ):
            text = encode(b"\0" * shift + raw).decode()
            first = -(-8 * shift // 6)  # the first character made of secret bits only
            end = 8 * (shift + len(raw)) // 6  # past the last one
            forms[f"{name}@{shift}"] = text[first:end]
    tail = secret.split("-", 1)[-1]
    for i in range(0, len(tail) - 15, 2):
        forms[f"fragment@{i}"] = tail[i : i + 16]
    return forms


def leaks(data: str | bytes, *secret_values: str) -> list[str]:
    """Which forms of which secrets occur in ``data`` (empty: none)."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    folded = text.lower()
    found = []
    for value in secret_values:
        for name, form in secret_forms(value).items():
            if form in text or (not name.startswith("base64") and form.lower() in folded):
                found.append(f"{name} of {value[:8]}…")
    return found


def assert_secret_free(where: str, data: str | bytes, *secret_values: str) -> None:
    found = leaks(data, *secret_values)
    if found:
        text = data.decode("latin-1") if isinstance(data, bytes) else data
        value = next(v for v in secret_values if leaks(text, v))
        pos = text.find(value[:20]) if value[:20] in text else 0
        context = text[max(0, pos - 120) : pos + 80]
        raise AssertionError(f"the token leaks into {where}: {found[:5]}; context: {context!r}")


def exception_texts(exc: BaseException) -> list[str]:
    """str/repr/args of an exception and of everything chained to it, plus the traceback text."""
    texts = ["".join(traceback.format_exception(exc))]
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        texts += [str(e), repr(e), repr(e.args)]
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return texts


def test_the_leak_scanner_finds_every_form() -> None:
    token = new_secret()
    header = f"Bearer {token}".encode()
    for shift in range(3):  # base64 of the header, whatever bytes come before it
        blob = base64.b64encode(b"x" * shift + header + b"\n").decode()
        assert leaks(f"log line {blob} end", token), shift
        assert leaks(base64.urlsafe_b64encode(b"yy"[:shift] + header), token), shift
    assert leaks(f"url?token={quote(token, safe='')}", token)
    assert leaks(f"truncated: Bearer {token[:25]}…", token)  # a cut-off message
    assert leaks(token.upper().encode("utf-16-le").decode("latin-1").replace("\0", ""), token)
    assert not leaks(secrets.token_bytes(4096), token)
    assert not leaks(new_secret(), token)


# ------------------------------------------------------------------------ processes and files


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without anything that could carry a token or change TLS trust."""
    drop = {"CREDENTIALS_DIRECTORY", "SSL_CERT_FILE", "SSL_CERT_DIR"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("INBOXD_") and k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """An ``inboxd`` command to completion, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env if env is not None else clean_env(),
        check=False,
    )


def run_cli_many(
    commands: dict[str, tuple[list[str], dict[str, str] | None]],
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Several independent commands at once (each is a fresh Python process)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {k: pool.submit(run_cli, *args, env=env) for k, (args, env) in commands.items()}
        return {k: f.result() for k, f in futures.items()}


# ``inboxd run`` with the paused-token probe every 0.5 s instead of 30 s (so a refused token and
# its recovery fit into a test); everything else is the real command line.
_RUN_FAST_PROBE = (
    "import sys\n"
    "import daemon.service.run\n"
    "daemon.service.run.Service.__init__.__kwdefaults__['probe_seconds'] = 0.5\n"
    "from daemon.__main__ import main\n"
    "sys.exit(main())\n"
)


@contextlib.contextmanager
def daemon_process(
    config: Path, log: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUN_FAST_PROBE, "run", "--config", str(config), "--grace", "3"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    try:
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], pid: int | None = None) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid or proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def jobs_by_rel(db: Path) -> dict[str, dict[str, Any]]:
    """rel → the newest job row, read through a separate read-only connection."""
    if not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as c:
        c.row_factory = sqlite3.Row
        try:
            rows = c.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        except sqlite3.DatabaseError:  # being created, not yet migrated
            return {}
    return {os.fsdecode(r["rel"]): dict(r) for r in rows}


def daemon_row(db: Path) -> dict[str, Any] | None:
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as c:
        row = c.execute("SELECT info FROM daemon").fetchone()
    return json.loads(row[0]) if row else None


def state_files(db: Path) -> dict[str, bytes]:
    """Every byte of the database and its -wal/-shm files (those that exist now)."""
    out = {}
    for suffix in ("", "-wal", "-shm"):
        path = db.with_name(db.name + suffix)
        if path.exists():
            out[path.name] = path.read_bytes()
    return out


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tree_snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (symlinks not followed) with its identity and content hash."""
    snap: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            digest = (
                hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            )
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            snap[str(path.relative_to(root))] = (
                stat.S_IFMT(st.st_mode),
                st.st_size,
                0 if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns,  # entries are compared
                st.st_ino,
                digest,
                link,
            )
    return snap


@contextlib.contextmanager
def captured_logs(level: str = "debug") -> Iterator[io.StringIO]:
    """structlog JSON lines of this process into a buffer; the previous set-up is restored."""
    from daemon import logs

    old = structlog.get_config()
    buf = io.StringIO()
    logs.configure(level, "json", stream=buf)
    try:
        yield buf
    finally:
        structlog.configure(**old)


def log_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and "event" in doc:
                events.append(doc)
    return events


# ------------------------------------------------------------------------ TLS material


@dataclass(frozen=True)
class Tls:
    ca: Path  # the private CA (PEM): what api.ca_file names
    server: Path  # cert chain + key for 127.0.0.1 and localhost, signed by ``ca``
    other_host: Path  # cert chain + key for example.org only, signed by ``ca``
    public_ca: Path  # a second CA, standing in for the system's public trust store
    public_server: Path  # cert chain + key for 127.0.0.1, signed by ``public_ca``


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    d = tmp_path_factory.mktemp("tls")
    ca, public = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    public.cert_pem.write_to_path(str(d / "public-ca.pem"))
    for name, issuer, hosts in (
        ("server.pem", ca, ("127.0.0.1", "localhost")),
        ("other-host.pem", ca, ("example.org",)),
        ("public-server.pem", public, ("127.0.0.1", "localhost")),
    ):
        issuer.issue_cert(*hosts).private_key_and_cert_chain_pem.write_to_path(str(d / name))
    return Tls(
        ca=d / "ca.pem",
        server=d / "server.pem",
        other_host=d / "other-host.pem",
        public_ca=d / "public-ca.pem",
        public_server=d / "public-server.pem",
    )


def small_sandbox_config(data_dir: Path, token: str, **kw: Any) -> SandboxConfig:
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "token": token,
        "server_max_bytes": 64 * KiB,
        "single_max_bytes": 512 * KiB,
        "part_size": 256 * KiB,
        "import_seconds": 0.2,
    }
    base.update(kw)
    return SandboxConfig(**base)


# ------------------------------------------------------------------------ a recording server


class _Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str | None, context: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.upstream = upstream
        self.records: list[dict[str, Any]] = []
        self.client = httpx.Client(timeout=30)
        if context is not None:
            # The handshake happens in the handler thread; a refused one only ends that thread.
            self.socket = context.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )
        scheme = "https" if context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # refused TLS handshakes and clients going away are expected here


_HOP = {
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "content-encoding",
}


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Records every request; answers 200 itself, or forwards to ``upstream`` (a proxy)."""

    protocol_version = "HTTP/1.1"
    server: _Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.records.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers.items())}
        )
        if self.server.upstream is None:
            status, headers, content = 200, {"ETag": '"sink"'}, b""
        else:
            forward = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            forward["Accept-Encoding"] = "identity"
            answer = self.server.client.request(
                self.command, self.server.upstream + self.path, headers=forward, content=body
            )
            status, content = answer.status_code, answer.content
            keep = _HOP - ({"content-length"} if self.command == "HEAD" else set())
            headers = {k: v for k, v in answer.headers.items() if k.lower() not in keep}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


@contextlib.contextmanager
def recording_server(
    upstream: str | None = None, certfile: Path | None = None
) -> Iterator[_Recorder]:
    context = None
    if certfile is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(certfile))
    server = _Recorder(upstream, context)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
        server.client.close()


def assert_clean_storage_request(where: str, headers: dict[str, str], *secret_values: str) -> None:
    """No token, no Authorization, and nothing that identifies us beyond httpx's own defaults."""
    lower = {k.lower(): v for k, v in headers.items()}
    assert "authorization" not in lower, f"{where}: storage request carries Authorization"
    assert "x-request-source" not in lower, f"{where}: storage request carries X-Request-Source"
    assert not lower.get("user-agent", "").startswith("inboxd"), f"{where}: our User-Agent"
    assert_secret_free(f"{where} headers", json.dumps(headers), *secret_values)


# ============================================================================ token secrecy


def test_token_never_leaks_end_to_end(tmp_path: Path) -> None:
    token, wrong = new_secret(), new_secret()
    secret_values = (token, wrong)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "token").write_text(token + "\n")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    wrong_file = tmp_path / "wrong-token"
    wrong_file.write_text(wrong + "\n")
    for f in (creds / "token", token_file, wrong_file):
        f.chmod(0o600)
    outputs: dict[str, str] = {}

    def keep(
        label: str, result: subprocess.CompletedProcess[str]
    ) -> subprocess.CompletedProcess[str]:
        outputs[label] = f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    config = small_sandbox_config(tmp_path / "sandbox", token)
    config.faults = Faults(
        seed=5,
        api_503_rate=0.1,
        api_429_rate=0.1,
        retry_after=0.05,
        storage_503_rate=0.15,
        drop_response_rate=0.1,
        fail_import_glob="*bad*",
        # Each kind at least once, whatever the random draws: a 503, a 429, a lost answer.
        fail_next={"POST /ingestion": [503, 429, 0], "PUT storage": [503]},
    )
    inbox, state_db, log = tmp_path / "inbox", tmp_path / "state" / "state.db", tmp_path / "log"
    inbox.mkdir()
    with running_sandbox(config) as sb:
        sections = daemon_sections(tmp_path, sb.url, attempts=6, token_file=token_file)
        sections["inbox"].update(after_upload="archive", archive_path=tmp_path / "archive")
        daemon_config = write_toml(tmp_path / "daemon.toml", sections)
        write_file(inbox / "server.csv", 10 * KiB, 1)
        write_file(inbox / "single.bin", 300 * KiB, 2)
        write_file(inbox / "multi" / "part.mf4", 900 * KiB, 3)
        write_file(inbox / "bad.csv", 2 * KiB, 4)
        (inbox / "empty.csv").write_bytes(b"")
        write_file(inbox / "meta.csv", 3 * KiB, 5)
        (inbox / "meta.csv.meta.json").write_text('{"rig": "r1"}')
        (inbox / "link.csv").symlink_to(inbox / "server.csv")
        status_args = ["status", "--config", str(daemon_config)]

        def counts() -> dict[str, int]:
            out: dict[str, int] = {}
            for row in jobs_by_rel(state_db).values():
                out[row["state"]] = out.get(row["state"], 0) + 1
            return out

        with daemon_process(daemon_config, log, clean_env()) as proc:
            wait_for(
                lambda: counts() == {"done": 4, "failed": 2},
                60,
                "4 files done, bad.csv and empty.csv failed",
            )
            failed = {
                r: row for r, row in jobs_by_rel(state_db).items() if row["state"] == "failed"
            }
            assert {r: row["error_kind"] for r, row in failed.items()} == {
                "bad.csv": "import",
                "empty.csv": "empty_file",
            }, failed
            # The running daemon: neither its environment nor its command line holds the token.
            assert_secret_free(
                "/proc/PID/environ", Path(f"/proc/{proc.pid}/environ").read_bytes(), token
            )
            assert_secret_free(
                "/proc/PID/cmdline", Path(f"/proc/{proc.pid}/cmdline").read_bytes(), token
            )

            # The token is refused (revoked on the server): uploads pause; then it is valid again.
            f = sb.faults
            f.api_503_rate = f.api_429_rate = f.storage_503_rate = f.drop_response_rate = 0.0
            sb.config.token = new_secret("rotated")
            write_file(inbox / "while-paused.csv", 5 * KiB, 6)
            wait_for(lambda: (daemon_row(state_db) or {}).get("paused"), 20, "the daemon to pause")
            results = run_cli_many(
                {
                    "status (paused)": (status_args, None),
                    "status --json (paused)": ([*status_args, "--json"], None),
                }
            )
            for label, result in results.items():
                assert keep(label, result).returncode == 0, result.stderr
            assert "PAUSED" in outputs["status (paused)"]
            sb.config.token = token
            wait_for(
                lambda: jobs_by_rel(state_db).get("while-paused.csv", {}).get("state") == "done",
                20,
                "the paused upload to finish after the token is accepted again",
            )

            # `inboxd retry` after the import problem is fixed.
            f.fail_import_glob = None
            assert (
                "requeued 2"
                in keep(
                    "retry", run_cli("retry", "--config", str(daemon_config), "--all-failed")
                ).stdout
            )
            wait_for(
                lambda: (
                    jobs_by_rel(state_db)["bad.csv"]["state"] == "done"
                    and jobs_by_rel(state_db)["empty.csv"]["state"] == "failed"
                ),
                20,
                "bad.csv to be done after the retry",
            )
            wait_for(
                lambda: all(
                    r["after_upload"]
                    for rel, r in jobs_by_rel(state_db).items()
                    if r["state"] == "done" and rel != "bad.csv"
                ),
                10,
                "the done files to be archived",
            )
            live_db = state_files(state_db)
        assert proc.returncode == 0, log.read_text()[-2000:]
        stopped_db = state_files(state_db)

        # One-shot commands, the token given by $CREDENTIALS_DIRECTORY/token (or a wrong one).
        creds_env = clean_env(CREDENTIALS_DIRECTORY=str(creds))
        creds_config = write_toml(
            tmp_path / "creds.toml",
            {
                "api": {"url": sb.url, "timeout": 5.0},
                # check also checks the folders `run` needs: give it this test's inbox
                "inbox": {"path": str(tmp_path / "inbox")},
                "state": {"path": str(tmp_path / "check-state" / "state.db")},
                "upload": {"stream": 1},
                "log": {"format": "json", "level": "debug"},
            },
        )
        wrong_config = write_toml(
            tmp_path / "wrong.toml",
            {
                "api": {"url": sb.url, "token_file": wrong_file, "timeout": 5.0},
                "upload": {"stream": 1},
            },
        )
        push_dir = tmp_path / "push"
        push_dir.mkdir()
        write_file(push_dir / "rejected.csv", 4 * KiB, 8)
        write_file(push_dir / "lost.bin", 200 * KiB, 9)
        (push_dir / "empty.csv").write_bytes(b"")
        push = ["push", "--config", str(creds_config)]
        results = run_cli_many(
            {
                "check": (["check", "--config", str(creds_config)], creds_env),
                "check (wrong token)": (["check", "--config", str(wrong_config)], None),
                "push (missing, empty)": (
                    [*push, str(push_dir / "nope.csv"), str(push_dir / "empty.csv")],
                    creds_env,
                ),
            }
        )
        for label, result in results.items():
            keep(label, result)
        assert results["check"].returncode == 0, outputs["check"]
        assert results["check (wrong token)"].returncode == 1
        assert "403" in results["check (wrong token)"].stdout
        # A missing FILE is refused before anything is sent (66, EX_NOINPUT).
        assert results["push (missing, empty)"].returncode == 66
        # The first file is refused (400); the second loses answers and gets through anyway.
        sb.faults.fail_next = {
            "POST /ingestion": [400],
            "POST /ingestion/{id}/upload/complete": [0],
            "PUT storage": [503, 0],
        }
        pushed = keep(
            "push --json (rejected, lost answers)",
            run_cli(
                *push, "--json", str(push_dir / "rejected.csv"), str(push_dir / "lost.bin"),
                env=creds_env,
            ),
        )  # fmt: skip
        assert pushed.returncode == 1, pushed.stdout + pushed.stderr
        rows = {Path(r["file"]).name: r for r in json.loads(pushed.stdout)["files"]}
        assert "400" in rows["rejected.csv"]["error"]
        assert rows["lost.bin"]["error"] is None and rows["lost.bin"]["mode"] == "single"

    # Config errors with the token in the file (or the environment) name keys, never the value.
    tok = f'token = "{token}"'
    bad_configs = {
        "unknown key holding it": f'[api]\n{tok}\ncolour = "{token}"\n[upload]\nworkers = 0\n',
        "token of the wrong type": f'[api]\ntoken = ["{token}"]\n',
        "token as a table": f'[api]\ntoken = {{ value = "{token}" }}\n',
        "unterminated string": f'[api]\ntoken = "{token}\n',
        "bare token": f"[api]\ntoken = {token}\n",
        "token twice": f"[api]\n{tok}\n{tok}\n",
        "bad url and ca_file": f'[api]\n{tok}\nurl = "ftp://x"\nca_file = "/no/ca.pem"\n',
        "token_file, bad retry": f'[api]\ntoken_file = "{token_file}"\n[retry]\ncap_seconds = 0\n',
    }
    for label, text in bad_configs.items():
        path = tmp_path / f"bad-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(text)
        for command in ("check", "run", "push", "status"):
            argv = [command, "--config", str(path)] + (["x.csv"] if command == "push" else [])
            status, out = _main_in_process(argv)
            outputs[f"{command}: {label}"] = f"rc={status}\n{out}"
            assert status == 78, (label, command, out)
    env_case = run_cli(  # as systemd would start it, with Environment= lines
        "run",
        env=clean_env(
            INBOXD_API__TOKEN=token, INBOXD_UPLOAD__WORKERS="0", INBOXD_API__URL="ftp://x"
        ),
    )
    keep("env config error", env_case)
    assert env_case.returncode == 78, env_case.stderr

    # ---- the scan
    log_bytes = log.read_bytes()
    assert_secret_free("the daemon's log", log_bytes, *secret_values)
    for label, text in outputs.items():
        assert_secret_free(f"the output of `inboxd {label}`", text, *secret_values)
    for when, files in (("running", live_db), ("stopped", stopped_db)):
        assert files, when
        for name, data in files.items():
            assert_secret_free(f"{name} ({when})", data, *secret_values)
    # What inboxd sent: the token only ever in the API's Authorization header.
    for r in sb.requests:
        where = f"{r.method} {r.path}"
        assert_secret_free(f"query of {where}", r.query, *secret_values)
        others = {k: v for k, v in r.headers.items() if k.lower() != "authorization"}
        assert_secret_free(f"headers of {where}", json.dumps(others), *secret_values)
        if r.kind == "storage":
            assert_clean_storage_request(where, r.headers, *secret_values)
    for ds in sb.datasets.values():
        assert_secret_free(
            f"metadata of dataset {ds.path}", json.dumps(ds.metadata), *secret_values
        )
    for ing in sb.ingestions.values():
        assert_secret_free("an abort reason", ing.abort_reason or "", *secret_values)

    # The run went through every path it was meant to.
    events = {e["event"] for e in log_events(log_bytes.decode())}
    expected_events = {
        "retry", "daemon.resumed", "import.failed", "import.done", "after_upload.archived",
        "watcher.skip", "ingestion.created", "upload.done",
    }  # fmt: skip
    log_text = log_bytes.decode(errors="replace")
    odd = [line for line in log_text.splitlines() if not line.startswith("{")]
    bad = [line for line in log_text.splitlines() if "bad.csv" in line]
    assert expected_events <= events, (expected_events - events, odd[:20], bad[-20:])
    assert any(e.get("level") == "debug" for e in log_events(log_bytes.decode()))
    modes = {i.mode for i in sb.ingestions.values()}
    assert {"server", "single", "multipart"} <= modes
    assert any(r.dropped for r in sb.requests), "no lost answer was injected"
    assert any(r.status in (429, 503) for r in sb.requests)
    storage = [r for r in sb.requests if r.kind == "storage"]
    assert len(storage) >= 5
    # Sanity: our headers do reach the API, so their absence from storage means something.
    assert any(
        "x-request-source" in {k.lower() for k in r.headers} for r in sb.requests if r.kind == "api"
    )


def _main_in_process(argv: list[str]) -> tuple[int, str]:
    """``inboxd ARGV`` in this process (config errors stop before any logging set-up)."""
    from daemon.service import signals

    out, err = io.StringIO(), io.StringIO()
    # `inboxd run` records SIGTERM/SIGINT from its first line on: give pytest its handlers back.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(argv)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signals.early.clear()
    return status, out.getvalue() + err.getvalue()


async def test_client_exceptions_never_carry_the_token(tmp_path: Path) -> None:
    token = new_secret()
    failures: dict[str, BaseException] = {}

    async def fails(label: str, call: Callable[[], Any], kind: type[BaseException]) -> None:
        with pytest.raises(kind) as info:
            await call()
        failures[label] = info.value

    config = small_sandbox_config(tmp_path / "sb", token)
    with running_sandbox(config) as sb:
        async with MarpleClient(sb.url, SecretStr(token), timeout=2) as client:
            expected = {
                400: RejectedError, 404: NotFoundError, 409: ConflictError,
                429: RateLimitedError, 500: ServerError, 503: ServerError, 0: TransportError,
            }  # fmt: skip
            sb.faults.fail_next = {"GET /streams": list(expected)}
            for status, kind in expected.items():
                await fails(f"GET /streams -> {status or 'lost answer'}", client.streams, kind)
            # Storage: a 503, a refused signature, a connection that fails.
            data = write_file(tmp_path / "single.bin", 100 * KiB)
            ing = await client.create_ingestion(
                stream_id=1, dataset_name="single.bin", file_size=len(data)
            )
            assert ing.presigned_url is not None
            signed = ing.presigned_url
            sb.faults.fail_next = {"PUT storage": [503]}
            await fails("storage 503", lambda: client.storage_put(signed, data), StorageError)
            tampered = re.sub(r"([?&]sig=)[^&]+", r"\1AAAA", signed)
            assert tampered != signed
            await fails("storage 403", lambda: client.storage_put(tampered, data), StorageError)
            assert [
                getattr(failures[k], "status", None) for k in ("storage 503", "storage 403")
            ] == [
                503,
                403,
            ]
            # A lot of the texts below would carry the signed URL's query if it were not redacted.
            query = signed.split("?", 1)[1]
        async with MarpleClient(sb.url, SecretStr(new_secret("revoked")), timeout=2) as refused:
            await fails("GET /streams with a refused token", refused.streams, AuthError)

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/api/v1"
    closed.close()
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}/api/v1"
        async with MarpleClient(silent_url, SecretStr(token), timeout=0.3) as slow:
            await fails("read timeout", slow.health, TransportError)
    async with MarpleClient(dead_url, SecretStr(token), timeout=1) as dead:
        await fails("connection refused", dead.health, TransportError)
        await fails(
            "storage connection refused",
            lambda: dead.storage_put(dead_url + "/x?sig=abc", b"data"),
            StorageError,
        )
    assert len(failures) == 13
    for label, exc in failures.items():
        for text in exception_texts(exc):
            assert_secret_free(f"the exception of {label}", text, token)
            assert query not in text, f"{label}: the signed URL's query is in {text!r}"


async def test_token_that_is_not_a_valid_header_value_is_not_echoed(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    token = new_secret()
    token_file = tmp_path / "token"
    token_file.write_text(f"{token}\n# rotated 2026-11-01\n")  # a second line, e.g. a note
    config = write_toml(
        tmp_path / "c.toml", {"api": {"url": sandbox.url, "token_file": token_file}}
    )
    texts: list[str] = []
    try:
        settings = load_settings(config, require_token=True)
    except ConfigError as exc:
        texts += exception_texts(exc)  # refusing such a token up front is a fine fix
    else:
        async with MarpleClient.from_settings(settings.api) as client:
            with pytest.raises(InboxdError) as info:
                await client.streams()
        texts += exception_texts(info.value)
    for text in texts:
        assert_secret_free("the error for a malformed token", text, token)


async def test_server_echoing_the_token_does_not_put_it_into_errors() -> None:
    token = new_secret()

    def echo(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        body = json.dumps({"detail": f"token refused: {auth}"}).encode()
        # An unread stream, as from the network (the client reads answers with aiter_raw).
        return httpx.Response(
            403, headers={"Content-Type": "application/json"}, stream=httpx.ByteStream(body)
        )

    client = MarpleClient(
        "https://api.example/api/v1", SecretStr(token), transport=httpx.MockTransport(echo)
    )
    async with client:
        with pytest.raises(AuthError) as info:
            await client.streams()
    for text in exception_texts(info.value):
        assert_secret_free("an AuthError built from an echoing server", text, token)


def test_config_error_for_a_whole_api_section_hides_the_token(tmp_path: Path) -> None:
    token = new_secret()
    path = tmp_path / "c.toml"
    path.write_text(f'[[api]]\ntoken = "{token}"\n')
    status, out = _main_in_process(["check", "--config", str(path)])
    assert status == 78
    assert_secret_free("the config error of `[[api]]`", out, token)


@pytest.mark.parametrize("source", ["token_file", "credentials"])
async def test_token_sources_do_not_export_it(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """The token read from a file or $CREDENTIALS_DIRECTORY/token never lands in os.environ,
    nor in the settings' repr/str/JSON (the process environment is not where it lives)."""
    token = sandbox.config.token
    for key in [k for k in os.environ if k.startswith("INBOXD_")]:
        monkeypatch.delenv(key)
    api: dict[str, Any] = {"url": sandbox.url}
    if source == "token_file":
        (tmp_path / "token").write_text(token)
        api["token_file"] = tmp_path / "token"
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    else:
        (tmp_path / "creds").mkdir()
        (tmp_path / "creds" / "token").write_text(token + "\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    settings = load_settings(write_toml(tmp_path / "c.toml", {"api": api}), require_token=True)
    async with MarpleClient.from_settings(settings.api) as client:
        assert len(await client.streams()) == 2
    assert_secret_free("os.environ", json.dumps(dict(os.environ)), token)
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.api)):
        assert_secret_free("the settings' repr/str/JSON", text, token)


# ============================================================================ storage requests


async def test_storage_requests_never_carry_the_token(tmp_path: Path) -> None:
    """Single and multipart uploads with storage 503s retried, short-lived URLs refreshed and a
    single upload that falls back to upload/server: no storage request carries anything of ours."""
    token = new_secret()
    config = small_sandbox_config(tmp_path / "sb", token, url_ttl=1.0)
    config.faults = Faults(seed=3, storage_503_rate=0.3)
    with running_sandbox(config) as sb:
        async with MarpleClient(sb.url, SecretStr(token), timeout=5) as client:
            for name, size in (("single.bin", 300 * KiB), ("multi.mf4", 1100 * KiB)):
                write_file(tmp_path / name, size)
                result = await upload_file(
                    client, _request(tmp_path / name), options=UploadOptions(policy=FAST)
                )
                assert result.mode in ("single", "multipart")
            sb.faults.storage_fail_always = True  # single falls back to upload/server
            write_file(tmp_path / "fallback.bin", 200 * KiB)
            fallback = await upload_file(
                client,
                _request(tmp_path / "fallback.bin"),
                options=UploadOptions(policy=FAST, storage_attempts=2),
            )
            assert fallback.fell_back
        storage = [r for r in sb.requests if r.kind == "storage"]
        assert len(storage) >= 8 and any(r.status == 503 for r in storage)
        for r in storage:
            assert not r.has_authorization
            assert_clean_storage_request(f"{r.method} {r.path}", r.headers, token)
            assert_secret_free("a storage URL", r.path + "?" + r.query, token)


def _request(path: Path, stream: Stream = STREAM) -> UploadRequest:
    return UploadRequest(
        file=FileRef.stat(path),
        dataset_name=path.name,
        stream=stream,
        metadata={"rig": "security"},
        upload_key=uuid.uuid4().hex,
    )


@pytest.mark.emulator
async def test_s3_and_azure_storage_requests_never_carry_the_token(
    moto_s3: Any, azurite: Any, tmp_path: Path
) -> None:
    token = new_secret()
    s3_config = small_sandbox_config(
        tmp_path / "s3",
        token,
        storage="s3",
        s3_endpoint=moto_s3.endpoint,
        s3_bucket=f"inboxd-{uuid.uuid4().hex[:12]}",
    )
    with running_sandbox(s3_config) as sb:
        async with MarpleClient(sb.url, SecretStr(token), timeout=30) as client:
            for name, size in (("single.bin", 300 * KiB), ("multi.mf4", 900 * KiB)):
                write_file(tmp_path / name, size)
                await upload_file(
                    client, _request(tmp_path / name), options=UploadOptions(policy=FAST)
                )
    presigned = [r for r in moto_s3.requests if r.presigned]
    assert len(presigned) >= 4  # the single PUT and the parts
    for r in presigned:
        assert_clean_storage_request(f"S3 {r.method} {r.path}", r.headers, token)
        assert_secret_free("an S3 request", r.text(), token)

    container = f"inboxd-{uuid.uuid4().hex[:12]}"
    with recording_server(upstream=azurite.account_url) as proxy:
        azure_config = small_sandbox_config(
            tmp_path / "azure",
            token,
            azure_account_url=proxy.url,
            azure_container=container,
            streams=[StreamDef(id=1, name="inbox"), StreamDef(id=3, name="azure", mode="azure")],
        )
        try:
            with running_sandbox(azure_config) as sb:
                async with MarpleClient(sb.url, SecretStr(token), timeout=30) as client:
                    write_file(tmp_path / "blob.bin", 100 * KiB)
                    result = await upload_file(
                        client,
                        _request(tmp_path / "blob.bin", Stream(id=3, name="azure")),
                        options=UploadOptions(policy=FAST),
                    )
                assert result.mode == "azure" and not result.fell_back
        finally:
            azurite.delete_container(container)
    ours = [r for r in proxy.records if r["method"] == "PUT" and "sig=" in r["path"]]
    assert ours, proxy.records
    for r in proxy.records:
        assert_clean_storage_request(f"Azure {r['method']} {r['path']}", r["headers"], token)
        assert_secret_free("an Azure request", r["path"], token)


# ============================================================================ TLS


@contextlib.contextmanager
def https_sandbox(tmp: Path, certfile: Path, token: str) -> Iterator[Sandbox]:
    config = small_sandbox_config(tmp / f"sb-{uuid.uuid4().hex[:6]}", token, tls_certfile=certfile)
    with running_sandbox(config) as sb:
        assert sb.url.startswith("https://")
        yield sb


def test_sandbox_tls_command_line_options(tls: Tls, tmp_path: Path) -> None:
    from daemon.sandbox import build_parser_args_into_config, ready_message

    config = build_parser_args_into_config(
        ["--data-dir", str(tmp_path), "--tls-cert", str(tls.server), "--port", "0"]
    )
    assert (config.tls_certfile, config.tls_keyfile, config.scheme) == (tls.server, None, "https")
    with pytest.raises(ValueError, match="tls_keyfile needs tls_certfile"):
        build_parser_args_into_config(["--data-dir", str(tmp_path), "--tls-key", str(tls.server)])
    with pytest.raises(ValueError, match="no such file"):
        build_parser_args_into_config(["--data-dir", str(tmp_path), "--tls-cert", "/no/cert.pem"])
    with running_sandbox(config) as sb:
        assert sb.url.startswith("https://") and "ca_file" in ready_message(sb)
        # Storage URLs handed out are https too (they are built from the request's base URL).
        answer = httpx.post(
            f"{sb.url}/ingestion",
            json={"stream_id": 1, "dataset_name": "x.bin", "file_size": 2 * 1024 * 1024},
            headers={"Authorization": f"Bearer {config.token}"},
            verify=ssl.create_default_context(cafile=str(tls.ca)),
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["presigned_url"].startswith("https://")


async def test_tls_verification_is_on_by_default(
    tls: Tls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server whose CA is not trusted is refused, with a clear message, not a traceback."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    token = new_secret()
    with https_sandbox(tmp_path, tls.server, token) as sb:
        async with MarpleClient(sb.url, SecretStr(token), timeout=5) as client:
            with pytest.raises(TransportError) as info:
                await client.streams()
        assert "certificate verify failed" in str(info.value).lower()
        assert info.value.maybe_sent is False
        cfg = write_toml(tmp_path / "c.toml", {"api": {"url": sb.url, "token": token}})
        check = await anyio.to_thread.run_sync(lambda: run_cli("check", "--config", str(cfg)))
        assert check.returncode == 1, check.stdout + check.stderr
        assert "Traceback" not in check.stdout + check.stderr
        assert "✗ reach" in check.stdout and "certificate verify failed" in check.stdout
        # The daemon treats it as a network problem of the job: retried, with the reason shown.
        config = write_config(tmp_path, sb, api={"token": token})
        write_file(tmp_path / "inbox" / "a.csv", 1000)
        async with running_service(config) as svc:
            queue = svc.queue
            assert queue is not None

            async def failed_once() -> Any:
                jobs = await queue.find_by_rel("a.csv")
                return jobs and jobs[0].attempts >= 1 and jobs[0].last_error

            error = await wait_until(failed_once, timeout=15)
            (job,) = await queue.find_by_rel("a.csv")
        assert "certificate verify failed" in error.lower()
        assert job.state.value != "failed"  # waits for a fix (ca_file), like a network outage
        assert not [r for r in sb.requests if r.kind == "api" and r.path.endswith("/ingestion")]


async def test_tls_private_ca_file_uploads_every_mode(tls: Tls, tmp_path: Path) -> None:
    token = new_secret()
    with https_sandbox(tmp_path, tls.server, token) as sb:
        config = write_config(tmp_path, sb, api={"token": token, "ca_file": str(tls.ca)})
        inbox = tmp_path / "inbox"
        expected = {
            "s.csv": write_file(inbox / "s.csv", 10 * KiB, 1),
            "single.bin": write_file(inbox / "single.bin", 300 * KiB, 2),
            "multi.mf4": write_file(inbox / "multi.mf4", 700 * KiB, 3),
        }
        async with running_service(config) as svc:
            queue = svc.queue
            assert queue is not None

            async def all_done() -> bool:
                return (await queue.counts()).get("done") == 3

            await wait_until(all_done, timeout=30)
            jobs = [j for name in expected for j in await queue.find_by_rel(name)]
        by_name = {d.path: d.id for d in sb.datasets.values()}
        for name, data in expected.items():
            assert sb.dataset_bytes(by_name[name]) == data
        assert {i.mode for i in sb.ingestions.values()} == {"server", "single", "multipart"}
        assert not [j.identity.rel for j in jobs if j.fell_back]  # storage itself took them
        storage = [r for r in sb.requests if r.kind == "storage"]
        assert len(storage) >= 4  # the sandbox only speaks https: these went over TLS


async def test_tls_verify_off_still_uploads(tls: Tls, tmp_path: Path) -> None:
    token = new_secret()
    with https_sandbox(tmp_path, tls.server, token) as sb:
        config = write_config(tmp_path, sb, api={"token": token, "verify_tls": False})
        data = write_file(tmp_path / "inbox" / "single.bin", 200 * KiB)
        async with running_service(config) as svc:
            queue = svc.queue
            assert queue is not None

            async def done() -> bool:
                return (await queue.counts()).get("done") == 1

            await wait_until(done, timeout=20)
        (ds,) = sb.datasets.values()
        assert sb.dataset_bytes(ds.id) == data


async def test_tls_verify_off_is_announced_at_start_up(tls: Tls, tmp_path: Path) -> None:
    token = new_secret()
    with https_sandbox(tmp_path, tls.server, token) as sb:
        config = write_config(tmp_path, sb, api={"token": token, "verify_tls": False})
        with captured_logs("info") as buf:
            async with running_service(config):
                pass
    warnings = [
        e
        for e in log_events(buf.getvalue())
        if e.get("level") in ("warning", "error")
        and re.search(r"tls|verif|certif", json.dumps(e), re.I)
    ]
    assert warnings, buf.getvalue()


async def test_tls_certificate_for_another_host_is_refused(tls: Tls, tmp_path: Path) -> None:
    token = new_secret()
    with https_sandbox(tmp_path, tls.other_host, token) as sb:
        async with MarpleClient(sb.url, SecretStr(token), timeout=5, ca_file=tls.ca) as client:
            with pytest.raises(TransportError) as info:
                await client.streams()
    text = str(info.value).lower()
    # "Hostname mismatch" for a name, "IP address mismatch" for 127.0.0.1
    assert "certificate verify failed" in text and "mismatch" in text, text
    assert not [r for r in sb.requests if r.kind == "api"]  # nothing reached the application


async def test_ca_file_for_the_api_keeps_the_default_trust_for_storage(
    tls: Tls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``public_ca`` plays the system trust store (httpx honours SSL_CERT_FILE for verify=True).
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.public_ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    token = new_secret()
    with recording_server(certfile=tls.public_server) as storage:
        url = f"{storage.url}/bucket/key?X-Amz-Signature=abc"
        async with MarpleClient("https://127.0.0.1:9/api/v1", SecretStr(token)) as default:
            await default.storage_put(url, b"data")  # the default trust store reaches storage
        async with MarpleClient(
            "https://127.0.0.1:9/api/v1", SecretStr(token), ca_file=tls.ca
        ) as private_api:
            await private_api.storage_put(url, b"data")
    assert len(storage.records) == 2


# ============================================================================ permissions


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
async def test_state_database_and_its_folder_are_private(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox)  # state: tmp/state/state.db, tmp/state not there yet
    state = tmp_path / "state"
    assert not state.exists()
    write_file(tmp_path / "inbox" / "a.csv", 3000)
    async with running_service(config) as svc:
        queue = svc.queue
        assert queue is not None

        async def done() -> bool:
            return (await queue.counts()).get("done") == 1

        await wait_until(done, timeout=20)
        modes = {p.name: mode_of(p) for p in state.iterdir()}
        folder = mode_of(state)
    assert folder == 0o700, oct(folder)
    assert {"state.db", "state.db-wal", "state.db-shm", "state.db.lock"} <= set(modes), modes
    assert {k: oct(v) for k, v in modes.items()} == {k: "0o600" for k in modes}


@pytest.mark.usefixtures("permissive_umask")
async def test_every_state_folder_inboxd_creates_is_private(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    db = tmp_path / "var" / "lib" / "inboxd" / "state.db"
    config = write_config(tmp_path, sandbox, state={"path": str(db)})
    async with running_service(config):
        pass
    created = [tmp_path / "var", tmp_path / "var" / "lib", db.parent]
    assert {str(p.relative_to(tmp_path)): oct(mode_of(p)) for p in created} == {
        str(p.relative_to(tmp_path)): "0o700" for p in created
    }


@pytest.mark.usefixtures("permissive_umask")
async def test_archive_folders_are_not_world_readable(sandbox: Sandbox, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir(mode=0o700)  # the admin creates the archive root (README: install -d)
    config = write_config(
        tmp_path, sandbox, inbox={"after_upload": "archive", "archive_path": str(archive)}
    )
    write_file(tmp_path / "inbox" / "vehicle" / "driver" / "run.csv", 1000)
    async with running_service(config):
        await wait_until(lambda: (archive / "vehicle" / "driver" / "run.csv").exists(), timeout=20)
    folders = [archive / "vehicle", archive / "vehicle" / "driver"]
    modes = {str(p.relative_to(archive)): oct(mode_of(p)) for p in folders}
    assert all(mode_of(p) & 0o007 == 0 for p in folders), modes


# ============================================================================ outside the inbox


@dataclass
class Outside:
    """A folder next to the inbox full of things that must never be read, uploaded or moved."""

    root: Path
    marker: str = field(default_factory=lambda: new_secret("OUTSIDE"))

    def populate(self) -> None:
        (self.root / "dir" / "deeper").mkdir(parents=True)
        (self.root / "secret.csv").write_text(f"{self.marker},1\n")
        (self.root / "dir" / "inner.csv").write_text(f"{self.marker},2\n")
        (self.root / "dir" / "deeper" / "deep.csv").write_text(f"{self.marker},3\n")
        (self.root / "meta.json").write_text(json.dumps({"stolen": self.marker}))


def plant_symlinks(inbox: Path, outside: Outside) -> None:
    o = outside.root
    (inbox / "out.csv").symlink_to(o / "secret.csv")
    (inbox / "relative.csv").symlink_to(Path("..") / o.name / "secret.csv")
    (inbox / "outdir").symlink_to(o / "dir")
    (inbox / "loop_a.csv").symlink_to("loop_b.csv")
    (inbox / "loop_b.csv").symlink_to("loop_a.csv")
    (inbox / "self.csv").symlink_to("self.csv")
    (inbox / "dangling.csv").symlink_to(o / "nothing.csv")
    (inbox / "ok.csv").write_text("ok,1\n")
    (inbox / "ok.csv.meta.json").symlink_to(o / "meta.json")
    (inbox / "pw.csv").write_text("pw,1\n")
    (inbox / "pw.csv.meta.json").symlink_to("/etc/passwd")


ODD_NAMES = ["..foo/a..b.csv", "x../..y..csv", ".../z.csv", "..\\..\\evil.csv", "-rf .csv"]


@pytest.mark.parametrize("follow", [False, True], ids=["follow_symlinks=off", "follow_symlinks=on"])
async def test_nothing_outside_the_inbox_is_uploaded_read_or_moved(
    sandbox: Sandbox, tmp_path: Path, follow: bool
) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    inbox.mkdir()
    outside = Outside(tmp_path / "outside")
    outside.populate()
    plant_symlinks(inbox, outside)
    for rel in ODD_NAMES:
        write_file(inbox / rel, 100, seed=len(rel))
    config = write_config(
        tmp_path,
        sandbox,
        inbox={
            "follow_symlinks": follow,
            "exclude": [],  # enter "..foo" and "..." like any folder (they are names, not paths)
            "after_upload": "archive",
            "archive_path": str(archive),
        },
        upload={"dataset_name": "../../{path}"},
    )
    before = tree_snapshot(outside.root)
    top_level = set(os.listdir(tmp_path))
    expected = ["ok.csv", "pw.csv", *ODD_NAMES]
    async with running_service(config) as svc:
        queue = svc.queue
        assert queue is not None
        # Files appearing behind the symlinked folder after the start must not come in either.
        (outside.root / "dir" / "late.csv").write_text(f"{outside.marker},late\n")

        async def archived() -> bool:
            jobs = [j for rel in expected for j in await queue.find_by_rel(rel)]
            return len(jobs) == len(expected) and all(j.after_upload for j in jobs)

        await wait_until(archived, timeout=30)
        await anyio.sleep(0.5)  # time for the late file's events
        links = ("out.csv", "relative.csv", "outdir", "loop_a.csv", "self.csv", "dangling.csv")
        stray = {rel: await queue.find_by_rel(rel) for rel in links}
    assert stray == {rel: [] for rel in links}
    names = sorted(d.path for d in sandbox.datasets.values())
    assert names == sorted(f"../../{rel}" for rel in expected)  # names are only strings
    for ds in sandbox.datasets.values():
        assert outside.marker.encode() not in sandbox.dataset_bytes(ds.id)
        text = json.dumps(ds.metadata)
        assert outside.marker not in text and "root:" not in text, ds.metadata
    # The outside tree is exactly as it was (plus the late file we wrote), nothing was moved.
    after = tree_snapshot(outside.root)
    after.pop(str(Path("dir") / "late.csv"))
    assert after == before
    assert set(os.listdir(tmp_path)) == top_level | {"archive", "state"}
    # The archive holds the archived files at their relative paths, nothing else, nowhere else.
    archived_files = sorted(
        str(p.relative_to(archive)) for p in archive.rglob("*") if not p.is_dir()
    )
    assert archived_files == sorted(expected)
    for rel in expected:
        assert (archive / rel).resolve().is_relative_to(archive.resolve())
    # The symlinks themselves are left where they are.
    for rel in links:
        assert (inbox / rel).is_symlink(), rel


async def test_follow_symlinks_uploads_a_link_to_a_file_inside(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "data").mkdir(parents=True)
    data = write_file(inbox / "data" / "real.csv", 500)
    (inbox / "link.csv").symlink_to(Path("data") / "real.csv")
    config = write_config(tmp_path, sandbox, inbox={"follow_symlinks": True})
    async with running_service(config) as svc:
        queue = svc.queue
        assert queue is not None

        async def settled() -> bool:
            c = await queue.counts()
            return c.get("done", 0) + c.get("failed", 0) == 2

        await wait_until(settled, timeout=20)
        (link,) = await queue.find_by_rel("link.csv")
    assert link.state.value == "done", link.last_error
    by_name = {d.path: d.id for d in sandbox.datasets.values()}
    assert sandbox.dataset_bytes(by_name["link.csv"]) == data


# ---- after_upload when the uploaded file (or its folder) was swapped for a symlink


@dataclass
class SwapOutcome:
    after_upload: dict[str, str | None]
    outside: Path
    decoy: bytes
    archive: Path
    inbox: Path


async def _swap_run(tmp: Path, action: str) -> SwapOutcome:
    inbox, outside, archive = tmp / "inbox", tmp / "outside", tmp / "archive"
    (inbox / "sub").mkdir(parents=True)
    outside.mkdir()
    decoy = b"decoy,outside the inbox\n"
    (outside / "decoy.csv").write_bytes(decoy)
    write_file(inbox / "top.csv", 700, 1)
    write_file(inbox / "sub" / "deep.csv", 900, 2)
    config = small_sandbox_config(tmp / "sb", "swap-token", import_seconds=1.5)
    with running_sandbox(config) as sb:
        cfg = write_config(
            tmp,
            sb,
            api={"token": "swap-token"},
            inbox={"after_upload": action, "archive_path": str(archive)},
        )
        async with running_service(cfg) as svc:
            queue = svc.queue
            assert queue is not None

            async def importing() -> bool:
                jobs = [j for r in ("top.csv", "sub/deep.csv") for j in await queue.find_by_rel(r)]
                return len(jobs) == 2 and all(j.state.value == "importing" for j in jobs)

            await wait_until(importing, timeout=20, step=0.02)
            # Uploaded, import running: the file is replaced by a symlink to an outside file;
            # the folder is moved out of the inbox and a symlink to it put in its place.
            (inbox / "top.csv").unlink()
            (inbox / "top.csv").symlink_to(outside / "decoy.csv")
            (inbox / "sub").rename(outside / "sub")
            (inbox / "sub").symlink_to(outside / "sub")

            async def disposed() -> dict[str, str | None] | None:
                out = {}
                for rel in ("top.csv", "sub/deep.csv"):
                    (job,) = await queue.find_by_rel(rel)
                    out[rel] = job.after_upload
                return out if all(out.values()) else None

            outcome = await wait_until(disposed, timeout=20)
    return SwapOutcome(outcome, outside, decoy, archive, inbox)


@pytest.fixture(scope="module")
def swap_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SwapOutcome]:
    results: dict[str, SwapOutcome] = {}

    async def both() -> None:
        async def one(action: str) -> None:
            results[action] = await _swap_run(tmp_path_factory.mktemp(f"swap-{action}"), action)

        async with anyio.create_task_group() as tg:
            for action in ("archive", "delete"):
                tg.start_soon(one, action)

    anyio.run(both)
    return results


@pytest.mark.parametrize("action", ["archive", "delete"])
def test_after_upload_leaves_a_file_replaced_by_a_symlink_alone(
    swap_outcomes: dict[str, SwapOutcome], action: str
) -> None:
    o = swap_outcomes[action]
    assert o.after_upload["top.csv"] == "changed"
    assert (o.outside / "decoy.csv").read_bytes() == o.decoy
    assert (o.inbox / "top.csv").is_symlink()
    assert not (o.archive / "top.csv").exists()


@pytest.mark.parametrize("action", ["archive", "delete"])
def test_after_upload_does_not_follow_a_symlinked_folder_out_of_the_inbox(
    swap_outcomes: dict[str, SwapOutcome], action: str
) -> None:
    o = swap_outcomes[action]
    assert (o.outside / "sub" / "deep.csv").exists(), o.after_upload
    assert o.after_upload["sub/deep.csv"] not in ("archived", "deleted")


# ---- strace: what the daemon process opens, watches and changes


@dataclass
class Trace:
    calls: list[tuple[str, str, str, bool]]  # (syscall, path as given, resolved path, succeeded)
    allowed: list[str]
    outside: Path
    inbox: Path
    token: str
    environ: bytes
    mutations: list[tuple[str, list[str]]]  # (syscall, every path it names)


_TRACE_LINE = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+)(<([^>]*)>)?")
_MUTATING = {
    "rename", "renameat", "renameat2", "unlink", "unlinkat", "link", "linkat", "symlink",
    "symlinkat", "mkdir", "mkdirat", "chmod", "fchmodat", "truncate", "utimensat", "rmdir",
}  # fmt: skip


def _strace_args(raw: str) -> tuple[str | None, str | None]:
    """(dir-fd path or None for AT_FDCWD, the first quoted path) of a syscall's arguments."""
    dirfd = None
    m = re.match(r"(\d+)<([^>]*)>,", raw)
    if m:
        dirfd = m.group(2)
    q = re.search(r'"((?:[^"\\]|\\.)*)"', raw)
    return dirfd, (_unescape(q.group(1)) if q else None)


def _unescape(text: str) -> str:
    """A path as strace prints it (C escapes) back to the path."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


@pytest.fixture(scope="module")
def traced_daemon(tmp_path_factory: pytest.TempPathFactory) -> Trace:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    probe = subprocess.run(
        [strace, "-f", "-o", os.devnull, "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode(errors='replace')[:200]}")
    tmp = tmp_path_factory.mktemp("strace")
    token = new_secret()
    creds = tmp / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "token").write_text(token)
    inbox, archive, state = tmp / "inbox", tmp / "archive", tmp / "state"
    inbox.mkdir()
    outside = Outside(tmp / "outside")
    outside.populate()
    plant_symlinks(inbox, outside)
    (inbox / "inside.csv").symlink_to("ok.csv")
    trace_file = tmp / "trace"
    with running_sandbox(small_sandbox_config(tmp / "sb", token)) as sb:
        sections = daemon_sections(tmp, sb.url, attempts=6)
        sections["inbox"].update(follow_symlinks=True, after_upload="archive", archive_path=archive)
        config = write_toml(tmp / "config.toml", sections)
        syscalls = "open,openat,openat2,creat,inotify_add_watch," + ",".join(sorted(_MUTATING))
        args = [strace, "-f", "-qq", "-y", "-e", f"trace={syscalls}", "-o", str(trace_file)]
        if (
            subprocess.run(
                [strace, "--seccomp-bpf", "-f", "-o", os.devnull, "true"],
                capture_output=True,
                check=False,
            ).returncode
            == 0
        ):
            args.append("--seccomp-bpf")
        env = clean_env(CREDENTIALS_DIRECTORY=str(creds))
        with (tmp / "log").open("wb") as out:
            proc = subprocess.Popen(
                [*args, sys.executable, "-m", "daemon", "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )
        child = None
        try:
            child = wait_for(lambda: _child_of(proc.pid, str(config)), 10, "the traced daemon")
            environ = Path(f"/proc/{child}/environ").read_bytes()
            db = state / "state.db"
            wait_for(
                lambda: (
                    db.exists()
                    and all(
                        jobs_by_rel(db).get(r, {}).get("after_upload") for r in ("ok.csv", "pw.csv")
                    )
                ),
                40,
                "ok.csv and pw.csv archived by the traced daemon",
            )
            (outside.root / "dir" / "late.csv").write_text("late\n")
            time.sleep(0.5)
            assert proc.poll() is None, (tmp / "log").read_text()[-2000:]
        finally:
            child = child or _child_of(proc.pid, str(config))
            stop_process(proc, child)  # SIGTERM to the daemon; strace ends with it
            _kill_strays(str(config))
    calls, mutations = [], []
    pending: dict[str, str] = {}  # pid -> the first half of a call another thread interrupted
    for line in trace_file.read_text(errors="replace").splitlines():
        if line.endswith(" <unfinished ...>"):
            pid, _, head = line.removesuffix(" <unfinished ...>").partition(" ")
            pending[pid] = head.lstrip()
            continue
        resumed = re.match(r"^(\d+)\s+<\.\.\. \w+ resumed>(.*)$", line)
        if resumed:
            head = pending.pop(resumed.group(1), "")
            line = f"{resumed.group(1)} {head}{resumed.group(2)}"
        m = _TRACE_LINE.match(line)
        if m is None:
            continue
        name, raw, ret, ret_path = m.group(1), m.group(2), int(m.group(3)), m.group(5)
        if name in _MUTATING:
            named = [
                os.path.normpath(os.path.join(str(REPO), _unescape(q)))
                for q in re.findall(r'"((?:[^"\\]|\\.)*)"', raw)
            ]
            mutations.append((name, named))
            continue
        dirfd, path = _strace_args(raw)
        if path is None:
            continue
        given = os.path.normpath(os.path.join(dirfd or str(REPO), path))
        resolved = ret_path if (ret_path and name.startswith("open")) else os.path.realpath(given)
        calls.append((name, given, resolved, ret >= 0))
    allowed = sorted(
        {
            str(p)
            for p in (
                inbox.resolve(),
                archive.resolve(),
                state.resolve(),
                creds.resolve(),
                config.resolve(),
                REPO,
                Path(sys.prefix),
                Path(sys.base_prefix),
                Path(sys.exec_prefix),
                *(Path(v) for v in sysconfig.get_paths().values()),
            )
        }
        | {"/usr", "/lib", "/lib32", "/lib64", "/etc", "/proc", "/sys", "/dev"}
    )
    assert calls, "strace recorded nothing"
    return Trace(calls, allowed, outside.root.resolve(), inbox.resolve(), token, environ, mutations)


def _child_of(pid: int, marker: str) -> int | None:
    """The child of ``pid`` (strace) that runs the daemon: strace forks short-lived probes of
    its own at start-up, and a fork carries strace's command line until it executes ours."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{child}/cmdline").read_text(errors="replace").split("\0")
                    # not strace itself (its probes, or the daemon before its execve)
                    if argv[0] == sys.executable and marker in argv:
                        return int(child)
    return None


def _kill_strays(marker: str) -> None:
    """SIGKILL any daemon of ours still running this config (a tracee left behind when strace
    itself had to be killed): the config path is unique to this test."""
    for proc_dir in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            argv = (proc_dir / "cmdline").read_text(errors="replace").split("\0")
            if argv[0] == sys.executable and marker in argv:
                os.kill(int(proc_dir.name), signal.SIGKILL)


def _resolved_parent(path: str) -> str:
    """The path with its folders resolved (where a rename/unlink/mkdir really acts)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def test_strace_daemon_opens_no_file_outside_and_changes_nothing_there(
    traced_daemon: Trace,
) -> None:
    t = traced_daemon
    assert_secret_free("/proc/PID/environ of the daemon", t.environ, t.token)
    # The trace saw the daemon's own work (so an empty result below means something).
    opened = {given for name, given, _, ok in t.calls if name.startswith("open") and ok}
    assert str(t.inbox / "ok.csv") in opened
    assert any(given == str(t.inbox / "pw.csv.meta.json") for _, given, _, _ in t.calls)
    # A successful open is judged by what the kernel opened (strace -y), so a path through a
    # symlink counts where it leads; a refused one (O_NOFOLLOW on a symlink: ELOOP) by its name.
    bad_opens = [
        (name, given, resolved)
        for name, given, resolved, ok in t.calls
        if name.startswith("open")
        and not (ok and os.path.isdir(resolved))  # folders: see the test below
        and (
            not _inside(resolved if ok else given, t.allowed)
            or (ok and resolved in ("/etc/passwd", "/etc/shadow"))
        )
    ]
    assert not bad_opens, bad_opens
    assert not [
        c for c in t.calls if c[3] and _inside(c[2], [str(t.outside)]) and not os.path.isdir(c[2])
    ]
    changed = [
        (name, paths)
        for name, paths in t.mutations
        if not all(_inside(_resolved_parent(p), t.allowed) for p in paths)
    ]
    assert not changed, changed


def test_strace_daemon_lists_and_watches_no_folder_outside(traced_daemon: Trace) -> None:
    t = traced_daemon
    outside = [
        (name, given, resolved)
        for name, given, resolved, ok in t.calls
        if ok  # what was opened or watched (refused opens of symlinks do not count)
        and (name.startswith("open") or name == "inotify_add_watch")
        and _inside(resolved, [str(t.outside)])
    ]
    assert not outside, outside
    # The trace did see the daemon list and watch its inbox (so the above means something).
    inside = {(name.startswith("open"), resolved) for name, _, resolved, ok in t.calls if ok}
    assert (True, str(t.inbox)) in inside
    assert (False, str(t.inbox)) in inside
