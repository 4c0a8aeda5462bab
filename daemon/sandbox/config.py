"""Settings of the sandbox server: streams, size thresholds, storage back-end and faults.

Everything here is plain data. `Faults` is deliberately mutable: the server reads it on every
request, so a test (or a benchmark) can turn a fault on and off while the server runs.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB

#: The upload modes a Marple DB server may answer with.
MODES = ("server", "single", "multipart", "azure")
#: Where single/multipart uploads go.
STORAGES = ("local", "s3", "discard")

#: Azurite's documented, public development account key (not a secret).
AZURITE_DEV_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclass
class StreamDef:
    """One stream the sandbox serves.

    `mode` forces the upload mode for every file of this stream ("server", "single",
    "multipart" or "azure"); None lets the file size decide.
    """

    id: int
    name: str
    datapool: str = "default"
    type: str = "files"
    mode: str | None = None


def _default_streams() -> list[StreamDef]:
    return [StreamDef(id=1, name="inbox"), StreamDef(id=2, name="Vehicle Logs")]


@dataclass
class Faults:
    """Injected failures. Mutable at runtime: read on every request.

    Rates are probabilities in [0, 1] drawn from one random generator seeded with `seed`.
    `fail_next` maps a route key ("POST /ingestion", "POST /ingestion/{id}/upload/complete",
    "GET /ingestion/{id}/upload/part-urls", "PUT storage", or a concrete path such as
    "POST /ingestion/7/abort") to status codes answered, in order, by the next matching
    requests; 0 means "process the request, then cut the connection before the response is
    complete" (a lost response).
    """

    api_503_rate: float = 0.0
    api_429_rate: float = 0.0
    #: Retry-After on faulted 429/503: seconds, or a string sent verbatim as the header (an
    #: HTTP date, "inf", garbage). HTTP allows whole seconds only, and `--retry-after` takes
    #: nothing else; a fraction set from Python is sent as written ("0.05": inboxd reads it,
    #: urllib3 refuses it) so tests of the waiting stay fast.
    retry_after: float | str | None = None
    storage_503_rate: float = 0.0
    storage_fail_always: bool = False
    drop_response_rate: float = 0.0
    storage_delay_per_mib: float = 0.0
    fail_import_glob: str | None = None
    seed: int | None = None
    fail_next: dict[str, list[int]] = field(default_factory=dict)
    #: a route key ("POST /ingestion") → fields changed in every successful JSON answer of
    #: that route (None removes the field): protocol nonsense such as a create answer
    #: without ``dataset_id``, an unknown ``mode`` or an absurd ``part_size``
    mangle: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class SandboxConfig:
    """Everything the sandbox needs to run; see `add_sandbox_arguments` for the CLI view."""

    data_dir: Path
    token: str = "sandbox-token"  # noqa: S105 - the sandbox's published fake token
    host: str = "127.0.0.1"
    port: int = 0
    streams: list[StreamDef] = field(default_factory=_default_streams)
    server_max_bytes: int = 1 * MiB
    single_max_bytes: int = 8 * MiB
    part_size: int = 5 * MiB
    url_ttl: float = 3600.0
    part_url_batch_max: int = 1000
    import_seconds: float = 0.5
    faults: Faults = field(default_factory=Faults)
    storage: str = "local"
    s3_endpoint: str | None = None
    s3_bucket: str = "inboxd-sandbox"
    azure_account_url: str | None = None
    azure_account_name: str = "devstoreaccount1"
    azure_account_key: str = AZURITE_DEV_KEY
    azure_container: str = "inboxd-sandbox"
    discard_url: str | None = None
    #: Serve over HTTPS with this certificate chain (PEM); the key may be in the same file.
    tls_certfile: Path | None = None
    #: The private key of `tls_certfile` (PEM), when it is not in that file.
    tls_keyfile: Path | None = None

    @property
    def scheme(self) -> str:
        """``https`` when a TLS certificate is configured, else ``http``."""
        return "https" if self.tls_certfile is not None else "http"

    def validate(self) -> None:
        """Raise ValueError when the settings cannot work together."""
        if self.tls_keyfile is not None and self.tls_certfile is None:
            raise ValueError("tls_keyfile needs tls_certfile (the certificate it belongs to)")
        for name, pem in (("tls_certfile", self.tls_certfile), ("tls_keyfile", self.tls_keyfile)):
            if pem is not None and not Path(pem).is_file():
                raise ValueError(f"{name} {str(pem)!r}: no such file")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, not {self.storage!r}")
        if self.storage == "s3" and not self.s3_endpoint:
            raise ValueError("storage 's3' needs s3_endpoint")
        if self.storage == "discard" and not self.discard_url:
            raise ValueError("storage 'discard' needs discard_url")
        if self.part_size <= 0 or self.server_max_bytes < 0 or self.single_max_bytes < 0:
            raise ValueError("part_size must be > 0 and the size thresholds >= 0")
        if self.url_ttl <= 0:
            raise ValueError("url_ttl must be > 0")
        f = self.faults
        for name in ("api_503_rate", "api_429_rate", "storage_503_rate", "drop_response_rate"):
            rate = getattr(f, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be a share from 0 to 1, not {rate!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, not {self.port}")
        if self.part_url_batch_max <= 0:
            raise ValueError("part_url_batch_max must be > 0")
        ids = [s.id for s in self.streams]
        if len(ids) != len(set(ids)):
            raise ValueError("stream ids must be unique")
        for stream in self.streams:
            if stream.mode is not None and stream.mode not in MODES:
                raise ValueError(f"stream {stream.id}: unknown mode {stream.mode!r}")
            if stream.mode == "azure" and not self.azure_account_url:
                raise ValueError(
                    f"stream {stream.id} uses mode 'azure' but azure_account_url is unset"
                )


def _share(text: str) -> float:
    """A ``--*-rate`` value: a share of requests, 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a share of requests: give a number from 0 to 1 (0.1 = 10 %)"
        )
    return value


