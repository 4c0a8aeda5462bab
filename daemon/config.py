"""The one frozen settings model, and how it is loaded.

Precedence, highest first: explicit overrides (command-line flags) → environment variables
(``INBOXD_`` prefix, ``__`` between levels: ``INBOXD_API__TOKEN``) → the TOML file (``--config``,
else ``$INBOXD_CONFIG``, else ``/etc/inboxd/config.toml``) → defaults.
``config.example.toml`` mirrors this module key by key.

Why one module: one frozen settings model, every section's fields beside the checks that tie
them together (precedence: argument → environment → file → default), read as the one reference
of what a config may say; config.example.toml mirrors it section by section.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from daemon.compat import tomllib
from daemon.errors import ConfigError

#: ``[inbox] exclude`` by default, and the watcher's: dotfiles and dot-folders (a glob without
#: '/' is tried on every path component), partial downloads and editors' temporary and lock
#: files. ``<file>.meta.json`` is not here: it is excluded only while ``[upload]
#: sidecar_metadata`` reads it (the service adds that glob), else it is a file like any other.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".*",
    "*.tmp",
    "*.part",
    "*.partial",
    "~$*",  # Office lock files
    "*.swp",
    "*.crdownload",
)

# The TOML file of the load in progress; pydantic-settings builds sources from the class, so the
# path travels here rather than through a mutable class attribute.
_toml_data: ContextVar[dict[str, Any]] = ContextVar("_toml_data", default={})  # noqa: B039


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiSettings(_Section):
    # Which service files go to: "marple-db" (ingestion API), "marple" (the older Marple API:
    # library upload + import) or "data-service" (the spreadsheet data service's adapters).
    kind: Literal["marple-db", "marple", "data-service"] = "marple-db"
    url: str = "http://127.0.0.1:8787/api/v1"
    token: SecretStr | None = None
    token_file: Path | None = None
    verify_tls: bool = True
    ca_file: Path | None = None
    timeout: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                "must start with http:// or https:// (e.g. https://db.marpledata.com/api/v1)"
            )
        return value.rstrip("/")

    def resolved_token(self) -> SecretStr:
        """The token from ``token``, else ``token_file``, else the systemd credential ``token``.

        Raises ConfigError naming every place looked at when none has one.
        """
        if self.token is not None and self.token.get_secret_value().strip():
            return _checked_token(self.token.get_secret_value().strip(), "api.token")
        if self.token_file is not None:
            return read_token_file(self.token_file, "api.token_file")
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir:
            cred = Path(cred_dir) / "token"
            if cred.exists():
                return read_token_file(cred, "systemd credential 'token'")
        raise ConfigError(
            "api.token: no API token configured — set [api] token or token_file, the "
            "environment variable INBOXD_API__TOKEN, or the systemd credential 'token' "
            "(LoadCredential=token:/etc/inboxd/token)"
        )


def read_token_file(path: Path, key: str) -> SecretStr:
    """The secret in the file ``path`` (stripped), or ConfigError naming ``key``."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{key} = {str(path)!r}: cannot read it ({exc.strerror}) — check the path and that "
            "the inboxd user may read it"
        ) from None
    if not text:
        raise ConfigError(f"{key} = {str(path)!r}: the file is empty — put the API token in it")
    return _checked_token(text, f"{key} = {str(path)!r}")


def _checked_token(text: str, where: str) -> SecretStr:
    # A token travels in an HTTP header: a line break, a space or a non-ASCII character would
    # make the request invalid, and some HTTP libraries quote the bad header (token included)
    # in their error message. Refuse it here, without showing it.
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        raise ConfigError(
            f"{where}: the token contains spaces, line breaks or non-ASCII characters — "
            "the token must be a single word; keep nothing else in that place"
        )
    return SecretStr(text)


def _stream_ref(value: Any) -> Any:
    # Checked before the int | str union: pydantic would otherwise report one line per union
    # member, and accept ids (0, -3) and names ("") that fail every file later.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())  # the server takes digits as an id too (GET /streams)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError("a stream id is 1 or more — give the id or the name of a stream")
        return value
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(
                "a stream name must not be empty — give the id or the name of a stream"
            )
        return value.strip()
    raise ValueError("must be a stream id (a whole number, e.g. 1) or a stream name in quotes")


