"""One timed upload, run as its own process by ``bench/push_throughput.py``.

    python bench/_push_driver.py inboxd RESULT_JSON -- <inboxd CLI arguments>
    python bench/_push_driver.py sdk RESULT_JSON URL TOKEN STREAM FILE NAME CONCURRENCY
    python bench/_push_driver.py sdk-loop RESULT_JSON URL TOKEN STREAM DIR COUNT

``inboxd`` runs exactly what the ``inboxd`` console script runs (``daemon.commands.cli.main``) with
the given arguments; ``sdk`` runs the official ``marpledata`` SDK's ``DataStream.push_file``.
Writes ``{"import_s", "upload_s", "ok", ...}`` to RESULT_JSON: ``import_s`` is the time to import
the client library, ``upload_s`` the time from the first API call to the return of the upload
(connection check, ingestion, parts, complete), without interpreter start and imports
(``httpcore`` counts as an import: httpx only imports it when the first client is built).
The caller wraps this process in ``/usr/bin/time`` for its peak RSS and CPU time.
"""

from __future__ import annotations

import io
import json
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path


def _inboxd(result: Path, argv: list[str]) -> int:
    t0 = time.perf_counter()
    import httpcore  # noqa: F401 - httpx imports it lazily when the first client is made

    from daemon.commands import cli

    t1 = time.perf_counter()
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(argv)
    t2 = time.perf_counter()
    text = out.getvalue()
    sys.stdout.write(text)
    detail: dict[str, object] = {"rc": rc, "daemon_from": str(Path(cli.__file__).parent)}
    try:
        files = json.loads(text)["files"]
        detail["mode"] = files[0].get("mode")
        detail["error"] = files[0].get("error")
    except (ValueError, KeyError, IndexError, TypeError):
        detail["error"] = f"unparsable CLI output: {text[:300]!r}"
    ok = rc == 0 and not detail.get("error")
    result.write_text(json.dumps({"import_s": t1 - t0, "upload_s": t2 - t1, "ok": ok, **detail}))
    return 0 if ok else 1


def _sdk(result: Path, url: str, token: str, stream: str, file: str, name: str, conc: str) -> int:
    t0 = time.perf_counter()
    from marple import DB, __version__

    t1 = time.perf_counter()
    error = None
    try:
        db = DB(token, url)  # checks the connection: GET /health, GET /streams
        # The SDK as it is: the sandbox serves the shapes its models want (issue #13).
        ds = db.get_stream(int(stream)).push_file(file, file_name=name, concurrency=int(conc))
        dataset_id = ds.id
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        dataset_id = None
    t2 = time.perf_counter()
    result.write_text(
        json.dumps(
            {
                "import_s": t1 - t0,
                "upload_s": t2 - t1,
                "ok": error is None,
                "error": error,
                "dataset_id": dataset_id,
                "sdk_version": __version__,
            }
        )
    )
    return 0 if error is None else 1


def _sdk_loop(result: Path, url: str, token: str, stream: str, folder: str, count: str) -> int:
    """``push_file`` for the first COUNT files of DIR, one after the other (bench/wan_bench.py).

    ``upload_s`` runs from the first ``push_file`` to the return of the last; CPU time is read
    around the same window (the caller's ``/usr/bin/time`` would count imports too)."""
    import resource

    from marple import DB, __version__

    files = sorted(Path(folder).iterdir())[: int(count)]
    error = None
    db = DB(token, url)
    target = db.get_stream(int(stream))
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    done = 0
    try:
        for path in files:
            target.push_file(str(path), file_name=path.name)
            done += 1
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    t1 = time.perf_counter()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    result.write_text(
        json.dumps(
            {
                "upload_s": t1 - t0,
                "files": done,
                "cpu_s": cpu,
                "ok": error is None,
                "error": error,
                "sdk_version": __version__,
            }
        )
    )
    return 0 if error is None else 1


def main(argv: list[str]) -> int:
    kind, result = argv[0], Path(argv[1])
    if kind == "inboxd":
        rest = argv[2:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        return _inboxd(result, rest)
    if kind == "sdk":
        return _sdk(result, *argv[2:8])
    if kind == "sdk-loop":
        return _sdk_loop(result, *argv[2:7])
    raise SystemExit(f"unknown driver {kind!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
