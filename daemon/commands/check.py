"""``inboxd check``: what ``inboxd run`` will need, checked the way the service will run it.

One line per check, ``✓`` or ``✗`` (or ``-`` for a check that does not apply, with why), each
failure with its fix. Local checks come first (folders, the state directory, the token, the
metrics address), then the service (reachable, token accepted, destinations).

"As the service will run it": when the systemd unit is installed (or named with ``--unit``)
and ``check`` runs as root, folder access is checked for the unit's ``User=`` (its groups
included), the token is read from the file the unit passes as the credential ``token``
(``LoadCredential=token:…``), and the unit's ``ReadWritePaths=`` and ``ProtectHome=`` are
compared with the configured folders. Without root, folders are checked for the user running
``check``, and a token file only root may read is reported as such (``sudo inboxd check``).
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from daemon.config import Settings
from daemon.errors import ConfigError

#: Where the README installs the unit; ``--unit`` names another.
UNIT_PATHS = (
    Path("/etc/systemd/system/inboxd.service"),
    Path("/usr/lib/systemd/system/inboxd.service"),
    Path("/lib/systemd/system/inboxd.service"),
)
#: Where ProtectHome=yes hides everything (systemd.exec(5)).
_HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))


@dataclass(frozen=True)
class Line:
    """One line of ``inboxd check``: ``ok`` True (✓), False (✗) or None (- not checked);
    ``warn`` marks a line that does not stop ``run`` but deserves a look (!)."""

    ok: bool | None
    text: str
    fix: str = ""
    warn: bool = False

    def render(self) -> str:
        mark = "!" if self.ok and self.warn else {True: "✓", False: "✗", None: "-"}[self.ok]
        return f"{mark} {self.text}" + (f" — {self.fix}" if self.fix else "")


@dataclass
class Unit:
    """The parts of the installed systemd unit (with its drop-ins) that ``check`` compares."""

    path: Path
    user: str = "inboxd"
    read_write_paths: list[tuple[Path, bool]] = field(default_factory=list)  # (path, optional)
    protect_home: str = "no"
    credential: Path | None = None
    encrypted_credential: Path | None = None
    state_directory: str = ""

    @classmethod
    def load(cls, path: Path) -> Unit:
        """Read ``path`` and its ``<name>.d/*.conf`` drop-ins (later assignments win)."""
        unit = cls(path)
        files = [path]
        for drop_dir in (
            path.parent / f"{path.name}.d",
            Path(f"/etc/systemd/system/{path.name}.d"),
        ):
            if drop_dir.is_dir():
                files += sorted(drop_dir.glob("*.conf"))
        for f in dict.fromkeys(files):
            unit._read(f.read_text(encoding="utf-8", errors="replace"))
        return unit

    def _read(self, text: str) -> None:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            if section != "[Service]" or "=" not in line:
                continue
            key, value = (part.strip() for part in line.split("=", 1))
            if key == "User" and value:
                self.user = value
            elif key == "ProtectHome":
                self.protect_home = value or "no"
            elif key == "StateDirectory":
                self.state_directory = value
            elif key == "ReadWritePaths":
                if not value:
                    self.read_write_paths = []  # an empty assignment resets the list
                for item in value.split():
                    optional = item.startswith("-")
                    self.read_write_paths.append((Path(item.lstrip("-+")), optional))
            elif key in ("LoadCredential", "LoadCredentialEncrypted"):
                name, _, source = value.partition(":")
                if name == "token" and source:
                    if key == "LoadCredential":
                        self.credential, self.encrypted_credential = Path(source), None
                    else:
                        self.encrypted_credential, self.credential = Path(source), None

    def writable(self, path: Path) -> bool:
        """Whether the unit lets the service write ``path`` (ProtectSystem=strict)."""
        target = Path(os.path.abspath(path))
        if self.state_directory and target.is_relative_to(Path("/var/lib") / self.state_directory):
            return True
        return any(target.is_relative_to(p) for p, _ in self.read_write_paths)

    def hides(self, path: Path) -> bool:
        """Whether ProtectHome= hides ``path`` from the service."""
        if self.protect_home in ("no", "false", "0", ""):
            return False
        target = Path(os.path.abspath(path))
        return any(target.is_relative_to(home) for home in _HOME_DIRS)


def find_unit(explicit: Path | None) -> Unit | None:
    """The unit named with ``--unit``, else the installed one, else None."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"--unit {str(explicit)!r}: no such file — give the unit file")
        return Unit.load(explicit)
    for path in UNIT_PATHS:
        if path.is_file():
            return Unit.load(path)
    return None


@dataclass(frozen=True)
class Who:
    """The user whose access is checked."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def current(cls) -> Who:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, frozenset({os.getegid(), *os.getgroups()}))

    @classmethod
    def named(cls, name: str) -> Who | None:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return cls(name, entry.pw_uid, frozenset(os.getgrouplist(name, entry.pw_gid)))

    def may(self, path: Path, want: int) -> bool:
        """Whether this user may ``want`` (os.R_OK/W_OK/X_OK bits) ``path``, folders on the
        way included (search permission). Root may do anything but run a non-executable."""
        if self.uid == os.geteuid():
            return os.access(path, want)
        target = Path(os.path.abspath(path))
        for parent in reversed(target.parents):
            if not self._allowed(parent, os.X_OK):
                return False
        return self._allowed(target, want)

    def _allowed(self, path: Path, want: int) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.gids:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want


def local_checks(settings: Settings, unit: Unit | None) -> tuple[list[Line], SecretStr | None]:
    """Folders, state directory, token and metrics address; and the token found (if any)."""
    lines: list[Line] = []
    me = Who.current()
    who = me
    if unit is not None:
        service_user = Who.named(unit.user)
        if me.uid == 0 and service_user is not None:
            who = service_user
        elif service_user is None:
            lines.append(
                Line(
                    False,
                    f"service user {unit.user!r} (User= in {unit.path}) does not exist",
                    "create it: sudo install -m 0644 systemd/inboxd.sysusers "
                    "/usr/lib/sysusers.d/inboxd.conf && sudo systemd-sysusers",
                )
            )
        elif me.uid != service_user.uid:
            lines.append(
                Line(
                    None,
                    f"folders checked for user {me.name}, not for the service user {unit.user}",
                    "run `sudo inboxd check` to check them as the service will use them",
                )
            )
    lines += _inbox_lines(settings, who, unit)
    lines += _state_lines(settings, who, unit)
    token_lines, token = _token_lines(settings, unit)
    lines += token_lines
    lines += _metrics_lines(settings)
    return lines, token


def _inbox_lines(settings: Settings, who: Who, unit: Unit | None) -> list[Line]:
    inbox = settings.inbox
    path = inbox.path
    out: list[Line] = []
    writes = inbox.after_upload != "keep"
    if unit is not None and unit.hides(path):
        out.append(
            Line(
                False,
                f"inbox {path}: under /home, /root or /run/user, which the unit hides "
                f"(ProtectHome={unit.protect_home})",
                "add a drop-in (`sudo systemctl edit inboxd`) with ProtectHome=read-only "
                f"(or tmpfs plus BindPaths={path}); see README 'Inbox under /home'",
            )
        )
    if not path.is_dir():
        out.append(
            Line(
                True,
                f"inbox {path}: no such folder (yet); `inboxd run` starts anyway and waits for it",
                f"create it: sudo install -d -o {who.name} -g {who.name} {path}",
                warn=True,
            )
        )
    elif not who.may(path, os.R_OK | os.X_OK):
        out.append(
            Line(
                False,
                f"inbox {path}: not readable by user {who.name}",
                f"give {who.name} read access (e.g. sudo chgrp -R {who.name} {path} && "
                f"sudo chmod -R g+rX {path})",
            )
        )
    elif writes and not who.may(path, os.W_OK | os.X_OK):
        out.append(
            Line(
                False,
                f"inbox {path}: after_upload = {inbox.after_upload!r} moves files out, but "
                f"user {who.name} may not write the folder",
                f'give {who.name} write access, or set [inbox] after_upload = "keep"',
            )
        )
    else:
        access = "readable and writable" if writes else "readable"
        out.append(Line(True, f"inbox {path}: exists, {access} by user {who.name}"))
    if writes and unit is not None and path.is_dir() and not unit.writable(path):
        out.append(_read_only_under_unit(path, unit, "the inbox"))
    if inbox.after_upload == "archive" and inbox.archive_path is not None:
        archive = inbox.archive_path
        parent = archive if archive.exists() else archive.parent
        if not archive.exists() and not parent.is_dir():
            out.append(
                Line(
                    False,
                    f"archive {archive}: neither it nor its parent folder exists",
                    f"create it: sudo install -d -o {who.name} -g {who.name} {archive}",
                )
            )
        elif not who.may(parent, os.W_OK | os.X_OK):
            out.append(
                Line(
                    False,
                    f"archive {archive}: not writable by user {who.name}",
                    f"sudo chown {who.name}: {archive}",
                )
            )
        else:
            note = "" if archive.exists() else " (created at the first archived file)"
            out.append(Line(True, f"archive {archive}: writable by user {who.name}{note}"))
        if unit is not None and not unit.writable(archive):
            out.append(_read_only_under_unit(archive, unit, "the archive"))
    return out


def _read_only_under_unit(path: Path, unit: Unit, what: str) -> Line:
    listed = " ".join(str(p) for p, _ in unit.read_write_paths) or "(none)"
    return Line(
        False,
        f"{what} {path} is read-only for the service: not under the unit's ReadWritePaths= "
        f"({listed})",
        f"add it with a drop-in: `sudo systemctl edit inboxd`, [Service] "
        f"ReadWritePaths=-{path} (README 'Change paths')",
    )


def _state_lines(settings: Settings, who: Who, unit: Unit | None) -> list[Line]:
    db = settings.state.path
    folder = db.parent
    by_systemd = (
        unit is not None
        and bool(unit.state_directory)
        and Path(os.path.abspath(folder)) == Path("/var/lib") / unit.state_directory
    )
    if db.exists():
        if who.may(db, os.R_OK | os.W_OK) and who.may(folder, os.W_OK | os.X_OK):
            return [Line(True, f"state {db}: readable and writable by user {who.name}")]
        return [
            Line(
                False,
                f"state {db}: user {who.name} may not read and write it and its folder",
                f"sudo chown -R {who.name}: {folder}",
            )
        ]
    if by_systemd:
        return [Line(True, f"state folder {folder}: created by systemd at start (StateDirectory=)")]
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if who.may(existing, os.W_OK | os.X_OK):
        what = "writable" if existing == folder else f"can be created in {existing}"
        line = Line(True, f"state folder {folder}: {what} by user {who.name}")
        if unit is not None and not unit.writable(folder):
            return [line, _read_only_under_unit(folder, unit, "the state folder")]
        return [line]
    return [
        Line(
            False,
            f"state folder {folder}: user {who.name} may not create or write it",
            f"sudo install -d -m 0750 -o {who.name} -g {who.name} {folder}",
        )
    ]


def _token_lines(settings: Settings, unit: Unit | None) -> tuple[list[Line], SecretStr | None]:
    api = settings.api
    if api.kind == "data-service":
        problems = settings.data_service.check_credentials()
        if problems:
            return [Line(False, f"OAuth credentials: {p}") for p in problems], None
        return [Line(True, "OAuth credentials: consumer key, secrets and token all set")], None
    if api.token is not None and api.token.get_secret_value().strip():
        origin = "INBOXD_API__TOKEN" if os.environ.get("INBOXD_API__TOKEN") else "[api] token"
        return _token_from(api.resolved_token, f"from {origin}")
    if api.token_file is not None:
        return _token_from(api.resolved_token, f"read from [api] token_file {api.token_file}")
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / "token").exists():
        return _token_from(
            api.resolved_token, f"read from $CREDENTIALS_DIRECTORY/token ({cred_dir})"
        )
    if unit is not None and unit.encrypted_credential is not None:
        return [
            Line(
                None,
                f"token: the unit passes the encrypted credential {unit.encrypted_credential}; "
                "check cannot decrypt it, so the service checks below are skipped",
                "test it with `sudo systemd-creds decrypt --name=token "
                f"{unit.encrypted_credential} - | wc -c`",
            )
        ], None
    source: Path | None = unit.credential if unit is not None else None
    if source is None:
        source = Path("/etc/inboxd/token")
        if not source.exists():
            return [
                Line(
                    False,
                    "token: none configured ([api] token, token_file, INBOXD_API__TOKEN, or "
                    "the unit's credential /etc/inboxd/token)",
                    "put it in /etc/inboxd/token: sudo install -m 0600 /dev/stdin "
                    '/etc/inboxd/token <<< "YOUR-TOKEN"',
                )
            ], None
    how = (
        f"the unit's LoadCredential=token:{source}"
        if unit is not None and unit.credential is not None
        else "where the shipped unit's LoadCredential= reads it"
    )
    try:
        from daemon.config import read_token_file

        token = read_token_file(source, "credential 'token'")
    except ConfigError as exc:
        fix = "run `sudo inboxd check`" if os.geteuid() != 0 else "fix the file"
        return [Line(False, f"token: {exc.problems[0]}", fix)], None
    return [Line(True, f"token: read from {source} ({how})")], token


def _token_from(read: Callable[[], SecretStr], where: str) -> tuple[list[Line], SecretStr | None]:
    try:
        token = read()
    except ConfigError as exc:
        fix = "run `sudo inboxd check`" if os.geteuid() != 0 else ""
        return [Line(False, f"token: {exc.problems[0]}", fix)], None
    return [Line(True, f"token: {where}")], token


def _metrics_lines(settings: Settings) -> list[Line]:
    listen = settings.metrics.listen
    if not listen:
        return []
    from daemon.net.addresses import parse_listen

    host, port = parse_listen(listen, key="metrics.listen")
    problem = address_in_use(host, port)
    if problem is None:
        return [Line(True, f"metrics address {listen}: free")]
    if _serves_inboxd_metrics(host, port):
        return [Line(True, f"metrics address {listen}: served by the running inboxd")]
    return [
        Line(
            False,
            f"metrics address {listen}: {problem}",
            "stop the program using it, or set [metrics] listen to another port",
        )
    ]


def address_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (e.g. "in use by another program"), or None."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve it ({exc})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use by another program"
            if exc.errno == errno.EACCES:
                return "permission denied (ports below 1024 need privileges)"
            return exc.strerror or str(exc)
    return None


def _serves_inboxd_metrics(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host or "127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    return b"inboxd_up" in data


def storage_line(settings: Settings) -> Line:
    """Why no storage round trip is made: each would leave data on the server."""
    what = {
        "marple-db": "a dataset in a stream",
        "marple": "a file on the file server",
        "data-service": "a data source",
    }[settings.api.kind]
    return Line(
        None,
        f"storage round trip: not tried — the API has no way to test storage without creating "
        f"{what}",
        "to test the whole way, `inboxd push` a small file to a test destination",
    )


def group_of(path: Path) -> str | None:
    """The group owning the nearest existing folder of ``path`` (for permission advice)."""
    current = path
    while True:
        try:
            st = current.stat()
        except PermissionError:
            pass
        except OSError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode) or current == path:
                try:
                    return grp.getgrgid(st.st_gid).gr_name
                except KeyError:
                    return str(st.st_gid)
        if current == current.parent:
            return None
        current = current.parent
