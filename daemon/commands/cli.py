"""``inboxd`` command line: ``main(argv) -> int``.

Whatever a person can get wrong (a flag, a value, a missing file, a busy port, a permission,
the config, the state database) ends a command with one line on stderr saying what to do, and
an exit status from this table (sysexits.h where one fits; README "Exit statuses")::

    0    done
    1    something failed: `check` found a problem, `push` could not deliver a file, or the
         daemon stopped for a reason the line gives
    3    `retry`: nothing to retry (the job is not failed: queued, uploading, done, …)
    4    `retry`: the job's file was taken again since (superseded by a newer job)
    64   a bad flag or value (EX_USAGE)
    65   the state database is unusable (EX_DATAERR)
    66   a file, folder, state database or job named does not exist (EX_NOINPUT)
    74   the state filesystem is full (EX_IOERR)
    77   permission denied: the line says which group to join, or to use sudo (EX_NOPERM)
    78   the configuration is wrong, or its metrics address is in use (EX_CONFIG; systemd
         does not restart on it)
    130  interrupted (Ctrl-C)

A bug still shows its traceback: that is a report to file, not a mistake of the user's.

Why one module: the argument parser of every subcommand with its small handler, read as the
one map of the command line; a subcommand with more than a screen of logic has its own
module (status, push, check, demo, completion, install_files).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio

from daemon import __version__, extras, logs
from daemon.compat import BaseExceptionGroup
from daemon.config import Settings, config_path, load_settings
from daemon.errors import (
    ConfigError,
    InboxdError,
    NoPermissionError,
    NotThereError,
    UsageError,
)

# Heavier modules (httpx, the upload flow, the service) are imported by the commands that need
# them: `inboxd status` runs often and should start fast.

EXIT_OK, EXIT_FAILED = 0, 1
EXIT_NOTHING_TO_RETRY, EXIT_SUPERSEDED = 3, 4
EXIT_USAGE = 64


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inboxd`` console script and ``python -m daemon``."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _BadUsage as exc:
        return _report(UsageError(str(exc)))
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        reason = _reason(exc)
        if reason is None:
            raise
        return _report(reason)


def _report(exc: InboxdError) -> int:
    # Under systemd the line carries its journal priority (<3> = error), like the log lines:
    # `journalctl -u inboxd -p warning` must show why the daemon stopped.
    prefix = "<3>" if logs.journal_stream(sys.stderr) else ""
    if isinstance(exc, ConfigError):
        print(f"{prefix}inboxd: configuration problem:", file=sys.stderr)
        for line in exc.problems:
            print(f"{prefix}  {line}", file=sys.stderr)
    else:
        print(f"{prefix}inboxd: {exc}", file=sys.stderr)
    return exc.exit_status


def _reason(exc: BaseException) -> InboxdError | None:
    """The one error to tell a person, or None when ``exc`` is a bug (let it show).

    The daemon's task groups wrap what stopped it in (nested) exception groups, together with
    whatever else failed while the group was cancelled. A state database error is a QueueError
    (see its docstring) until here. An OSError is the machine's answer to something a person
    can fix (a permission, a missing file): it becomes one line too.
    """
    from daemon.state import QueueError

    leaves: list[InboxdError] = []
    pending: list[BaseException] = [exc]
    while pending:
        e = pending.pop(0)
        if isinstance(e, BaseExceptionGroup):
            pending[:0] = e.exceptions
        elif isinstance(e, QueueError):
            leaves.append(e.as_state_error())
        elif isinstance(e, InboxdError):
            leaves.append(e)
        elif isinstance(e, OSError) and e.errno is not None:
            leaves.append(_os_error(e))
        else:
            return None
    if not leaves:
        return None
    # A classified error (a full disk, a corrupt file) says more than the generic ones that
    # other tasks may have run into on the same database meanwhile.
    return next((e for e in leaves if e.exit_status != EXIT_FAILED), leaves[0])


def _os_error(exc: OSError) -> InboxdError:
    where = f" {exc.filename}" if exc.filename else ""
    said = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return NoPermissionError(
            f"permission denied:{where}", advice="use sudo, or ask for access to it"
        )
    if exc.errno == errno.ENOENT:
        return NotThereError(f"no such file or folder:{where}")
    return InboxdError(f"{said}:{where}" if where else said)


# ---- the parser: every command with a description and an example --------------------------


class _BadUsage(Exception):
    """argparse found a bad flag or value; reported as one line with exit 64."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _BadUsage(f"{message} (see `{self.prog} --help`)")