def _plain_metadata(value: Any) -> Any:
    # Checked here so that a bad value gives one line naming its key, not one per union member.
    if not isinstance(value, dict):
        return value
    for key, item in value.items():
        if not isinstance(item, str | int | float | bool):
            raise ValueError(
                f"the value of {str(key)!r} must be a string, number or boolean, not "
                f"{_toml_kind(item)} — quote it or split it into several keys"
            )
    return value


def _toml_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__


def _rate(value: Any) -> Any:
    # Before the str | int union, for one line per problem; parse_rate checks the text later.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            'must be bytes per second (a whole number) or a rate such as "20MB", "1.5MiB" or '
            '"100Mbit"; 0 = unlimited'
        )
    return value


#: A stream id (>= 1) or a stream name (not empty).
StreamRef = Annotated[int | str, BeforeValidator(_stream_ref)]
Metadata = Annotated[dict[str, str | int | float | bool], BeforeValidator(_plain_metadata)]


def _data_set_ref(value: Any) -> Any:
    # A DataSetLink or the name of a data set; blank means "none" rather than a nameless set.
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


#: A data service data set: its link (``https://…/dataSets/435``) or its name.
DataSetRef = Annotated[str | None, BeforeValidator(_data_set_ref)]


class RouteSettings(_Section):
    """Files whose relative path matches ``glob`` go to ``stream`` with extra ``metadata``."""

    glob: str
    stream: StreamRef | None = None
    metadata: Metadata = Field(default_factory=dict)
    # Data service only: the data set of this route's files (a link, or a name: created on
    # demand with data_set_properties); unset = [data_service] data_set.
    data_set: DataSetRef = None
    data_set_properties: Metadata = Field(default_factory=dict)


class UploadSettings(_Section):
    stream: StreamRef = 1
    metadata: Metadata = Field(default_factory=dict)
    part_concurrency: int = Field(default=4, ge=1, le=64)
    # 4, not 2: small files are latency-bound (three round trips each), so files in flight
    # is what hides the server's and the network's latency (bench/daemon_bench.py: 4 KiB
    # files on loopback, 0.75x → 0.86x of a tight httpx loop; on a WAN it scales with RTT).
    workers: int = Field(default=4, ge=1, le=64)
    # Files of at most small_file_bytes uploaded at once on top of `workers`: on a real
    # network a small file is three round trips of waiting, so many must be in flight
    # (bench/wan_bench.py: 40 ms RTT, 16 KiB files). Their bytes in flight stay below
    # small_files x small_file_bytes (32 MiB by default); 0 = no small-file lane.
    small_files: int = Field(default=32, ge=0, le=256)
    small_file_bytes: int = Field(default=1024 * 1024, ge=1, le=64 * 1024 * 1024)
    # What to do when a dataset of the same name exists and was not made from this file.
    on_name_clash: Literal["rename", "fail", "overwrite"] = "rename"
    # A delivered file that grows by appending (its delivered bytes unchanged): "same-dataset"
    # delivers it again into the dataset it went to (Marple DB: overwrite, same id);
    # "new-version" delivers it as a new version (on_name_clash: "name (2)").
    on_append: Literal["same-dataset", "new-version"] = "same-dataset"
    # Template for the dataset name; {path} is the path relative to the inbox.
    dataset_name: str = "{path}"
    # Read <file>.meta.json next to a data file and merge it into the metadata.
    sidecar_metadata: bool = True
    # Name path components as metadata: e.g. ["vehicle", "driver"] for vehicle/driver/file.mf4.
    path_metadata: list[str] = Field(default_factory=list)
    plugin_args: str | None = None


class RetrySettings(_Section):
    attempts: int = Field(default=6, ge=1, le=100)
    base_seconds: float = Field(default=0.5, gt=0)
    cap_seconds: float = Field(default=60.0, gt=0)
    # How long a job waits before its next try after a step ran out of attempts.
    job_backoff_cap_seconds: float = Field(default=900.0, gt=0)
    # The longest wait a server's Retry-After can impose (on a request, or on every worker).
    max_retry_after_seconds: float = Field(default=300.0, gt=0)
    # While every worker is held back (the service did not answer), ask it this often
    # whether it is back (the target's cheap check); the first success ends the hold.
    probe_seconds: float = Field(default=3.0, gt=0)