def _seconds(text: str) -> float:
    """A duration in seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds, a number of 0 or more")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: give a port from 0 to 65535 (0 = any free)")
    return int(text)


def _stream_mode(text: str) -> tuple[int, str]:
    """Parse one `--stream-mode ID=MODE` value."""
    sid, sep, mode = text.partition("=")
    if not sep or not sid.strip().isdigit() or mode not in MODES:
        raise argparse.ArgumentTypeError(
            f"expected ID=MODE with MODE one of {', '.join(MODES)}, got {text!r}"
        )
    return int(sid), mode


def _whole_seconds(text: str) -> int:
    """Parse ``--retry-after``: HTTP's Retry-After is a whole number of seconds (RFC 9110
    10.2.3), and clients such as urllib3 reject anything else, so a fraction is refused."""
    try:
        seconds = int(text)
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise argparse.ArgumentTypeError(
            f"expected whole seconds (0, 1, 2, ...), got {text!r}: HTTP's Retry-After has no "
            "fractions"
        )
    return seconds


def add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `inboxd sandbox` options to `parser` (read back with `config_from_args`)."""
    d = SandboxConfig(data_dir=Path())
    f = Faults()
    add = parser.add_argument
    add("--host", default=d.host, help="address to listen on (default %(default)s)")
    # A fixed default port keeps the printed config snippet valid across restarts.
    add("--port", type=_port, default=8787, help="port, 0 = any free port (default %(default)s)")
    add("--data-dir", type=Path, default=None, help="where uploads are kept (default: a temp dir)")
    add("--token", default=d.token, help="the bearer token to accept (default %(default)s)")
    add("--server-max-bytes", type=int, default=d.server_max_bytes, help="largest 'server' file")
    add("--single-max-bytes", type=int, default=d.single_max_bytes, help="largest 'single' file")
    add("--part-size", type=int, default=d.part_size, help="multipart part size in bytes")
    add("--url-ttl", type=float, default=d.url_ttl, help="signed URL lifetime in seconds")
    add("--import-seconds", type=_seconds, default=d.import_seconds, help="simulated import time")
    add("--api-503-rate", type=_share, default=f.api_503_rate, help="share of API calls -> 503")
    add("--api-429-rate", type=_share, default=f.api_429_rate, help="share of API calls -> 429")
    add(
        "--retry-after",
        type=_whole_seconds,
        default=None,
        metavar="SECONDS",
        help="Retry-After on faulted 429/503, in whole seconds (HTTP allows no fractions: "
        "0.5 is refused, not rounded)",
    )
    add("--storage-503-rate", type=_share, default=f.storage_503_rate, help="storage PUTs -> 503")
    add("--storage-fail-always", action="store_true", help="every storage PUT answers 500")
    add(
        "--drop-response-rate",
        type=_share,
        default=f.drop_response_rate,
        help="share of API calls processed but whose response is cut off",
    )
    add(
        "--storage-delay-per-mib",
        type=_seconds,
        default=f.storage_delay_per_mib,
        help="seconds slept per MiB received by storage",
    )
    add("--fail-import-glob", default=None, help="datasets matching this glob fail import")
    add("--seed", type=int, default=None, help="seed of the fault random generator")
    add(
        "--stream-mode",
        type=_stream_mode,
        action="append",
        default=[],
        metavar="ID=MODE",
        help="force the upload mode of a stream (repeatable)",
    )
    add("--storage", choices=STORAGES, default=d.storage, help="storage back-end")
    add("--s3-endpoint", default=None, help="S3 endpoint for --storage s3 (e.g. moto)")
    add("--s3-bucket", default=d.s3_bucket, help="bucket for --storage s3")
    add("--azure-account-url", default=None, help="Azure blob endpoint for mode 'azure'")
    add("--azure-account-name", default=d.azure_account_name, help="Azure account name")
    add("--azure-account-key", default=d.azure_account_key, help="Azure account key")
    add("--azure-container", default=d.azure_container, help="Azure container")
    add("--discard-url", default=None, help="sink URL for --storage discard")
    add(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="PEM",
        help="serve over HTTPS with this certificate chain (the key may be in the same file)",
    )
    add("--tls-key", type=Path, default=None, metavar="PEM", help="private key of --tls-cert")


