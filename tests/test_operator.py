"""The operator's day (issue 11): the journal, `status`/`retry` for people without root,
`check` as the service runs, `push` through every target, one-line errors, help, the fleet.

Real processes against the sandbox over loopback; real users (made with useradd) where a
test is about permissions.
"""

from __future__ import annotations

import grp
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from daemon import logs
from daemon.sandbox import Sandbox
from tests.support.data import TOKEN, write_file
from tests.support.runner import REPO, counts, inboxd, running_service, start_daemon, write_config
from tests.support.waits import wait_for, wait_until

# ---- helpers --------------------------------------------------------------------------------


def _one_line_error(result: subprocess.CompletedProcess[str], status: int) -> str:
    """The command failed with ``status`` and said why in one line, without a traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("{")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("inboxd: ")
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counts_now(config: Path) -> dict[str, int]:
    from daemon.state import QueueError

    try:
        return anyio.run(counts, config)
    except QueueError:  # the daemon is still creating (migrating) the database
        return {}


# ---- 1. the journal tells the story ----------------------------------------------------------


def test_daemon_stderr_has_a_warning_line_per_failure_with_job_id_reason_and_action(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Each kind of failure is one warning line (priority <4> under the journal) with the job
    id, the path, the reason and what to do; a refused token is an error line (<3>); what
    went well stays at info (<6>), so `journalctl -p warning` lists exactly the problems."""
    sandbox.faults.fail_import_glob = "*broken*"
    config = write_config(
        tmp_path,
        sandbox,
        upload={"on_name_clash": "fail"},
        log={"format": "json", "level": "info"},
    )
    text = config.read_text() + '\n[[routes]]\nglob = "nowhere/*"\nstream = "no such stream"\n'
    config.write_text(text)
    write_file(tmp_path / "clash.csv", 100)
    taken = inboxd("push", "--config", str(config), "--no-wait", str(tmp_path / "clash.csv"))
    assert taken.returncode == 0, taken.stdout + taken.stderr
    inbox = tmp_path / "inbox"
    (inbox / "empty.csv").write_bytes(b"")
    write_file(inbox / "broken.csv", 500)
    write_file(inbox / "clash.csv", 200)
    write_file(inbox / "nowhere" / "x.csv", 300)
    write_file(inbox / "fine.csv", 400)
    log = tmp_path / "daemon.log"
    log.touch()
    st = log.stat()
    env_before = os.environ.get("JOURNAL_STREAM")
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"  # stderr *is* "the journal"
    try:
        proc = start_daemon(config, log)
    finally:
        if env_before is None:
            del os.environ["JOURNAL_STREAM"]
        else:
            os.environ["JOURNAL_STREAM"] = env_before
    try:
        wait_for(lambda: _counts_now(config).get("failed", 0) >= 4, 60, "4 failed jobs", step=0.1)
        wait_for(lambda: _counts_now(config).get("done", 0) >= 1, 60, "a done job", step=0.1)
        sandbox.config.token = "revoked-" + uuid.uuid4().hex  # the token is refused from now
        write_file(inbox / "later.csv", 100)
        wait_for(
            lambda: '"upload.paused"' in log.read_text(), 60, "upload.paused in the log", step=0.1
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lines = log.read_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>", ln) for ln in lines), lines[:3]
    problems = [json.loads(ln[3:]) for ln in lines if ln[:3] in ("<3>", "<4>")]
    # A failed import is the poller's line (import.failed); every other failure the worker's.
    failed = {e["path"]: e for e in problems if e["event"] in ("job.failed", "import.failed")}
    assert set(failed) == {"empty.csv", "broken.csv", "clash.csv", "nowhere/x.csv"}, problems
    kinds = {path: e["kind"] for path, e in failed.items()}
    assert kinds == {
        "empty.csv": "empty_file",
        "broken.csv": "import",
        "clash.csv": "name_clash",
        "nowhere/x.csv": "not_found",
    }
    for event in failed.values():
        assert isinstance(event["job_id"], int)
        assert event["reason"] and event["action"]
        assert event["level"] == "warning"
    assert "empty" in failed["empty.csv"]["reason"]
    assert "import failed" in failed["broken.csv"]["reason"]
    assert "inboxd retry" in failed["broken.csv"]["action"]
    paused = [e for e in problems if e["event"] == "upload.paused"]
    assert paused and paused[0]["level"] == "error" and "token" in paused[0]["action"]
    assert TOKEN not in log.read_text()
    # Nothing that went well is among the problems; it is all there at info.
    assert {e["event"] for e in problems} <= {
        "job.failed",
        "import.failed",
        "upload.paused",
        "daemon.still_paused",
        "service.unreachable",
    }, {e["event"] for e in problems}
    infos = [json.loads(ln[3:]) for ln in lines if ln.startswith("<6>")]
    assert any(e["event"] == "upload.done" and e["path"] == "fine.csv" for e in infos)


def test_console_lines_are_for_people() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    import structlog

    old = structlog.get_config()
    out = Tty()
    try:
        logs.configure("info", "auto", stream=out)
        log = structlog.get_logger("t")
        log.info("upload.done", job_id=7, path="a.csv", refs={"stream_id": 1, "ingestion_id": 4})
        log.warning(
            "job.failed", job_id=8, path="b.csv", reason="the file is empty", action="write data"
        )
    finally:
        structlog.configure(**old)
    first, second = out.getvalue().splitlines()
    assert "uploaded" in first and "job 7" in first and "path=a.csv" in first
    assert "refs=stream_id=1, ingestion_id=4" in first
    assert "{" not in first and "'" not in first  # no Python reprs
    assert "WARNING" in second and "job failed" in second
    assert second.endswith("— reason: the file is empty — do: write data")


def test_journal_stream_is_recognised_only_for_the_stream_it_names(tmp_path: Path) -> None:
    target = tmp_path / "j"
    with target.open("w") as fh, (tmp_path / "other").open("w") as other:
        st = os.fstat(fh.fileno())
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            assert logs.journal_stream(fh)
            assert not logs.journal_stream(other)  # stderr redirected elsewhere since
        finally:
            del os.environ["JOURNAL_STREAM"]
        assert not logs.journal_stream(fh)


# ---- 2, 3. status and retry ------------------------------------------------------------------


async def test_status_ids_superseded_failures_filters_and_retry_refusals(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path, sandbox)
    inbox = tmp_path / "inbox"
    async with running_service(config) as svc:
        assert svc.queue is not None
        queue = svc.queue
        (inbox / "run.csv").write_bytes(b"")
        write_file(inbox / "keep" / "ok.csv", 300)
        await wait_until(lambda: _has(queue, failed=1, done=1), timeout=30)
        failed_first = await anyio.to_thread.run_sync(
            lambda: inboxd("status", "--config", str(config))
        )
        assert failed_first.returncode == 0, failed_first.stderr
        (old,) = [j for j in await queue.list_jobs() if j.identity.rel == "run.csv"]
        assert f"✗ #{old.id:<4} run.csv  the file is empty" in failed_first.stdout
        assert "inboxd retry" in failed_first.stdout
        # The person fixes the file; its new version is delivered.
        write_file(inbox / "run.csv", 400, seed=3)
        await wait_until(lambda: _has(queue, done=2), timeout=30)
        out = await anyio.to_thread.run_sync(lambda: inboxd("status", "--config", str(config)))
        assert "✗" not in out.stdout, out.stdout
        assert f"⤳ #{old.id:<4} run.csv  superseded by #" in out.stdout
        assert "failed 0" in out.stdout
        doc = json.loads(
            (
                await anyio.to_thread.run_sync(
                    lambda: inboxd("status", "--config", str(config), "--json")
                )
            ).stdout
        )
        assert doc["counts"]["failed"] == 0 and doc["failed_superseded"] == 1
        assert [j["superseded_by"] for j in doc["superseded_failures"]] != [None]
        assert all(j["state"] != "failed" for j in doc["jobs"])
        assert {"id", "path", "state", "error", "error_kind"} <= set(doc["jobs"][0])
        # Filters: a path glob (one line per file), --failed.
        by_glob = await anyio.to_thread.run_sync(
            lambda: inboxd("status", "--config", str(config), "KEEP/*", "--since", "1h")
        )
        assert by_glob.returncode == 0, by_glob.stderr
        table = by_glob.stdout.splitlines()
        assert any(re.match(r"\s+\d+\s+done\s+keep/ok.csv\s+dataset \d+", ln) for ln in table)
        assert not any("run.csv" in ln for ln in table)
        only_failed = await anyio.to_thread.run_sync(
            lambda: inboxd("status", "--config", str(config), "--failed")
        )
        assert "superseded" in only_failed.stdout
        assert not re.search(r"^\s+\d+\s+failed\s", only_failed.stdout, re.M)
        # retry explains every refusal, each with its own exit status.
        all_failed = await anyio.to_thread.run_sync(
            lambda: inboxd("retry", "--config", str(config), "--all-failed")
        )
        assert all_failed.returncode == 3, all_failed.stderr
        assert "nothing to retry" in all_failed.stderr and "fixed" in all_failed.stderr
        superseded = await anyio.to_thread.run_sync(
            lambda: inboxd("retry", "--config", str(config), str(old.id))
        )
        assert superseded.returncode == 4 and "superseded" in superseded.stderr
        done_job = next(j for j in await queue.list_jobs() if j.identity.rel == "keep/ok.csv")
        not_failed = await anyio.to_thread.run_sync(
            lambda: inboxd("retry", "--config", str(config), str(done_job.id))
        )
        assert not_failed.returncode == 3 and "is done" in not_failed.stderr
        missing = await anyio.to_thread.run_sync(
            lambda: inboxd("retry", "--config", str(config), "999")
        )
        assert _one_line_error(missing, 66).startswith("inboxd: no job 999")
        assert (await queue.get(old.id)).state.value == "failed"  # type: ignore[union-attr]


async def _has(queue: object, **want: int) -> bool:
    got = await queue.counts()  # type: ignore[attr-defined]
    return all(got.get(k, 0) >= v for k, v in want.items())


@pytest.fixture
def people() -> Iterator[dict[str, str]]:
    """A group, the daemon's own user in it, a member and an outsider (root needed)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create users with useradd (run as root, as CI does)")
    if not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("needs useradd and setpriv (util-linux)")
    tag = uuid.uuid4().hex[:6]
    names = {
        "group": f"ibxg{tag}",
        "daemon": f"ibxd{tag}",
        "member": f"ibxm{tag}",
        "outsider": f"ibxo{tag}",
    }
    made: list[str] = []
    try:
        subprocess.run(["groupadd", names["group"]], check=True)
        for role, extra in (
            ("daemon", ["-g", names["group"]]),
            ("member", ["-G", names["group"]]),
            ("outsider", []),
        ):
            subprocess.run(
                ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *extra, names[role]],
                check=True,
            )
            made.append(names[role])
        yield names
    finally:
        for user in made:
            subprocess.run(["userdel", user], check=False)
        subprocess.run(["groupdel", names["group"]], check=False)


def _python_for_others() -> list[str]:
    """An interpreter other users may run, with this checkout and its venv on the path."""
    import sysconfig

    candidates = [sys.executable, "/usr/bin/python3"]
    for exe in candidates:
        probe = subprocess.run(
            [
                "setpriv",
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                exe,
                "-c",
                "import sys; print(sys.version_info[:2])",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            return [exe]
    pytest.skip(
        "no Python interpreter of this version that other users may run (this one lives "
        f"under {sys.prefix!r}; {sysconfig.get_path('purelib')})"
    )


def _as(
    user: str, group: str | None, args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    ids = ["--reuid", user, "--init-groups"]
    if group is not None:
        ids = ["--reuid", user, "--regid", group, "--init-groups"]
    return subprocess.run(
        ["setpriv", *ids, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_status_works_for_group_members_without_root_and_says_why_for_others(
    sandbox: Sandbox, people: dict[str, str]
) -> None:
    """The unit's layout: the daemon runs as its own user, the state folder is 0750 and
    belongs to its group. A member of that group reads `status` (while the daemon runs and
    after it stopped) without sudo; `retry` and an outsider get one line saying what to do."""
    python = _python_for_others()
    site = next(p for p in sys.path if p.endswith("site-packages") and "/.venv/" in p)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{REPO}:{site}",
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    base = Path(tempfile.mkdtemp(prefix="inboxd-people-", dir="/tmp"))
    base.chmod(0o755)
    daemon = None
    try:
        g, d = people["group"], people["daemon"]
        inbox, state = base / "inbox", base / "state"
        inbox.mkdir()
        state.mkdir()
        shutil.chown(inbox, d, g)
        shutil.chown(state, d, g)
        state.chmod(0o750)  # StateDirectoryMode=0750
        config = write_config(
            base,
            sandbox,
            inbox={"path": str(inbox)},
            state={"path": str(state / "state.db")},
            log={"format": "json", "level": "info"},
        )
        config.chmod(0o644)
        shutil.chown(inbox, d, g)
        write_file(inbox / "a.csv", 2000)
        (inbox / "empty.csv").write_bytes(b"")
        for f in inbox.iterdir():
            shutil.chown(f, d, g)
        log = base / "daemon.log"
        with log.open("wb") as fh:  # the child keeps its own copy of the descriptor
            daemon = subprocess.Popen(
                [
                    "setpriv", "--reuid", d, "--regid", g, "--init-groups",
                    *python, "-m", "daemon", "run", "--config", str(config),
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=base,
                env=env,
            )  # fmt: skip
        wait_for(lambda: _counts_now(config).get("done", 0) == 1, 60, "one done job", step=0.1)
        wait_for(lambda: _counts_now(config).get("failed", 0) == 1, 60, "one failed job", step=0.1)
        db = state / "state.db"
        assert oct(db.stat().st_mode & 0o777) == "0o640"
        assert db.stat().st_gid == grp.getgrnam(g).gr_gid
        status_cmd = [*python, "-m", "daemon", "status", "--config", str(config)]
        seen = _as(people["member"], None, status_cmd, env)
        assert seen.returncode == 0, seen.stderr
        assert "daemon: running" in seen.stdout
        assert re.search(r"✗ #\d+\s+empty.csv  the file is empty", seen.stdout), seen.stdout
        as_json = _as(people["member"], None, [*status_cmd, "--json"], env)
        assert json.loads(as_json.stdout)["counts"]["done"] == 1
        retried = _as(
            people["member"],
            None,
            [*python, "-m", "daemon", "retry", "--config", str(config), "--all-failed"],
            env,
        )
        line = _one_line_error(retried, 77)
        assert "sudo" in line
        outsider = _as(people["outsider"], None, status_cmd, env)
        line = _one_line_error(outsider, 77)
        assert f"usermod -aG {g} {people['outsider']}" in line
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        daemon = None
        stopped = _as(people["member"], None, status_cmd, env)  # no -shm to share any more
        assert stopped.returncode == 0, stopped.stderr
        assert "daemon: NOT RUNNING" in stopped.stdout and "done 1" in stopped.stdout
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.wait(10)
        shutil.rmtree(base, ignore_errors=True)


# ---- 4. check --------------------------------------------------------------------------------


def test_check_reports_what_run_would_refuse(sandbox: Sandbox, tmp_path: Path) -> None:
    port = _free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        config = write_config(
            tmp_path,
            sandbox,
            inbox={
                "path": str(tmp_path / "no-inbox"),
                "after_upload": "archive",
                "archive_path": str(tmp_path / "nowhere" / "archive"),
            },
            metrics={"listen": f"127.0.0.1:{port}"},
        )
        unit = tmp_path / "inboxd.service"
        unit.write_text(
            "[Service]\nUser=root\nProtectHome=yes\nStateDirectory=inboxd\n"
            "ReadWritePaths=-/srv/inbox\nLoadCredential=token:/etc/inboxd/token\n"
        )
        result = inboxd("check", "--config", str(config), "--unit", str(unit))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert f"! inbox {tmp_path / 'no-inbox'}: no such folder (yet)" in out  # run waits for it
    assert f"✗ archive {tmp_path / 'nowhere' / 'archive'}: neither it nor its parent" in out
    assert "is read-only for the service: not under the unit's ReadWritePaths=" in out
    assert f"✗ metrics address 127.0.0.1:{port}: in use by another program" in out
    assert "✓ token: from [api] token" in out  # the config's own token wins, as in `run`
    assert "✓ token accepted" in out  # the service checks still run
    assert "Traceback" not in out + result.stderr


def test_install_sequence_from_the_readme(sandbox: Sandbox, tmp_path: Path) -> None:
    """The README's install blocks (from a checkout, then install-files and the set-up), in
    order, with /opt and /etc moved under a temporary folder and without what needs systemd
    (sysusers, systemctl)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Install on a logging PC", 1)[1].split("\n### ", 1)[0]
    block = "".join(part.split("```", 1)[0] for part in section.split("```sh\n")[1:])
    root = tmp_path / "root"
    (root / "srv").mkdir(parents=True)
    steps = []
    for line in block.splitlines():
        cmd = line.split("  #", 1)[0].strip()
        if not cmd or cmd.startswith("#"):
            continue
        if any(word in cmd for word in ("systemctl", "systemd-sysusers", "journalctl")):
            continue  # systemd itself
        if "usermod" in cmd:
            continue  # the inboxd group comes from systemd-sysusers (skipped above)
        cmd = cmd.replace("sudo ", "").replace("sudoedit /etc/inboxd/config.toml", ":")
        cmd = re.sub(r"-o inboxd -g inboxd ", "", cmd)
        cmd = re.sub(
            r"(?<![\w.])/(opt|etc|srv|usr/share|usr/local)/", lambda m: f"{root}/{m[1]}/", cmd
        )
        if cmd.endswith("inboxd install-files"):
            cmd += f" --prefix {root}"
        steps.append(cmd)
    assert any("pip install" in s for s in steps) and any("inboxd check" in s for s in steps)
    assert any("install-files" in s for s in steps)
    (root / "usr" / "local" / "bin").mkdir(parents=True)  # as on every Debian system
    env = {**os.environ, "INBOXD_API__URL": sandbox.url}
    env.pop("INBOXD_CONFIG", None)
    for cmd in steps:
        if "inboxd check" in cmd:
            # As the README's sudoedit would: the sandbox's URL and the folders made above.
            cfg = root / "etc" / "inboxd" / "config.toml"
            # (state.path stays /var/lib/inboxd/state.db: the unit's StateDirectory= makes it)
            cfg.write_text(
                cfg.read_text().replace('path = "/srv/inbox"', f'path = "{root}/srv/inbox"')
            )
            (root / "etc" / "inboxd" / "token").write_text(TOKEN + "\n")
            # The unit install-files installed, its paths moved like the commands' (and its
            # user root: the inboxd user would come from systemd-sysusers).
            installed = root / "etc" / "systemd" / "system" / "inboxd.service"
            assert f"\nExecStart={root}/opt/inboxd/bin/inboxd run " in installed.read_text()
            unit = root / "etc" / "inboxd.service"
            unit.write_text(
                installed.read_text()
                .replace("/etc/inboxd/", f"{root}/etc/inboxd/")
                .replace("/srv/", f"{root}/srv/")
                .replace("User=inboxd", "User=root")
            )
            cmd = cmd.replace("inboxd check", f"inboxd check --config {cfg} --unit {unit}")
        done = subprocess.run(
            ["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, (cmd, done.stdout[-3000:], done.stderr[-3000:])
        if "inboxd check" in cmd:
            assert f"✓ token: read from {root}/etc/inboxd/token (the unit's" in done.stdout
            assert "✓ token accepted" in done.stdout and "✗" not in done.stdout
    assert (root / "usr" / "share" / "bash-completion" / "completions" / "inboxd").exists()
    assert (root / "usr" / "lib" / "sysusers.d" / "inboxd.conf").exists()
    # The venv the README makes holds the core install only: no sandbox, no OAuth.
    probe = subprocess.run(
        [f"{root}/opt/inboxd/bin/python", "-c", "import starlette"], capture_output=True
    )
    assert probe.returncode != 0


# ---- 5. push through every target -----------------------------------------------------------


def test_push_goes_through_the_configured_kind(sandbox: Sandbox, tmp_path: Path) -> None:
    from daemon.sandbox.dataservice import url_of

    (tmp_path / "a.csv").write_text("time,speed\n" + "".join(f"{i},{i * 2}\n" for i in range(200)))
    (tmp_path / "l").mkdir()
    legacy = write_config(tmp_path / "l", sandbox, api={"kind": "marple"})
    done = inboxd("push", "--config", str(legacy), str(tmp_path / "a.csv"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FINISHED" in done.stdout
    assert sandbox.datasets == {}  # no Marple DB dataset: a source of the older API
    assert [s for s in sandbox.legacy.files] == ["/inboxd/a.csv"]
    ds = sandbox.data_service.config
    ds.user_api_call_rate = 60_000
    (tmp_path / "d").mkdir()
    service = write_config(
        tmp_path / "d",
        sandbox,
        api={"kind": "data-service", "url": url_of(sandbox.origin)},
        data_service={
            "consumer_key": ds.consumer_key,
            "consumer_secret": ds.consumer_secret,
            "token": ds.token,
            "token_secret": ds.token_secret,
        },
    )
    sent = inboxd("push", "--config", str(service), "--json", str(tmp_path / "a.csv"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (row,) = json.loads(sent.stdout)["files"]
    assert row["import_status"] == "DELIVERED" and row["error"] is None
    assert len(sandbox.data_service.data_sources) == 1


def test_push_messages_fit_a_one_shot_command(sandbox: Sandbox, tmp_path: Path) -> None:
    config = write_config(tmp_path, sandbox)
    missing = inboxd("push", "--config", str(config), str(tmp_path / "never.csv"))
    line = _one_line_error(missing, 66)
    assert "no such file" in line and "retaken" not in line
    write_file(tmp_path / "a.csv", 100)
    wrong = inboxd("push", "--config", str(config), "--stream", "nope", str(tmp_path / "a.csv"))
    assert wrong.returncode == 1
    assert "--stream" in wrong.stderr and "[upload] stream" not in wrong.stderr


# ---- 6. no tracebacks ------------------------------------------------------------------------


def test_busy_ports_and_bad_values_are_one_line_each(sandbox: Sandbox, tmp_path: Path) -> None:
    port = _free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        config = write_config(tmp_path, sandbox, metrics={"listen": f"127.0.0.1:{port}"})
        ran = inboxd("run", "--config", str(config), timeout=60)
        sandboxed = inboxd("sandbox", "--port", str(port), timeout=60)
    assert ran.returncode == 78, ran.stderr[-3000:]  # a config-class stop: no restart loop
    assert "Traceback" not in ran.stderr
    human = [ln for ln in ran.stderr.splitlines() if not ln.startswith("{")]
    assert human[0] == "inboxd: configuration problem:"
    assert f"cannot listen for metrics on 127.0.0.1:{port} (in use by another program)" in human[1]
    line = _one_line_error(sandboxed, 64)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
    assert "0 and 1" in _one_line_error(inboxd("sandbox", "--api-503-rate", "2"), 64).replace(
        "from 0 to 1", "0 and 1"
    )
    assert "--since" in _one_line_error(
        inboxd("status", "--config", str(config), "--since", "soonish"), 64
    )
    assert "give a number of seconds above 0" in _one_line_error(inboxd("run", "--grace=-1"), 64)
    _one_line_error(inboxd("retry", "--config", str(config), "abc"), 64)


# ---- 7. default config and the environment ---------------------------------------------------


def test_config_from_inboxd_config_and_unknown_variables_named(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path, sandbox)
    via_env = inboxd("status", env={"INBOXD_CONFIG": str(config)})
    assert "no state database at " + str(tmp_path / "state" / "state.db") in via_env.stderr
    missing = inboxd("status", env={"INBOXD_CONFIG": str(tmp_path / "nope.toml")})
    assert "INBOXD_CONFIG" in _one_line_error_config(missing)
    typo = inboxd("status", env={"INBOXD_CONFIG": str(config), "INBOXD_UPLAOD__WORKERS": "3"})
    assert typo.returncode == 78
    assert (
        "environment variable INBOXD_UPLAOD__WORKERS: there is no section [uplaod]" in typo.stderr
    )
    key = inboxd("status", env={"INBOXD_CONFIG": str(config), "INBOXD_UPLOAD__WORKERZ": "3"})
    assert key.returncode == 78
    assert "INBOXD_UPLOAD__WORKERZ: [upload] has no key 'workerz'" in key.stderr
    assert "upload.workerz: unknown key" not in key.stderr  # not blamed on the TOML file


def _one_line_error_config(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 78, result.stderr
    return result.stderr


# ---- 8. help that teaches --------------------------------------------------------------------


def test_every_command_has_a_description_and_an_example() -> None:
    from daemon.commands.cli import _EXAMPLES

    for command in _EXAMPLES:
        helped = inboxd(command, "--help")
        assert helped.returncode == 0, command
        assert re.search(r"examples?:\n  inboxd ", helped.stdout) or "sudo inboxd" in helped.stdout
        description = helped.stdout.split("\n\n")[1]
        assert len(description) > 40, (command, description)
    bash = inboxd("completion", "bash").stdout
    assert subprocess.run(["bash", "-n"], input=bash, text=True, check=False).returncode == 0
    probe = (
        bash
        + '\nCOMP_WORDS=(inboxd sta); COMP_CWORD=1; _inboxd; echo "${COMPREPLY[@]}"'
        + '\nCOMP_WORDS=(inboxd status --fa); COMP_CWORD=2; _inboxd; echo "${COMPREPLY[@]}"'
    )
    said = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert said.stdout.splitlines() == ["status", "--failed"]


# ---- a fleet ---------------------------------------------------------------------------------


async def test_dashboard_and_alerts_name_only_metrics_the_daemon_exports(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config = write_config(tmp_path, sandbox, metrics={"listen": "127.0.0.1:0"})
    write_file(tmp_path / "inbox" / "a.csv", 1000)
    async with running_service(config) as svc:
        assert svc.queue is not None and svc.metrics_server is not None
        queue = svc.queue
        await wait_until(lambda: _has(queue, done=1), timeout=30)
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{svc.metrics_server.url}/metrics")).text
    # Sample names, and the names of families that have no sample yet (a counter per reason).
    exported = {m.group(1) for m in re.finditer(r"^(?:# TYPE )?(inboxd_\w+)", text, re.M)}
    assert "inboxd_upload_duration_seconds_bucket" in exported
    dashboard = json.loads((REPO / "contrib" / "grafana" / "inboxd-fleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    rules = (REPO / "contrib" / "prometheus" / "inboxd-alerts.yml").read_text()
    used = {m for e in exprs for m in re.findall(r"\binboxd_\w+", e)}
    used_by_rules = set(re.findall(r"\binboxd_\w+", rules))
    assert used - exported == set(), used - exported
    assert used_by_rules - exported == set(), used_by_rules - exported
    wanted = {
        "inboxd_paused",
        "inboxd_disk_low",
        "inboxd_failures_total",
        "inboxd_oldest_queued_age_seconds",
        "inboxd_retries_total",
    }
    assert wanted <= used_by_rules
    if shutil.which("promtool"):
        rules_file = str(REPO / "contrib/prometheus/inboxd-alerts.yml")
        checked = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                ["promtool", "check", "rules", rules_file],
                capture_output=True,
                text=True,
                check=False,
            )
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
