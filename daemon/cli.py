"""``inboxd`` command line: ``main(argv) -> int``.

An :class:`~daemon.errors.InboxdError` that stops a command is one line on stderr and the
error's ``exit_status``: 78 for the configuration, 65 for an unusable state database, 74 for a
full state filesystem, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from daemon import __version__, logs
from daemon.config import Settings, load_settings
from daemon.errors import ConfigError, InboxdError

# Heavier modules (httpx, the upload flow, the service) are imported by the commands that need
# them: `inboxd status` runs often and should start fast.

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inboxd`` console script and ``python -m daemon``."""
    parser = _parser()
    args = parser.parse_args(argv)
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
    if isinstance(exc, ConfigError):
        print("inboxd: configuration problem:", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
    else:
        print(f"inboxd: {exc}", file=sys.stderr)
    return exc.exit_status


def _reason(exc: BaseException) -> InboxdError | None:
    """The one error to tell a person, or None when ``exc`` is a bug (let it show).

    The daemon's task groups wrap what stopped it in (nested) exception groups, together with
    whatever else failed while the group was cancelled. A state database error is a QueueError
    (see its docstring) until here.
    """
    from daemon.queue import QueueError

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
        else:
            return None
    if not leaves:
        return None
    # A classified error (a full disk, a corrupt file) says more than the generic ones that
    # other tasks may have run into on the same database meanwhile.
    return next((e for e in leaves if e.exit_status != EXIT_FAILED), leaves[0])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inboxd",
        description="Upload every file dropped into an inbox folder to Marple DB, exactly once.",
    )
    p.add_argument("--version", action="version", version=f"inboxd {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")

    push = sub.add_parser("push", help="upload files once (no daemon) and wait for their import")
    _config_arg(push)
    push.add_argument("files", nargs="+", type=Path, metavar="FILE")
    push.add_argument("--stream", help="stream id or name (default: [upload] stream)")
    push.add_argument("--name", help="dataset name (one file only; default: the file name)")
    push.add_argument(
        "--metadata", action="append", default=[], metavar="KEY=VALUE", help="extra metadata"
    )
    push.add_argument("--overwrite", action="store_true", help="replace a dataset of the same name")
    push.add_argument("--no-wait", action="store_true", help="do not wait for the import")
    push.add_argument("--wait-timeout", type=float, default=3600.0, metavar="SECONDS")
    push.add_argument("--json", action="store_true", help="print results as JSON")
    push.set_defaults(func=_cmd_push)

    check = sub.add_parser("check", help="validate the config and reach the API with the token")
    _config_arg(check)
    check.set_defaults(func=_cmd_check)

    run = sub.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    _config_arg(run)
    run.add_argument(
        "--grace",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight uploads may take to finish (default 20)",
    )
    run.set_defaults(func=_cmd_run)

    status = sub.add_parser("status", help="show queued, moving, done and failed files")
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, help="refresh interval (--watch)")
    status.add_argument("--limit", type=int, default=50, help="jobs listed per state")
    status.set_defaults(func=_cmd_status)

    retry = sub.add_parser("retry", help="requeue a failed job (or all failed jobs)")
    _config_arg(retry)
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("job_id", nargs="?", type=int, help="the job id shown by status")
    which.add_argument("--all-failed", action="store_true", help="every failed job")
    retry.set_defaults(func=_cmd_retry)

    demo = sub.add_parser(
        "demo", help="see a file go through end to end: sandbox + daemon in a temporary folder"
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    demo.set_defaults(func=_cmd_demo)

    sandbox = sub.add_parser("sandbox", help="run the local Marple-DB-compatible test server")
    from daemon.sandbox import add_sandbox_arguments

    add_sandbox_arguments(sandbox)
    sandbox.set_defaults(func=_cmd_sandbox)
    return p


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="TOML config file (see config.example.toml)")


# ---- push -------------------------------------------------------------------------------