class InboxSettings(_Section):
    path: Path = Path("/srv/inbox")
    settle_seconds: float = Field(default=5.0, ge=0)
    after_upload: Literal["keep", "archive", "delete"] = "keep"
    archive_path: Path | None = None
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    follow_symlinks: bool = False
    rescan_seconds: float = Field(default=600.0, ge=0)
    force_polling: bool | None = None
    # A file a process keeps open for writing is taken anyway once unchanged this long (a
    # crashed or hung logger), with a warning; 0 = writers are not waited for.
    writer_timeout_seconds: float = Field(default=3600.0, ge=0)
    # A delivered file renamed or moved within the inbox (same inode, size and mtime, its old
    # path gone) is recorded as already delivered; true = upload it again under its new name.
    upload_renamed: bool = False

    @field_validator("include")
    @classmethod
    def _includes_something(cls, value: list[str]) -> list[str]:
        # An empty list (or pattern) takes no file at all, and nothing would say why.
        if not value:
            raise ValueError('takes no file at all — list at least one glob, e.g. ["*"]')
        if not all(pattern.strip() for pattern in value):
            raise ValueError('an empty glob matches no file — remove it, or write "*" for all')
        return value


class StateSettings(_Section):
    path: Path = Path("/var/lib/inboxd/state.db")
    prune_after_days: float = Field(default=30.0, gt=0)


class PollSettings(_Section):
    interval_seconds: float = Field(default=2.0, gt=0)
    batch_size: int = Field(default=100, ge=1, le=1000)


class MetricsSettings(_Section):
    # "127.0.0.1:9464" serves /metrics and /healthz there; empty = off.
    listen: str = ""


class BandwidthSettings(_Section):
    # Upload rate shared by all workers: bytes/s or "20MB", "1.5MiB", "100Mbit"; 0 = unlimited.
    limit: Annotated[str | int, BeforeValidator(_rate)] = 0
    # Upload only inside these local-time windows, e.g. ["19:00-07:00", "Sat,Sun 00:00-24:00"].
    windows: list[str] = Field(default_factory=list)


class RetentionSettings(_Section):
    # Only for after_upload = "archive"; only files confirmed imported are ever removed.
    max_age_days: float = Field(default=0.0, ge=0)  # 0 = keep archived files by age forever
    min_free_percent: float = Field(default=0.0, ge=0, le=100)  # prune oldest below this
    warn_free_percent: float = Field(default=10.0, ge=0, le=100)  # log/status/metrics warning
    interval_seconds: float = Field(default=300.0, gt=0)


#: Import plugin per file extension for the older Marple API. Only csv_plugin is named in the
#: API guide; the others follow its "<format>_plugin" naming — check them against your server.
_MARPLE_PLUGINS = {
    "csv": "csv_plugin",
    "mat": "mat_plugin",
    "h5": "hdf5_plugin",
    "hdf5": "hdf5_plugin",
    "mf4": "mdf_plugin",
    "mdf": "mdf_plugin",
    "parquet": "parquet_plugin",
    "ulg": "ulog_plugin",
    "tdms": "tdms_plugin",
}


