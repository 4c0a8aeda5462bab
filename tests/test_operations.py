"""Operating the daemon: metrics scraped over HTTP from a running service, health, config."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import load_settings
from daemon.errors import ConfigError
from daemon.sandbox import Sandbox
from tests.conftest import write_file
from tests.daemon_helpers import counts, running_service, wait_until, write_config


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
