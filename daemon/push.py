"""``inboxd push``: upload files once, without the daemon, and wait for their import."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import anyio

from daemon.client import FAILED_STATUSES, OK_STATUSES, MarpleClient, Stream
from daemon.config import Settings
from daemon.errors import InboxdError
from daemon.retry import RetryPolicy
from daemon.upload import FileRef, UploadOptions, UploadRequest, upload_file


def push(
    settings: Settings, args: argparse.Namespace, extra: dict[str, str]
) -> list[dict[str, Any]]:
    """Upload ``args.files``; one result row per file (``error`` set when it failed)."""
    return anyio.run(_push, settings, args, extra)


async def _push(
    settings: Settings, args: argparse.Namespace, extra: dict[str, str]
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    async with MarpleClient.from_settings(settings.api) as client:
        stream = await client.resolve_stream(settings.upload.stream)
        options = UploadOptions(
            policy=RetryPolicy.from_settings(settings.retry),
            part_concurrency=settings.upload.part_concurrency,
            abort_on_give_up=True,
            abort_on_cancel=True,
        )
        for path in args.files:
            results.append(await _push_one(client, stream, settings, args, path, extra, options))
        if not args.no_wait:
            await _wait_imports(client, stream, results, args.wait_timeout, args.json)
    return results


async def _push_one(
    client: MarpleClient,
    stream: Stream,
    settings: Settings,
    args: argparse.Namespace,
    path: Path,
    extra: dict[str, str],
    options: UploadOptions,
) -> dict[str, Any]:
    name = args.name or path.name
    row: dict[str, Any] = {
        "file": str(path),
        "dataset_name": name,
        "dataset_id": None,
        "mode": None,
        "import_status": None,
        "import_message": None,
        "error": None,
    }
    try:
        ref = FileRef.stat(path)
        bar = ProgressBar(name, ref.size, sys.stderr, enabled=not args.json)
        request = UploadRequest(
            file=ref,
            dataset_name=name,
            stream=stream,
            metadata={**settings.upload.metadata, **extra},
            upload_key=uuid.uuid4().hex,
            on_name_clash="overwrite" if args.overwrite else "fail",
            plugin_args=settings.upload.plugin_args,
        )
        try:
            result = await upload_file(client, request, options=options, progress=bar.add)
        finally:
            bar.close()
        row.update(dataset_id=result.dataset_id, mode=result.mode, dataset_name=result.dataset_name)
    except InboxdError as exc:
        row["error"] = str(exc)
    return row


async def _wait_imports(
    client: MarpleClient,
    stream: Stream,
    rows: list[dict[str, Any]],
    timeout: float,
    quiet: bool,
) -> None:
    pending = {r["dataset_id"]: r for r in rows if r["dataset_id"] is not None}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        try:
            statuses = await client.datasets_status(stream.id, list(pending))
        except InboxdError as exc:
            if not exc.retryable:
                raise
            statuses = []
        for st in statuses:
            row = pending.get(st.dataset_id)
            if row is None:
                continue
            row.update(import_status=st.import_status, import_message=st.import_message)
            if st.import_status in OK_STATUSES | FAILED_STATUSES:
                del pending[st.dataset_id]
        if pending:
            await anyio.sleep(0.5)
    if pending and not quiet:
        print(
            f"inboxd: {len(pending)} import(s) still running after {timeout:.0f} s", file=sys.stderr
        )


class ProgressBar:
    """One line on stderr: bytes, percent, rate and ETA. Silent when stderr is not a TTY."""

    def __init__(self, name: str, total: int, out: TextIO, *, enabled: bool = True) -> None:
        self.name, self.total, self.out = name, total, out
        self.enabled = enabled and out.isatty()
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-6)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (
            f"\r{self.name[:40]:<40} {_human(self.done)}/{_human(self.total)} {pct:5.1f}% "
            f"{_human(rate)}/s ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        self.out.write(line)
        self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