_EXAMPLES = {
    "push": """\
        examples:
          inboxd push run-0412.mf4                      # to [upload] stream, waits for import
          inboxd push --stream "Vehicle Logs" a.csv b.csv --metadata driver=kate
          inboxd push --name "2026-11-20 brake test.csv" log.csv --overwrite
        A dataset of that name made by something else: [upload] on_name_clash decides
        (rename, fail, overwrite); --overwrite replaces it.""",
    "check": """\
        examples:
          sudo inboxd check                 # as the service will run: its user, its token
          inboxd check --config ./test.toml
        Each line is ✓ (fine), ✗ (with the fix) or - (not checked, and why).
        Exit 0 when nothing is ✗, else 1; 78 when the config itself is wrong.""",
    "run": """\
        example:
          inboxd run --config /etc/inboxd/config.toml    # what the systemd unit starts
        Stops on SIGTERM/SIGINT after giving uploads --grace seconds; see README.""",
    "status": """\
        examples:
          inboxd status                      # one screen: what moves, what failed, job ids
          inboxd status --failed             # every file whose latest try failed
          inboxd status 'v7/*' --since 2h    # files under v7/ touched in the last 2 hours
          inboxd status --json | jq '.jobs[] | select(.state == "failed")'
        Read-only; members of the inboxd group may run it without sudo.""",
    "retry": """\
        examples:
          sudo inboxd retry 815              # the id from `inboxd status`
          sudo inboxd retry --all-failed
        Exit 0 requeued, 3 nothing to retry (the job is not failed), 4 the file was taken
        again since (superseded), 66 no such job, 77 not allowed (use sudo).""",
    "demo": """\
        example:
          inboxd demo          # needs nothing but this machine; prints what status shows""",
    "sandbox": """\
        examples:
          inboxd sandbox                          # http://127.0.0.1:8787, prints a config
          inboxd sandbox --port 0 --api-503-rate 0.2 --drop-response-rate 0.05
        Rates are shares of requests from 0 to 1.""",
    "install-files": """\
        examples:
          sudo inboxd install-files --dry-run     # what it would write, and where
          sudo inboxd install-files               # then: systemd-sysusers, daemon-reload
          inboxd install-files --prefix ./root    # under ./root instead of /
        Writes /etc/inboxd/config.toml only when there is none (never overwrites a config);
        the unit, sysusers file, completions and docs are replaced by this version's.""",
    "completion": """\
        examples:
          inboxd completion bash | sudo tee /etc/bash_completion.d/inboxd
          inboxd completion zsh  | sudo tee /usr/local/share/zsh/site-functions/_inboxd""",
}