def config_from_args(ns: argparse.Namespace) -> SandboxConfig:
    """Build a SandboxConfig from arguments parsed with `add_sandbox_arguments`.

    Raises ValueError when the options do not fit together.
    """
    data_dir = ns.data_dir
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="inboxd-sandbox-"))
    streams = _default_streams()
    by_id = {s.id: s for s in streams}
    for sid, mode in ns.stream_mode:
        if sid not in by_id:
            raise ValueError(f"--stream-mode: no stream with id {sid} (have {sorted(by_id)})")
        by_id[sid].mode = mode
    faults = Faults(
        api_503_rate=ns.api_503_rate,
        api_429_rate=ns.api_429_rate,
        retry_after=ns.retry_after,
        storage_503_rate=ns.storage_503_rate,
        storage_fail_always=ns.storage_fail_always,
        drop_response_rate=ns.drop_response_rate,
        storage_delay_per_mib=ns.storage_delay_per_mib,
        fail_import_glob=ns.fail_import_glob,
        seed=ns.seed,
    )
    config = SandboxConfig(
        data_dir=data_dir,
        token=ns.token,
        host=ns.host,
        port=ns.port,
        streams=streams,
        server_max_bytes=ns.server_max_bytes,
        single_max_bytes=ns.single_max_bytes,
        part_size=ns.part_size,
        url_ttl=ns.url_ttl,
        import_seconds=ns.import_seconds,
        faults=faults,
        storage=ns.storage,
        s3_endpoint=ns.s3_endpoint,
        s3_bucket=ns.s3_bucket,
        azure_account_url=ns.azure_account_url,
        azure_account_name=ns.azure_account_name,
        azure_account_key=ns.azure_account_key,
        azure_container=ns.azure_container,
        discard_url=ns.discard_url,
        tls_certfile=ns.tls_cert,
        tls_keyfile=ns.tls_key,
    )
    config.validate()
    return config


def build_parser_args_into_config(argv: Sequence[str] | None = None) -> SandboxConfig:
    """Parse sandbox command-line options (sys.argv[1:] when None) into a SandboxConfig."""
    parser = argparse.ArgumentParser(prog="inboxd sandbox", description="local Marple DB sandbox")
    add_sandbox_arguments(parser)
    return config_from_args(parser.parse_args(argv))
