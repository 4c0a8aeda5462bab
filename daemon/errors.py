"""The one exception tree of inboxd, split by what the caller does next.

::

    InboxdError                      every error inboxd raises on purpose
    ├── ConfigError                  fix the configuration (exit status 78)
    ├── UsageError                   a bad flag or value on the command line (64)
    ├── NotThereError                a file or job named on the command line is not there (66)
    ├── NoPermissionError            this user may not (77): join the group, or use sudo
    ├── MissingExtraError            an optional part (an extra) is not installed (78)
    ├── StateError                   the state database is unusable; fix or move it
    │   ├── StateDataError           not a usable inboxd database: restore or move it (exit 65)
    │   └── StateFullError           its filesystem is full: free space (exit 74)
    ├── ApiError                     the Marple DB API answered with an error
    │   ├── AuthError                403: token missing, wrong or revoked — pause, fix the token
    │   ├── NotFoundError            404: unknown stream, ingestion or dataset — give up
    │   ├── ConflictError            409: name taken, or ingestion in another state — decide
    │   ├── RejectedError            400/405/413/422…: the request itself is wrong — give up
    │   ├── LockedError              423: the resource is being refreshed — wait, then retry
    │   ├── TransientApiError        the service is busy or failing: retry (``retry_after``)
    │   │   ├── RateLimitedError     429: retry after ``retry_after`` seconds
    │   │   └── ServerError          5xx: retry with backoff
    │   └── ProtocolError            a 2xx answer we cannot understand — retry a few times
    ├── TransportError               no (complete) answer: connect/read failure, timeout, reset
    ├── StorageError                 a presigned/SAS storage request failed — retry, then fall back
    │   └── UrlExpiredError          the signed URL expired — fetch fresh URLs
    ├── NotYetError                  the service allows this step only later: the job waits
    ├── FileProblem                  the local file cannot be uploaded as it is
    │   ├── FileChangedError         it changed (or vanished) while being uploaded — restart it
    │   └── EmptyFileError           0 bytes: the API refuses ``file_size`` 0
    └── UploadFailed                 an ingestion ended in ``abort``; ``reason`` says why

Every error carries ``retryable`` (may the same step be tried again?) and ``advice``
(what a person should do), and its ``str()`` never contains a token or a signed URL. When one
stops ``inboxd``, it exits with the error's ``exit_status`` (sysexits.h), so systemd can tell a
problem that will not fix itself (``RestartPreventExitStatus=``) from one that may clear up.
"""

from __future__ import annotations

import re
from typing import ClassVar

#: ``Authorization: Bearer <token>`` as httpx, a server or a bug may echo it in a message
_BEARER = re.compile(r"Bearer\s+[^\s'\"]+")


def scrub_secrets(text: str, secret: str = "") -> str:
    """``text`` (from httpx, a server's answer, a bug's message) without any bearer token, nor
    ``secret`` itself when given: the one scrub before such text reaches an error or a log."""
    text = _BEARER.sub("Bearer <redacted>", text)
    return text.replace(secret, "<redacted>") if secret else text


