"""Operating the daemon: metrics scraped over HTTP from a running service, health, config."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import load_settings
from daemon.errors import ConfigError
from daemon.sandbox import Sandbox
from tests.support.data import write_file
from tests.support.runner import counts, running_service, write_config
from tests.support.waits import wait_until


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_and_healthz_of_a_running_daemon(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.faults.fail_next["POST /ingestion"] = [503]
    config = write_config(tmp_path, sandbox, metrics={"listen": "127.0.0.1:0"})
    inbox = tmp_path / "inbox"
    write_file(inbox / "a.csv", 1000, 1)
    write_file(inbox / "b.mf4", 700 * 1024, 2)
    (inbox / "empty.csv").write_bytes(b"")
    sandbox.faults.fail_import_glob = "*.mf4"

    async def finished() -> bool:
        c = await counts(config)
        return c.get("done") == 1 and c.get("failed") == 2

    async with running_service(config, probe_seconds=0.2) as svc:
        await wait_until(finished)
        assert svc.metrics_server is not None
        url = svc.metrics_server.url
        async with httpx.AsyncClient() as http:
            scrape = await http.get(f"{url}/metrics")
            health = await http.get(f"{url}/healthz")
            sandbox.config.token = "revoked"
            write_file(inbox / "later.csv", 10, 3)
            await wait_until(lambda: svc.pause.paused)
            unhealthy = await http.get(f"{url}/healthz")
            paused = _samples((await http.get(f"{url}/metrics")).text)
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = _samples(scrape.text)
    assert m[("inboxd_files_uploaded_total", ())] == 2
    assert m[("inboxd_bytes_uploaded_total", ())] == 1000 + 700 * 1024
    assert m[("inboxd_retries_total", (("reason", "server"),))] >= 1
    assert m[("inboxd_failures_total", (("reason", "empty_file"),))] == 1
    assert m[("inboxd_failures_total", (("reason", "import"),))] == 1
    assert m[("inboxd_imports_total", (("outcome", "finished"),))] == 1
    assert m[("inboxd_imports_total", (("outcome", "failed"),))] == 1
    assert m[("inboxd_queue_jobs", (("state", "done"),))] == 1
    assert m[("inboxd_queue_jobs", (("state", "failed"),))] == 2
    assert m[("inboxd_upload_duration_seconds_count", ())] == 2
    assert m[("inboxd_last_upload_success_timestamp_seconds", ())] > 1.7e9
    assert m[("inboxd_paused", ())] == 0
    assert health.status_code == 200
    assert unhealthy.status_code == 503
    assert "paused" in unhealthy.text and "token" in unhealthy.text
    assert paused[("inboxd_paused", ())] == 1


def test_metrics_listen_must_be_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[metrics]\nlisten = "0.0.0.0:9464"\n')
    with pytest.raises(ConfigError, match="metrics"):
        load_settings(cfg)
    cfg.write_text('[metrics]\nlisten = "[::1]:9464"\n')
    assert load_settings(cfg).metrics.listen == "[::1]:9464"


async def test_upload_window_closed_holds_uploads_and_status_says_so(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    import datetime as dt
    import json

    from tests.support.runner import inboxd

    now = dt.datetime.now()
    start = (now + dt.timedelta(hours=2)).strftime("%H:%M")
    end = (now + dt.timedelta(hours=3)).strftime("%H:%M")
    config = write_config(
        tmp_path,
        sandbox,
        bandwidth={"windows": [f"{start}-{end}"]},
        metrics={"listen": "127.0.0.1:0"},
    )
    write_file(tmp_path / "inbox" / "waits.csv", 100)

    async def queued() -> bool:
        return (await counts(config)).get("queued") == 1

    async with running_service(config) as svc:
        await wait_until(queued)
        await wait_until(lambda: svc.workers is not None and svc.workers.window_opens_at)
        svc._beat_now.set()  # a heartbeat now rather than in 2 s
        assert svc.metrics_server is not None
        async with httpx.AsyncClient() as http:
            m = _samples((await http.get(f"{svc.metrics_server.url}/metrics")).text)

        async def shown() -> bool:
            out = inboxd("status", "--config", str(config), "--json")
            doc = json.loads(out.stdout)
            return bool((doc["daemon"]["window"] or {}).get("waiting_until"))

        await wait_until(shown, timeout=10)
        human = inboxd("status", "--config", str(config)).stdout
    assert "uploads wait for the upload window" in human and start in human
    assert m[("inboxd_upload_window_open", ())] == 0
    assert sandbox.ingestions == {}


async def test_rate_limit_applies_to_daemon_uploads(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox, bandwidth={"limit": "1MiB"}, upload={"workers": 2})
    write_file(tmp_path / "inbox" / "a.bin", 1024 * 1024, 1)
    write_file(tmp_path / "inbox" / "b.bin", 1024 * 1024, 2)

    async def done() -> bool:
        return (await counts(config)).get("done") == 2

    async with running_service(config):
        await wait_until(done, timeout=30)
    times = sorted(r.time for r in sandbox.requests if r.kind == "storage" or "upload" in r.path)
    # 2 MiB shared by both workers at 1 MiB/s: about 2 s, minus the 0.1 s burst.
    assert times[-1] - times[0] >= 1.6


async def test_archive_retention_removes_only_confirmed_files(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    (archive / "stranger").mkdir(parents=True)
    (archive / "stranger" / "not-ours.csv").write_bytes(b"keep me")
    config = write_config(
        tmp_path,
        sandbox,
        inbox={"after_upload": "archive", "archive_path": str(archive)},
        # Any real disk is "too full" at 100 %: retention removes every confirmed file.
        retention={"min_free_percent": 100.0, "warn_free_percent": 100.0, "interval_seconds": 0.2},
    )
    write_file(tmp_path / "inbox" / "run" / "log.csv", 1000)
    async with running_service(config) as svc:
        await wait_until(
            lambda: svc.retention is not None and svc.retention.last_report is not None
        )
        queue = svc.queue
        assert queue is not None

        async def archived() -> bool:
            jobs = await queue.find_by_rel("run/log.csv")
            return bool(jobs) and jobs[0].after_upload == "archived"

        await wait_until(archived, timeout=20)
        await wait_until(lambda: not (archive / "run" / "log.csv").exists(), timeout=20)
        assert not (tmp_path / "inbox" / "run" / "log.csv").exists()
        report = svc.retention.last_report  # type: ignore[union-attr]
        summary = await svc.summary()
    assert (archive / "stranger" / "not-ours.csv").read_bytes() == b"keep me"
    assert report is not None and report.disk_low
    assert "DISK LOW" in summary
