"""Outage suite: the API goes away for a while, files keep arriving, then it comes back.

A real ``inboxd run`` reaches the sandbox (API and storage) through ``tests.support.faultproxy``.
The outage is either *refused* (the proxy stops listening: connection refused, keep-alive
connections reset) or *stalled* (every connection goes quiet: requests time out after
``api.timeout``); a third variant starts the daemon in the middle of a refused outage, before
it ever reached the API. Uploads are in flight when it starts and files arrive throughout.

Afterwards nothing may be lost or doubled, and uploads must resume within the backoff caps:
the first successful API call after the API is back comes within ``retry.job_backoff_cap_seconds``
(a job waiting out its backoff) or ``retry.cap_seconds`` (a step retry), plus ``api.timeout`` for a
stalled outage, plus a margin; the first completed upload within the same plus the time one
upload takes.

CI: ``.venv/bin/python -m pytest tests/suites/test_outage_suite.py -s``.
By hand: ``INBOXD_SUITE=long .venv/bin/python -m pytest tests/suites/test_outage_suite.py -s``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from daemon.sandbox import Sandbox
from tests.support.faultproxy import FaultProxy, running_proxy
from tests.support.rig import (
    SEED,
    Expected,
    UploadBytes,
    all_done,
    check_delivery,
    describe_unfinished,
    drop,
    job_states,
    log_events,
    scale,
    summary,
    wait_all_done,
)
from tests.support.runner import start_daemon, stop_daemon, write_config
from tests.support.waits import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(scale(120, 1800))]

API_TIMEOUT, ATTEMPTS, BASE, CAP, JOB_CAP = 2.0, 4, 0.1, 1.0, 3.0
OUTAGE_SECONDS = scale(6.0, 60.0)
#: scheduling, a request's latency, a start-up: what the bounds allow on top of the caps
MARGIN = 1.5
#: one small upload (create, storage or server upload, complete) after the first success
ONE_UPLOAD = 3.0


@pytest.fixture
def proxy(sandbox: Sandbox) -> Iterator[FaultProxy]:
    port = urlsplit(sandbox.url).port
    assert port is not None
    with running_proxy("127.0.0.1", port) as p:
        yield p


@pytest.mark.parametrize("kind", ["refused", "stalled", "refused_from_start", "refused_one_file"])
def test_outage_loses_nothing_and_resumes_within_the_backoff_cap(
    sandbox: Sandbox, proxy: FaultProxy, tmp_path: Path, kind: str
) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    counter = UploadBytes.install(sandbox)
    config = write_config(
        tmp_path,
        sandbox,
        api={"url": proxy.url("/api/v1"), "timeout": API_TIMEOUT},
        upload={"workers": 2, "part_concurrency": 2},
        retry={
            "attempts": ATTEMPTS,
            "base_seconds": BASE,
            "cap_seconds": CAP,
            "job_backoff_cap_seconds": JOB_CAP,
        },
        log={"level": "info"},
    )
    inbox = tmp_path / "inbox"
    log = tmp_path / "daemon.log"
    expected = Expected()
    from_start = kind == "refused_from_start"
    # One file waiting alone: nothing else keeps the workers busy, so how soon it is retried
    # after the API is back is its own job backoff, which must be capped.
    one_file = kind == "refused_one_file"

    def go_down() -> None:
        if kind == "stalled":
            proxy.freeze()
        else:
            proxy.refuse_connections()
            proxy.reset_all()

    def come_back() -> None:
        if kind == "stalled":
            proxy.thaw()
        else:
            proxy.accept_connections()

    if from_start:
        drop(inbox, expected, rng, 4, "before")
        go_down()
        t_down = time.time()
        proc = start_daemon(config, log)
    else:
        drop(inbox, expected, rng, 3, "before")
        proc = start_daemon(config, log)
    try:
        if not from_start:
            wait_for(all_done(config, len(expected)), 30, "the files before the outage")
        if not from_start and not one_file:
            # Uploads in flight when the API goes away.
            sandbox.faults.storage_delay_per_mib = 2.0
            drop(inbox, expected, rng, 3, "in_flight")
            wait_for(lambda: counter.in_flight > 0, 20, "an upload in flight", step=0.02)
        if not from_start:
            go_down()
            t_down = time.time()
        in_flight_at_down = counter.in_flight
        if one_file:
            drop(inbox, expected, rng, 1, "alone")
            time.sleep(max(0.0, t_down + OUTAGE_SECONDS - time.time()))
        # Files keep arriving during the outage.
        while time.time() < t_down + OUTAGE_SECONDS:
            time.sleep(min(rng.uniform(0.3, 1.2), max(0.0, t_down + OUTAGE_SECONDS - time.time())))
            drop(inbox, expected, rng, 1, "during")
        sandbox.faults.storage_delay_per_mib = 0.0
        reached = [r for r in list(sandbox.requests) if t_down + 0.5 <= r.time]
        t_back = time.time()
        come_back()
        drained = wait_all_done(config, len(expected), scale(60, 300), when=" after it", step=0.1)
    finally:
        come_back()
        assert stop_daemon(proc) == 0

    reqs = list(sandbox.requests)
    after = [r for r in reqs if r.time >= t_back]
    first_ok = next(
        (r for r in after if r.kind == "api" and r.status is not None and r.status < 300), None
    )
    first_done = next(
        (r for r in after if r.route == "POST /ingestion/{id}/upload/complete" and r.status == 200),
        None,
    )
    assert first_ok is not None and first_done is not None
    to_first_ok = first_ok.time - t_back
    to_first_upload = first_done.time - t_back
    extra = API_TIMEOUT if kind == "stalled" else 0.0
    bound_ok = max(JOB_CAP, CAP) + extra + MARGIN
    bound_upload = bound_ok + ONE_UPLOAD
    delivery = check_delivery(sandbox, expected)
    states = job_states(config)
    during = log_events(log, ("retry", "job.backoff"), t_down, t_back)
    summary(
        "outage",
        test=kind,
        outage_seconds=round(t_back - t_down, 1),
        files=len(expected),
        bytes=expected.bytes,
        lost=len(delivery.lost),
        duplicates=len(delivery.duplicates),
        corrupt=len(delivery.corrupt),
        open_ingestions=len(delivery.open_ingestions),
        jobs=dict(states),
        ingestions=delivery.ingestion_states,
        in_flight_at_down=in_flight_at_down,
        requests_reaching_api_during_outage=len(reached),
        daemon_retries_during_outage=during,
        back_to_first_ok_call=round(to_first_ok, 2),
        back_to_first_upload=round(to_first_upload, 2),
        bound_first_ok=bound_ok,
        bound_first_upload=bound_upload,
        back_to_all_done=round(drained, 2),
        proxy=proxy.stats(),
        seconds=round(time.monotonic() - started, 1),
    )
    assert delivery.ok, delivery.describe()
    assert states.get("failed", 0) == 0, describe_unfinished(config)
    assert not reached, f"the outage leaked: {[(r.method, r.path) for r in reached][:5]}"
    # API and storage alike went through the proxy (storage URLs follow the client's Host).
    assert {r.headers.get("host") for r in reqs} == {proxy.address}
    assert any(r.kind == "storage" for r in reqs)
    if kind in ("refused", "stalled"):
        assert in_flight_at_down > 0
    assert to_first_ok <= bound_ok, (to_first_ok, bound_ok)
    assert to_first_upload <= bound_upload, (to_first_upload, bound_upload)
    # The daemon kept trying while the API was away, but not in a hot loop: a step makes at
    # most ATTEMPTS tries, and a job then waits at least min(cap, 1 s * 2**n) / 2.
    assert during["retry"] + during["job.backoff"] > 0, during