class InboxdError(Exception):
    """Base of every error inboxd raises on purpose."""

    retryable: ClassVar[bool] = False
    #: Short machine-readable category, recorded in the queue and in metrics.
    kind: ClassVar[str] = "error"
    #: What ``inboxd`` exits with when this error stops it.
    exit_status: ClassVar[int] = 1
    advice: str = ""

    def __init__(self, message: str, *, advice: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if advice is not None:
            self.advice = advice

    def __str__(self) -> str:
        if self.advice:
            return f"{self.message} — {self.advice}"
        return self.message


class ConfigError(InboxdError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    kind = "config"
    exit_status: ClassVar[int] = 78  # EX_CONFIG; systemd's RestartPreventExitStatus=78

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


class UsageError(InboxdError):
    """A command was given a bad flag, value or combination (exit status 64, EX_USAGE)."""

    kind = "usage"
    exit_status: ClassVar[int] = 64


class NotThereError(InboxdError):
    """A file, folder or job a command was pointed at does not exist (66, EX_NOINPUT)."""

    kind = "not_there"
    exit_status: ClassVar[int] = 66


class NoPermissionError(InboxdError):
    """This user may not do it (77, EX_NOPERM): the message says whom to ask or what to join."""

    kind = "permission"
    exit_status: ClassVar[int] = 77


class MissingExtraError(InboxdError):
    """A command or ``[api] kind`` needs an optional part of inboxd (an extra of
    ``pyproject.toml``) that this installation lacks: install it (exit status 78, EX_CONFIG:
    the installation does not fit the configuration, and restarting never fixes it)."""

    kind = "missing_extra"
    exit_status: ClassVar[int] = 78


class StateError(InboxdError):
    """The state database cannot be used (corrupt, too new, unwritable)."""

    kind = "state"


class StateDataError(StateError):
    """The file is not a database this inboxd can use: corrupt, not SQLite, a directory, a
    newer schema, a failed upgrade. Starting again reads the same bytes: it never fixes itself."""

    exit_status = 65  # EX_DATAERR; systemd's RestartPreventExitStatus=65


class StateFullError(StateError):
    """The filesystem holding the state database is full. It may clear up (a log rotated, a
    person freed space), so a restart later is worth it."""

    exit_status = 74  # EX_IOERR


class StateLostError(StateError):
    """The state database was deleted or replaced under the running daemon. A restart opens
    what is at the path now, so it is worth one (unlike a corrupt file)."""

    exit_status = 75  # EX_TEMPFAIL: not in the unit's RestartPreventExitStatus=


class ApiError(InboxdError):
    """The Marple DB API answered with an error status (or an error body)."""

    kind = "api"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        endpoint: str = "",
        advice: str | None = None,
    ) -> None:
        self.status = status
        self.endpoint = endpoint
        prefix = f"{endpoint}: " if endpoint else ""
        code = f"HTTP {status}: " if status is not None else ""
        super().__init__(f"{prefix}{code}{message}", advice=advice)
        self.detail = message


class AuthError(ApiError):
    kind = "auth"
    advice = (
        "the API token is missing, wrong, expired or lacks access; set a valid token "
        "([api] token / token_file / INBOXD_API__TOKEN) and run `inboxd check`"
    )


class NotFoundError(ApiError):
    kind = "not_found"


class ConflictError(ApiError):
    kind = "conflict"


class RejectedError(ApiError):
    kind = "rejected"


class LockedError(ApiError):
    """423 Locked: the resource is busy on the service's side (the data service answers it for
    a collection being refreshed). Nothing was done; the same step may be tried again."""

    retryable = True
    kind = "locked"


class TransientApiError(ApiError):
    """The service refused for now (429) or failed (5xx): the same request may be tried again,
    after ``retry_after`` seconds when the answer carried ``Retry-After`` (429 and 503 may)."""

    retryable = True
    kind = "transient"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        endpoint: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, endpoint=endpoint)
        self.retry_after = retry_after


class RateLimitedError(TransientApiError):
    """429 Too Many Requests: the request was refused before any work was done."""

    kind = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 429,
        endpoint: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, endpoint=endpoint, retry_after=retry_after)


class ServerError(TransientApiError):
    """5xx: the service failed; the request may or may not have done its work."""

    kind = "server"


class ProtocolError(ApiError):
    """A success status with a body we cannot use (invalid JSON, missing fields)."""

    retryable = True
    kind = "protocol"
    #: an ingestion the unusable answer still named (``POST /ingestion``): abort it
    ingestion_id: int | None = None


class TransportError(InboxdError):
    """No complete answer arrived. The request may or may not have reached the server."""

    retryable = True
    kind = "network"

    def __init__(self, message: str, *, maybe_sent: bool = True, advice: str | None = None):
        super().__init__(message, advice=advice)
        #: False only when we know the server never saw the request (connect failed).
        self.maybe_sent = maybe_sent


class StorageError(InboxdError):
    """A request to a presigned storage URL failed."""

    retryable = True
    kind = "storage"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after: float | None = None


class UrlExpiredError(StorageError):
    kind = "url_expired"


class NotYetError(InboxdError):
    """The service allows this step only in ``delay`` seconds (e.g. the data service's refresh
    interval: a data source may not be overwritten more often). Nothing was sent; the job goes
    back to the queue until then, so no worker waits idle for it."""

    retryable = True
    kind = "not_yet"

    def __init__(self, message: str, *, delay: float, advice: str | None = None) -> None:
        super().__init__(message, advice=advice)
        self.delay = max(0.0, delay)


class FileProblem(InboxdError):
    """The local file cannot be uploaded as it is."""

    kind = "file"


class FileChangedError(FileProblem):
    kind = "file_changed"
    advice = "the file was modified, replaced or removed while it was uploaded; it will be retaken"


class EmptyFileError(FileProblem):
    kind = "empty_file"
    advice = (
        "Marple DB refuses empty files (file_size must be > 0); write data into it or remove it"
    )


class UploadFailed(InboxdError):
    """The ingestion could not be finished and was aborted on the server."""

    kind = "upload_failed"

    def __init__(self, reason: str, *, cause_kind: str = "upload_failed") -> None:
        super().__init__(reason)
        self.reason = reason
        #: the ``kind`` of the error that made the upload give up
        self.cause_kind = cause_kind