def _cmd_push(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.stream:
        overrides["upload"] = {"stream": args.stream}
    settings = load_settings(args.config, overrides, require_token=True)
    logs.configure(settings.log.level, settings.log.format)
    if args.name and len(args.files) > 1:
        raise ConfigError("--name: only with a single FILE (each file needs its own name)")
    extra = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--metadata {item!r}: write KEY=VALUE")
        extra[key] = value
    from daemon.push import push

    results = push(settings, args, extra)
    if args.json:
        print(json.dumps({"files": results}, indent=2))
    else:
        for r in results:
            if r["error"]:
                print(f"FAILED  {r['file']}: {r['error']}")
            else:
                status = r["import_status"] or "uploaded"
                print(f"{status:<9} {r['file']} → dataset {r['dataset_id']} ({r['dataset_name']})")
    from daemon.client import FAILED_STATUSES

    failed = any(r["error"] or (r["import_status"] in FAILED_STATUSES) for r in results)
    return EXIT_FAILED if failed else EXIT_OK


# ---- check ------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, require_token=True)
    print(f"ok    config {args.config or '(defaults and environment)'}")
    if not settings.api.verify_tls:
        print("warn  TLS certificate verification is OFF ([api] verify_tls = false)")
    return anyio.run(_check, settings)


async def _check(settings: Settings) -> int:
    from daemon.targets.factory import open_target
    from daemon.upload import UploadOptions
    from daemon.watcher import completeness

    inbox = settings.inbox
    seen = await anyio.to_thread.run_sync(
        completeness, inbox.path, inbox.force_polling, inbox.writer_timeout_seconds
    )
    print(f"{'ok  ' if seen.ok else 'warn'}  {seen.text}")

    refs: list[int | str] = [settings.upload.stream]
    refs += [r.stream for r in settings.routes if r.stream is not None and r.stream not in refs]
    async with open_target(settings, UploadOptions()) as target:
        for line in await target.check(refs):
            print(f"{'ok  ' if line.ok else 'FAIL'}  {line.text}")
            if not line.ok:
                return EXIT_FAILED
    return EXIT_OK


# ---- sandbox ----------------------------------------------------------------------------


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from daemon.sandbox import config_from_args, ready_message, serve_forever

    try:
        config = config_from_args(args)
    except ValueError as exc:
        raise ConfigError(f"sandbox: {exc}") from None

    def ready(sb: Any) -> None:
        print(ready_message(sb), flush=True)

    serve_forever(config, on_ready=ready)
    return EXIT_OK


# ---- run / status / retry ----------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from daemon.service import Service
    from daemon.service_signals import catch_early_signals

    catch_early_signals()  # already done by daemon.__main__; here for other entry points
    settings = load_settings(args.config, require_token=True)
    logs.configure(settings.log.level, settings.log.format)
    anyio.run(Service(settings, grace_seconds=args.grace).run)
    return EXIT_OK


def _open_readonly(settings: Settings) -> Any:
    from daemon.errors import StateError
    from daemon.queue import Queue, QueueError

    path = settings.state.path
    if not path.exists():
        raise StateError(
            f"no state database at {path}",
            advice="the daemon has not run with this config yet (check [state] path)",
        )

    async def opener() -> Queue:
        try:
            return await Queue.open(path, readonly=True)
        except QueueError as exc:
            raise exc.as_state_error() from None

    return opener


def _cmd_status(args: argparse.Namespace) -> int:
    from daemon import status

    settings = load_settings(args.config)
    opener = _open_readonly(settings)

    async def once() -> int:
        queue = await opener()
        try:
            while True:
                snap = await status.snapshot(queue, limit=args.limit)
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
    from daemon.queue import Queue

    settings = load_settings(args.config)

    async def go() -> int:
        queue = await Queue.open(settings.state.path)
        try:
            return await queue.requeue(None if args.all_failed else args.job_id)
        finally:
            await queue.close()

    n = anyio.run(go)
    print(f"requeued {n} job(s)")
    return EXIT_OK if n else EXIT_FAILED


def _cmd_demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo

    return run_demo(keep=args.keep)