class MarpleSettings(_Section):
    """``[marple]``: the older Marple API (``[api] kind = "marple"``): library upload + import."""

    # Folder on the file server; a file's relative folders are appended (/inboxd/session-1).
    folder: str = "/inboxd"
    # Extension (lower case, no dot) → import plugin. Entries given are merged into the
    # defaults; an empty plugin removes an extension. A route's metadata key "plugin" wins.
    plugins: dict[str, str] = Field(default_factory=lambda: dict(_MARPLE_PLUGINS))
    # Make a share link for each new source (needs workbook: a project saved in the app).
    share: bool = False
    workbook: str = ""
    # "file": one share link per source; "folder": one per folder on the file server, each new
    # source of the folder added to it (POST /library/share/{id}/add), e.g. one per test run.
    share_scope: Literal["file", "folder"] = "file"
    # Base URL of the share links (POST /library/share/{id}/link's url); "" = the server's own.
    share_url: str = ""
    # Metadata keys whose values are dates (ISO 8601; no offset = UTC): sent as UTC seconds.
    date_metadata: list[str] = Field(default_factory=list)
    # Metadata key that carries the file's modification time (UTC seconds); "" = not sent.
    modified_key: str = "timestamp_modified"

    @field_validator("folder")
    @classmethod
    def _folder_is_absolute(cls, value: str) -> str:
        parts = [p for p in value.strip().split("/") if p]
        if not value.strip().startswith("/") or any(p in (".", "..") for p in parts):
            raise ValueError('must be an absolute folder without "." or "..", e.g. "/inboxd"')
        return "/" + "/".join(parts)

    @field_validator("share_url")
    @classmethod
    def _share_url_is_http_or_empty(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with https:// (or http://), or be empty")
        return value

    @field_validator("plugins", mode="before")
    @classmethod
    def _merge_plugins(cls, value: Any) -> Any:
        # Merged, so that adding one extension does not silently drop all the others.
        if not isinstance(value, dict):
            return value
        merged = dict(_MARPLE_PLUGINS)
        for ext, plugin in value.items():
            key = str(ext).strip().lstrip(".").lower()
            if isinstance(plugin, str) and not plugin.strip():
                merged.pop(key, None)
            else:
                merged[key] = plugin
        return merged

    @model_validator(mode="after")
    def _share_needs_workbook(self) -> MarpleSettings:
        if self.share and not self.workbook.strip():
            raise ValueError(
                "share = true needs workbook: the name of a project saved in the Marple app, "
                "which the share links open"
            )
        return self


class DataServiceGrant(_Section):
    """One source grant added to every data source inboxd creates on the data service."""

    permission_type: Literal["account", "project", "user"]
    identifier: str = Field(min_length=1)
    role: Literal["edit", "view"] = "view"


def _default_adapters() -> dict[str, Literal["csv", "excel"]]:
    return {"csv": "csv", "xlsx": "excel"}


class DataServiceSettings(_Section):
    """``[data_service]``: the spreadsheet data service (``[api] kind = "data-service"``)."""

    # Base URL of the data service; empty = [api] url.
    url: str = ""
    # OAuth 1.0 credentials. The consumer key is public (it is sent in every request); the
    # secrets and the token come from the value, else the *_file next to it.
    consumer_key: str = ""
    consumer_secret: SecretStr | None = None
    consumer_secret_file: Path | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    token_secret: SecretStr | None = None
    token_secret_file: Path | None = None
    # Grant type of new data sources (the adapters' permissionType); unset = the service's
    # default ("user").
    permission_type: Literal["account", "project", "user"] | None = None
    # The data set new data sources are put into: a DataSetLink, or a name (a data set of that
    # name is created on demand, with data_set_properties); unset = none. A route's data_set
    # wins.
    data_set: DataSetRef = None
    # Properties of that data set (created with them; missing or different ones are set).
    data_set_properties: Metadata = Field(default_factory=dict)
    # Row of a CSV file that names its columns (the collection property headerRow); 0 = none,
    # the columns are then called A, B, C, ...
    csv_header_row: int = Field(default=1, ge=0)
    # Source grants added to every new data source.
    grants: list[DataServiceGrant] = Field(default_factory=list)
    # File extension → adapter; other extensions fail with a reason.
    adapters: dict[str, Literal["csv", "excel"]] = Field(default_factory=_default_adapters)
    # Seconds to wait after a rate-limit answer without Retry-After (the service advises 60).
    rate_limit_wait: float = Field(default=60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url_is_http_or_empty(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, or be empty ([api] url)")
        return value.rstrip("/")

    @field_validator("adapters")
    @classmethod
    def _extensions_normalised(cls, value: dict[str, str]) -> dict[str, str]:
        # "CSV", ".csv" and "csv" all mean the same extension.
        return {ext.strip().lstrip(".").lower(): adapter for ext, adapter in value.items()}

    def secret(self, name: Literal["consumer_secret", "token", "token_secret"]) -> SecretStr:
        """One OAuth secret: the value, else its ``*_file``; ConfigError when neither is set."""
        value: SecretStr | None = getattr(self, name)
        if value is not None and value.get_secret_value().strip():
            return SecretStr(value.get_secret_value().strip())
        path: Path | None = getattr(self, f"{name}_file")
        if path is not None:
            return read_token_file(path, f"data_service.{name}_file")
        raise ConfigError(
            f"data_service.{name}: not configured — set [data_service] {name} or {name}_file, "
            f"or the environment variable INBOXD_DATA_SERVICE__{name.upper()}"
        )

    def check_credentials(self) -> list[str]:
        """One line per missing or unreadable OAuth credential (empty when all are there)."""
        problems = []
        if not self.consumer_key.strip():
            problems.append("data_service.consumer_key: required — set the OAuth consumer key")
        names: tuple[Literal["consumer_secret", "token", "token_secret"], ...] = (
            "consumer_secret",
            "token",
            "token_secret",
        )
        for name in names:
            try:
                self.secret(name)
            except ConfigError as exc:
                problems.extend(exc.problems)
        return problems


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    """Everything inboxd can be told. Frozen: build a new one to change it."""

    model_config = SettingsConfigDict(
        env_prefix="INBOXD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    api: ApiSettings = Field(default_factory=ApiSettings)
    upload: UploadSettings = Field(default_factory=UploadSettings)
    inbox: InboxSettings = Field(default_factory=InboxSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    poll: PollSettings = Field(default_factory=PollSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    bandwidth: BandwidthSettings = Field(default_factory=BandwidthSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    data_service: DataServiceSettings = Field(default_factory=DataServiceSettings)
    marple: MarpleSettings = Field(default_factory=MarpleSettings)
    routes: list[RouteSettings] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: overrides, then environment, then the TOML file.
        return (init_settings, env_settings, InitSettingsSource(settings_cls, _toml_data.get()))


#: Where ``inboxd`` looks for its config when neither ``--config`` nor ``INBOXD_CONFIG`` names one.
DEFAULT_CONFIG = Path("/etc/inboxd/config.toml")
#: ``INBOXD_*`` variables that are not settings.
_NOT_SETTINGS = frozenset({"INBOXD_CONFIG"})


def config_path(explicit: Path | None) -> tuple[Path | None, str]:
    """The config file to read and how it was chosen: ``--config``, else ``$INBOXD_CONFIG``,
    else ``/etc/inboxd/config.toml`` when it exists; None = defaults and environment only."""
    if explicit is not None:
        return explicit, "--config"
    env = os.environ.get("INBOXD_CONFIG", "").strip()
    if env:
        return Path(env), "INBOXD_CONFIG"
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG, "default"
    return None, "none"


def load_settings(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    require_token: bool = False,
    source: str = "--config",
) -> Settings:
    """Load the settings from ``path`` (TOML), the environment and ``overrides``.

    ``source`` names where ``path`` came from in messages (``--config``, ``INBOXD_CONFIG``).
    Raises ConfigError with one line per problem: the key, the value and what to do.
    """
    data: dict[str, Any] = {}
    where = f"{source} {str(path)!r}" if source in ("--config", "INBOXD_CONFIG") else str(path)
    if path is not None:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(
                f"{where}: no such file — pass the path of your config.toml "
                "(see config.example.toml)"
            ) from None
        except PermissionError:
            raise ConfigError(
                f"{where}: permission denied — make it readable (sudo chmod 0644 {path}; "
                "keep the token in /etc/inboxd/token, not in this file) or use sudo"
            ) from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    env_problems, env_keys = _unknown_environment(os.environ)
    token = _toml_data.set(data)
    try:
        settings = Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(env_problems + _describe(exc, skip=env_keys)) from None
    except SettingsError as exc:
        # e.g. INBOXD_API='not json': an environment variable for a whole section must be JSON
        raise ConfigError(
            f"environment: {exc} — set single keys instead, e.g. INBOXD_API__URL=..."
        ) from None
    finally:
        _toml_data.reset(token)
    problems = env_problems + _cross_checks(settings)
    if require_token and settings.api.kind == "data-service":
        # The data service signs with OAuth 1.0 credentials instead of an [api] token.
        problems.extend(settings.data_service.check_credentials())
    elif require_token:
        try:
            settings.api.resolved_token()
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return settings


def _unknown_environment(environ: Mapping[str, str]) -> tuple[list[str], set[tuple[str, ...]]]:
    """One line per ``INBOXD_<SECTION>__<KEY>`` variable that names no setting, and the keys
    (section, key) it would give, so they are not blamed on the TOML file as well.

    Variables without ``__`` are left alone unless they look like a setting with one
    underscore too few (``INBOXD_UPLOAD_WORKERS``): tools may use other ``INBOXD_*`` names.
    """
    problems: list[str] = []
    keys: set[tuple[str, ...]] = set()
    sections = Settings.model_fields
    names = ", ".join(sections)
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("INBOXD_") or upper in _NOT_SETTINGS:
            continue
        rest = name[len("INBOXD_") :].lower()
        parts = rest.split("__")
        if len(parts) == 1:
            section = next((s for s in sections if rest.startswith(s + "_")), None)
            if section is not None:
                key = rest[len(section) + 1 :]
                problems.append(
                    f"environment variable {name}: not a setting — write two underscores "
                    f"between section and key: INBOXD_{section.upper()}__{key.upper()}"
                )
            continue
        section, key = parts[0], parts[1]
        if section not in sections:
            problems.append(
                f"environment variable {name}: there is no section [{section}] — check its "
                f"spelling (sections: {names})"
            )
            continue
        model = sections[section].annotation
        is_section = isinstance(model, type) and issubclass(model, BaseModel)
        if is_section and key not in model.model_fields:  # type: ignore[union-attr]
            keys.add((section, key))
            problems.append(
                f"environment variable {name}: [{section}] has no key {key!r} — check its "
                "spelling in config.example.toml"
            )
    return problems, keys


def _describe(exc: ValidationError, skip: set[tuple[str, ...]] | None = None) -> list[str]:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        value = err.get("input")
        if err["type"] == "extra_forbidden" and tuple(map(str, err["loc"])) in (skip or set()):
            continue  # reported as the environment variable that set it
        if err["type"] == "extra_forbidden":
            lines.append(
                f"{key}: unknown key — remove it or check its spelling in config.example.toml"
            )
            continue
        if err["type"] == "missing":
            lines.append(f"{key}: required — add it")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if any(word in key for word in ("token", "secret")):
            lines.append(f"{key} = <hidden>: {msg}")
        elif isinstance(value, dict | list) and value:
            # Secrets may hide in a whole section given the wrong shape ([[api]] instead of
            # [api]): a table or array is not shown; the message names what is wrong in it.
            lines.append(f"{key}: {msg}")
        else:
            lines.append(f"{key} = {value!r}: {msg}")
    return lines


def _cross_checks(settings: Settings) -> list[str]:
    problems = []
    inbox = settings.inbox
    if inbox.after_upload == "archive" and inbox.archive_path is None:
        problems.append(
            'inbox.after_upload = "archive" needs inbox.archive_path — set the folder that '
            "uploaded files are moved to"
        )
    if settings.api.ca_file is not None and not settings.api.ca_file.is_file():
        problems.append(
            f"api.ca_file = {str(settings.api.ca_file)!r}: no such file — give the PEM bundle "
            "of the CA that signed the server's certificate"
        )
    if (
        "{path}" not in settings.upload.dataset_name
        and "{name}" not in settings.upload.dataset_name
    ):
        problems.append(
            f"upload.dataset_name = {settings.upload.dataset_name!r}: must contain {{path}} or "
            "{name}, or every file would get the same dataset name"
        )
    if settings.retry.cap_seconds < settings.retry.base_seconds:
        problems.append("retry.cap_seconds must be >= retry.base_seconds")
    from daemon.net.bandwidth import parse_rate, parse_windows

    bw = settings.bandwidth
    try:
        parse_rate(bw.limit)
    except ValueError as exc:
        problems.append(f"bandwidth.limit = {bw.limit!r}: {exc}")
    try:
        parse_windows(bw.windows)
    except ValueError as exc:
        problems.append(f"bandwidth.windows = {bw.windows!r}: {exc}")
    if settings.metrics.listen:
        from daemon.net.addresses import parse_listen

        try:
            parse_listen(settings.metrics.listen, key="metrics.listen")
        except ValueError as exc:
            problems.append(f"{exc} — use a loopback address such as 127.0.0.1:9464")
    return problems