def _sub(sub: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog=textwrap.dedent(_EXAMPLES[name]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of 1 or more")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="inboxd",
        description="Upload every file dropped into an inbox folder to Marple DB (or the "
        "older Marple API, or the data service), exactly once.",
        epilog="Config: --config FILE, else $INBOXD_CONFIG, else /etc/inboxd/config.toml. "
        "`inboxd COMMAND --help` shows examples.",
    )
    p.add_argument("--version", action="version", version=f"inboxd {__version__}")
    sub = p.add_subparsers(metavar="COMMAND", parser_class=_Parser)

    push = _sub(
        sub,
        "push",
        "upload files once (no daemon) and wait for their import",
        "Deliver files once through the configured service ([api] kind), with a progress "
        "bar, and wait for their import. Nothing is queued: a file that cannot be delivered "
        "is reported and the command exits 1.",
    )
    _config_arg(push)
    push.add_argument("files", nargs="+", type=Path, metavar="FILE")
    push.add_argument("--stream", help="stream id or name (default: [upload] stream)")
    push.add_argument("--name", help="dataset name (one file only; default: the file name)")
    push.add_argument(
        "--metadata", action="append", default=[], metavar="KEY=VALUE", help="extra metadata"
    )
    push.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset of the same name (default: [upload] on_name_clash)",
    )
    push.add_argument("--no-wait", action="store_true", help="do not wait for the import")
    push.add_argument("--wait-timeout", type=_positive, default=3600.0, metavar="SECONDS")
    push.add_argument("--json", action="store_true", help="print results as JSON")
    push.set_defaults(func=_cmd_push)

    check = _sub(
        sub,
        "check",
        "check everything `run` will need, as the service will run it",
        "Check the config, the inbox, archive and state folders, the token (saying where it "
        "was read), the metrics address, then the service: reachable, token accepted, "
        "streams. Run as root, it checks folders for the unit's user and reads the token the "
        "way the unit passes it.",
    )
    _config_arg(check)
    check.add_argument(
        "--unit",
        type=Path,
        metavar="FILE",
        help="the systemd unit to check against (default: the installed inboxd.service)",
    )
    check.set_defaults(func=_cmd_check)

    run = _sub(
        sub,
        "run",
        "run the daemon in the foreground (what systemd starts)",
        "Watch the inbox and upload every file exactly once until stopped.",
    )
    _config_arg(run)
    run.add_argument(
        "--grace",
        type=_positive,
        default=20.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight uploads may take to finish (default 20)",
    )
    run.set_defaults(func=_cmd_run)

    status = _sub(
        sub,
        "status",
        "show what is queued, moving, done and failed (job ids included)",
        "Show the daemon and every file's latest outcome: one line per file, with the job "
        "id `retry` takes. A failure whose file was taken again since is shown as fixed "
        "(superseded), not failed.",
    )
    _config_arg(status)
    status.add_argument("pattern", nargs="?", metavar="PATH_GLOB", help="only these files")
    status.add_argument("--failed", action="store_true", help="only files whose try failed")
    status.add_argument("--since", metavar="WHEN", help="only jobs changed since (2h, 3d, date)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument(
        "--interval", type=_positive, default=1.0, help="refresh interval (--watch)"
    )
    status.add_argument("--limit", type=_count, default=50, help="jobs listed per state")
    status.set_defaults(func=_cmd_status)

    retry = _sub(
        sub,
        "retry",
        "requeue a failed job (or all failed jobs) after a fix",
        "Put a failed job back in the queue, from scratch. Each refusal says why.",
    )
    _config_arg(retry)
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("job_id", nargs="?", type=_count, help="the job id shown by status")
    which.add_argument("--all-failed", action="store_true", help="every failed job")
    retry.set_defaults(func=_cmd_retry)

    demo = _sub(
        sub,
        "demo",
        "see files go through end to end: sandbox + daemon in a temporary folder",
        "Start the sandbox and the daemon on a temporary inbox, drop three files that take "
        "the server, single and multipart modes, and show what status shows.",
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    demo.set_defaults(func=_cmd_demo)

    sandbox = _sub(
        sub,
        "sandbox",
        "run the local test server (Marple DB, the older Marple API, the data service)",
        "Serve the three services inboxd delivers to on loopback, as strictly as the real "
        "ones, with faults to try things out. Prints a config snippet for each.",
    )
    from daemon.sandbox import add_sandbox_arguments

    add_sandbox_arguments(sandbox)
    sandbox.set_defaults(func=_cmd_sandbox)

    completion = _sub(
        sub,
        "completion",
        "print a shell completion script (bash or zsh)",
        "Print the completion script for a shell; the README's install steps install it.",
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(func=_cmd_completion)

    install_files = _sub(
        sub,
        "install-files",
        "install the config, systemd unit, sysusers file and completions (run with sudo)",
        "Write the files a service install needs from this installation of inboxd (no "
        "checkout needed): /etc/inboxd/config.toml (only if absent), "
        "/etc/systemd/system/inboxd.service (ExecStart= this inboxd), "
        "/usr/lib/sysusers.d/inboxd.conf, the bash and zsh completions, and "
        "/usr/share/doc/inboxd/ (README, example config, licence).",
    )
    install_files.add_argument(
        "--prefix",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help="write under DIR as if it were / (default: /)",
    )
    install_files.add_argument(
        "--dry-run", action="store_true", help="only print what would be written"
    )
    install_files.set_defaults(func=_cmd_install_files)
    return p


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        help="TOML config file (default: $INBOXD_CONFIG, else /etc/inboxd/config.toml)",
    )


def _settings(
    args: argparse.Namespace,
    overrides: dict[str, Any] | None = None,
    *,
    require_token: bool = False,
) -> tuple[Settings, Path | None, str]:
    path, source = config_path(args.config)
    settings = load_settings(path, overrides, require_token=require_token, source=source)
    return settings, path, source


# ---- push -------------------------------------------------------------------------------


def _cmd_push(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.stream:
        overrides["upload"] = {"stream": args.stream}
    if args.overwrite:
        overrides.setdefault("upload", {})["on_name_clash"] = "overwrite"
    settings, _, _ = _settings(args, overrides, require_token=True)
    extras.require_for_kind(settings.api.kind)
    logs.configure(settings.log.level, settings.log.format)
    if args.name and len(args.files) > 1:
        raise UsageError("--name: only with a single FILE (each file needs its own name)")
    missing = [str(f) for f in args.files if not f.exists()]
    if missing:
        raise NotThereError(
            f"no such file: {', '.join(missing)}", advice="check the path; nothing was uploaded"
        )
    extra = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata {item!r}: write KEY=VALUE")
        extra[key] = value
    from daemon.commands.push import PushRequest, push

    request = PushRequest(
        files=list(args.files),
        name=args.name,
        stream_from="--stream" if args.stream else "[upload] stream in the config",
        metadata=extra,
        wait=not args.no_wait,
        wait_timeout=args.wait_timeout,
        quiet=args.json,
    )
    results = push(settings, request)
    if args.json:
        print(json.dumps({"files": results}, indent=2))
    else:
        for r in results:
            if r["error"]:
                print(f"FAILED    {r['file']}: {r['error']}")
            else:
                state = r["import_status"] or "uploaded"
                where = f"dataset {r['dataset_id']}" if r["dataset_id"] is not None else "sent"
                print(f"{state:<9} {r['file']} → {where} ({r['dataset_name']})")
    failed = any(r["error"] for r in results)
    return EXIT_FAILED if failed else EXIT_OK


# ---- check ------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    from daemon.commands.check import Line, find_unit, local_checks, storage_line

    settings, path, source = _settings(args)
    extras.require_for_kind(settings.api.kind)
    shown = {
        "--config": f"{path} (--config)",
        "INBOXD_CONFIG": f"{path} ($INBOXD_CONFIG)",
        "default": f"{path} (the default path)",
    }.get(source)
    lines: list[Line] = []
    if shown is None:
        lines.append(
            Line(
                None,
                "config: no file at /etc/inboxd/config.toml; defaults and environment only",
                "install one (README 'Install') or pass --config",
            )
        )
    else:
        lines.append(Line(True, f"config {shown}: valid"))
    if not settings.api.verify_tls:
        lines.append(Line(False, "TLS certificate verification is OFF ([api] verify_tls)"))
    unit = find_unit(args.unit)
    local, token = local_checks(settings, unit)
    lines += local
    from daemon.intake.watcher import completeness

    inbox = settings.inbox
    seen = completeness(inbox.path, inbox.force_polling, inbox.writer_timeout_seconds)
    lines.append(Line(True, seen.text, warn=not seen.ok))
    for line in lines:
        print(line.render(), flush=True)
    ready = settings.api.kind == "data-service" or token is not None
    if not ready:
        print("- service checks skipped: no token to try", flush=True)
        return EXIT_FAILED
    if token is not None:
        api = settings.api.model_copy(update={"token": token, "token_file": None})
        settings = settings.model_copy(update={"api": api})
    remote_ok = anyio.run(_check_service, settings)
    print(storage_line(settings).render())
    ok = remote_ok and all(line.ok is not False for line in lines)
    return EXIT_OK if ok else EXIT_FAILED


async def _check_service(settings: Settings) -> bool:
    from daemon.delivery.factory import open_target
    from daemon.delivery.flow import UploadOptions

    refs: list[int | str] = [settings.upload.stream]
    refs += [r.stream for r in settings.routes if r.stream is not None and r.stream not in refs]
    if settings.api.kind != "marple-db":
        refs = []
    ok = True
    async with open_target(settings, UploadOptions()) as target:
        for line in await target.check(refs):
            mark = "✗" if not line.ok else "!" if line.warn else "✓"
            print(f"{mark} {line.text}", flush=True)
            ok = ok and line.ok
    return ok


# ---- sandbox ----------------------------------------------------------------------------


def _cmd_sandbox(args: argparse.Namespace) -> int:
    extras.require("sandbox", "`inboxd sandbox`")
    from daemon.commands.check import address_in_use
    from daemon.sandbox import config_from_args, ready_message, serve_forever

    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise UsageError(f"sandbox: {exc}") from None
    if config.port:
        busy = address_in_use(config.host, config.port)
        if busy is not None:
            raise UsageError(
                f"sandbox: cannot listen on {config.host}:{config.port}: {busy}",
                advice="stop it (another `inboxd sandbox`?), or pick another --port "
                "(0 = any free port)",
            )

    def ready(sb: Any) -> None:
        print(ready_message(sb), flush=True)

    serve_forever(config, on_ready=ready)
    return EXIT_OK


# ---- run / status / retry ----------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from daemon.service.run import Service
    from daemon.service.signals import catch_early_signals

    catch_early_signals()  # already done by daemon.__main__; here for other entry points
    settings, _, _ = _settings(args, require_token=True)
    extras.require_for_kind(settings.api.kind)
    logs.configure(settings.log.level, settings.log.format)
    anyio.run(Service(settings, grace_seconds=args.grace).run)
    return EXIT_OK


def _no_permission(path: Path, *, write: bool = False) -> NoPermissionError:
    from daemon.commands.check import group_of

    user = _user()
    if write:
        return NoPermissionError(
            f"user {user} may not change the state database {path}",
            advice="`retry` changes the queue: run it with sudo",
        )
    group = group_of(path.parent) or "inboxd"
    return NoPermissionError(
        f"user {user} may not read the state database {path}",
        advice=f"join its group: `sudo usermod -aG {group} {user}`, then log in again (the "
        f"unit must have StateDirectoryMode=0750, see README 'Install'); or use sudo",
    )


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _state_path(settings: Settings, *, write: bool = False) -> Path:
    """The state database, checked for this user: a line with the fix instead of a traceback."""
    path = settings.state.path
    try:
        exists = path.exists()
    except PermissionError:
        raise _no_permission(path, write=write) from None
    if not exists:
        raise NotThereError(
            f"no state database at {path}",
            advice="the daemon has not run with this config yet (check [state] path and --config)",
        )
    if not os.access(path, os.R_OK | (os.W_OK if write else 0)):
        raise _no_permission(path, write=write)
    return path


def _cmd_status(args: argparse.Namespace) -> int:
    from daemon.commands import status
    from daemon.state import Queue, QueueError

    settings, _, _ = _settings(args)
    since = None
    if args.since:
        try:
            since = status.parse_since(args.since)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    filters = status.Filters(failed_only=args.failed, path_glob=args.pattern, since=since)
    path = _state_path(settings)

    async def once() -> int:
        try:
            queue = await Queue.open(path, readonly=True)
        except QueueError as exc:
            raise exc.as_state_error() from None
        try:
            while True:
                snap = await status.snapshot(queue, limit=args.limit, filters=filters)
                if args.json:
                    print(status.to_json(snap), flush=True)
                else:
                    if args.watch and sys.stdout.isatty():
                        sys.stdout.write("\x1b[H\x1b[2J")
                    print(status.render(snap), flush=True)
                if not args.watch:
                    return EXIT_OK
                await anyio.sleep(args.interval)
        finally:
            await queue.close()

    return anyio.run(once)


def _cmd_retry(args: argparse.Namespace) -> int:
    from daemon.state import JobState, Queue, QueueError

    settings, _, _ = _settings(args)
    path = _state_path(settings, write=True)

    async def go() -> tuple[int, str]:
        try:
            queue = await Queue.open(path)
        except QueueError as exc:
            raise exc.as_state_error() from None
        try:
            if args.all_failed:
                n = await queue.requeue(None)
                if n:
                    return EXIT_OK, f"requeued {n} job(s)"
                fixed = await queue.count_superseded_failures()
                extra = (
                    f" ({fixed} earlier failure(s) were fixed by newer versions)" if fixed else ""
                )
                return EXIT_NOTHING_TO_RETRY, f"nothing to retry: no failed job{extra}"
            job = await queue.get(args.job_id)
            if job is None:
                raise NotThereError(
                    f"no job {args.job_id}",
                    advice="`inboxd status` lists the job ids (finished jobs are pruned after"
                    " [state] prune_after_days)",
                )
            newer = await queue.newest_job_of(job.id)
            if job.state == JobState.SUPERSEDED or (job.state == JobState.FAILED and newer):
                later = f"job {newer}" if newer else "a newer job"
                return EXIT_SUPERSEDED, (
                    f"not retried: job {job.id} ({job.identity.rel}) was superseded — the file"
                    f" was taken again since as {later}; see `inboxd status`"
                )
            if job.state != JobState.FAILED:
                return EXIT_NOTHING_TO_RETRY, (
                    f"not retried: job {job.id} ({job.identity.rel}) is {job.state.value}: "
                    + _NOT_FAILED[job.state]
                )
            await queue.requeue(job.id)
            return EXIT_OK, f"requeued job {job.id} ({job.identity.rel})"
        finally:
            await queue.close()

    code, message = anyio.run(go)
    print(message, file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code


_NOT_FAILED = {
    "queued": "it is waiting for its (next) try already",
    "uploading": "it is being uploaded now",
    "importing": "it was uploaded; the server is importing it",
    "done": "it was delivered; nothing to retry",
    "superseded": "the file changed; its new version is another job",
    "failed": "",
}


def _cmd_demo(args: argparse.Namespace) -> int:
    extras.require("sandbox", "`inboxd demo`")
    from daemon.commands.demo import run_demo

    return run_demo(keep=args.keep)


def _cmd_completion(args: argparse.Namespace) -> int:
    from daemon.commands.completion import script

    print(script(args.shell, _parser()))
    return EXIT_OK


def _cmd_install_files(args: argparse.Namespace) -> int:
    from daemon.commands.completion import script
    from daemon.commands.install_files import install

    install(args.prefix, lambda shell: script(shell, _parser()), dry_run=args.dry_run)
    return EXIT_OK
