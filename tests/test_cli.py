"""The command line as a user runs it: real processes, the sandbox over loopback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from daemon.compat import ExceptionGroup, tomllib
from daemon.config import Settings, load_settings
from daemon.errors import ConfigError
from daemon.sandbox import Sandbox
from tests.support.data import TOKEN, write_file
from tests.support.runner import REPO, inboxd, write_config


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return inboxd(*args, env=env, timeout=timeout)


# ---- configuration ------------------------------------------------------------------------


def test_bad_config_exits_78_with_one_line_per_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[api]\nurl = "ftp://nowhere"\ntoken = "x"\ntimeout = -3\ncolour = "blue"\n'
        '[upload]\nworkers = 0\n[inbox]\nafter_upload = "archive"\n'
    )
    result = run("check", "--config", str(cfg))
    assert result.returncode == 78
    lines = [ln.strip() for ln in result.stderr.splitlines()[1:]]
    assert any(ln.startswith("api.url = 'ftp://nowhere': must start with http") for ln in lines)
    assert any(ln.startswith("api.timeout = -3") for ln in lines)
    assert any(ln.startswith("api.colour: unknown key") for ln in lines)
    assert any(ln.startswith("upload.workers = 0") for ln in lines)
    assert len(lines) == 4  # the archive_path check runs once the values themselves are valid


def test_cross_checks_and_missing_token(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[inbox]\nafter_upload = "archive"\n')
    result = run("run", "--config", str(cfg), env={"CREDENTIALS_DIRECTORY": ""})
    assert result.returncode == 78
    assert "inbox.after_upload" in result.stderr and "archive_path" in result.stderr
    assert "api.token: no API token configured" in result.stderr


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    result = run("check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 78
    assert "no such file" in result.stderr
    (tmp_path / "broken.toml").write_text("[api\nurl=")
    result = run("check", "--config", str(tmp_path / "broken.toml"))
    assert result.returncode == 78
    assert "not valid TOML" in result.stderr


def test_token_value_never_printed_in_config_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[api]\ntoken = 12345678\n")
    result = run("check", "--config", str(cfg))
    assert result.returncode == 78
    assert "12345678" not in result.stderr
    assert "api.token = <hidden>" in result.stderr


def test_token_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tokfile").write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[api]\ntoken_file = "{tmp_path / "tokfile"}"\n')
    assert load_settings(cfg).api.resolved_token().get_secret_value() == "from-file"
    cfg.write_text("")
    assert load_settings(cfg).api.resolved_token().get_secret_value() == "from-credential"
    monkeypatch.setenv("INBOXD_API__TOKEN", "from-env")
    settings = load_settings(cfg)
    assert settings.api.resolved_token().get_secret_value() == "from-env"
    assert "from-env" not in repr(settings) and "from-env" not in str(settings.api)
    (tmp_path / "empty").write_text("  \n")
    monkeypatch.delenv("INBOXD_API__TOKEN")
    cfg.write_text(f'[api]\ntoken_file = "{tmp_path / "empty"}"\n')
    with pytest.raises(ConfigError, match="the file is empty"):
        load_settings(cfg, require_token=True)


def test_environment_overrides_file_and_nests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[upload]\nworkers = 3\nmetadata = { rig = "a" }\n')
    monkeypatch.setenv("INBOXD_UPLOAD__WORKERS", "7")
    s = load_settings(cfg)
    assert s.upload.workers == 7
    assert s.upload.metadata == {"rig": "a"}


def test_good_values_of_checked_union_keys_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks before the stream/metadata/limit unions let every good value through."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[upload]\nstream = " Vehicle Logs "\n'
        'metadata = { s = "x", i = 3, f = 1.5, b = false }\n'
        "[bandwidth]\nlimit = 2e6\n"
        '[[routes]]\nglob = "a/*"\nstream = 4.0\n'
        '[[routes]]\nglob = "b/*"\nmetadata = { n = 0 }\n'
    )
    s = load_settings(cfg)
    assert s.upload.stream == "Vehicle Logs"
    assert s.upload.metadata == {"s": "x", "i": 3, "f": 1.5, "b": False}
    assert type(s.upload.metadata["b"]) is bool and type(s.upload.metadata["i"]) is int
    assert s.bandwidth.limit == 2_000_000 and type(s.bandwidth.limit) is int
    assert [(r.stream, r.metadata) for r in s.routes] == [(4, {}), (None, {"n": 0})]
    # Digits are an id wherever they come from (the environment only gives text).
    monkeypatch.setenv("INBOXD_UPLOAD__STREAM", " 12 ")
    monkeypatch.setenv("INBOXD_BANDWIDTH__LIMIT", "20MB")
    s = load_settings(cfg)
    assert s.upload.stream == 12
    assert s.bandwidth.limit == "20MB"


def test_example_config_mirrors_the_settings_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of the model is documented in config.example.toml, with its default."""
    example = REPO / "config.example.toml"
    text = example.read_text()
    settings = load_settings(example)
    defaults = Settings()
    for section in Settings.model_fields:
        if section == "routes":
            assert "[[routes]]" in text
            continue
        sub = getattr(defaults, section)
        for key in type(sub).model_fields:
            assert f"{key} = " in text or f"# {key} = " in text, f"[{section}] {key} undocumented"
        assert getattr(settings, section) == sub, f"[{section}] example differs from defaults"
    # The uncommented part is valid TOML on its own.
    tomllib.loads(text)


# ---- check / push against the sandbox ----------------------------------------------------


def test_check_reports_each_step(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, sandbox, upload={"stream": "Vehicle Logs"})
    ok = run("check", "--config", str(cfg))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"✓ config {cfg} (--config): valid" in ok.stdout
    assert f"✓ inbox {tmp_path / 'inbox'}: exists, readable by user" in ok.stdout
    assert "✓ token: from [api] token" in ok.stdout
    assert "✓ token accepted (2 stream(s) visible)" in ok.stdout
    assert "✓ stream 2 ('Vehicle Logs'" in ok.stdout
    assert "- storage round trip: not tried" in ok.stdout
    assert "✗" not in ok.stdout
    bad = run("check", "--config", str(cfg), env={"INBOXD_API__TOKEN": "nope-nope"})
    assert bad.returncode == 1
    assert "✓ token: from INBOXD_API__TOKEN" in bad.stdout
    assert "✗ token accepted by GET /streams" in bad.stdout and "nope-nope" not in bad.stdout
    cfg2 = write_config(tmp_path, sandbox, upload={"stream": "missing"})
    miss = run("check", "--config", str(cfg2))
    assert miss.returncode == 1
    assert "no stream 'missing'" in miss.stdout and "'inbox'" in miss.stdout


def test_check_when_the_server_is_down(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[api]\nurl = "http://127.0.0.1:9/api/v1"\ntoken = "t"\ntimeout = 2\n')
    result = run("check", "--config", str(cfg))
    assert result.returncode == 1
    assert "cannot connect" in result.stdout


def test_push_uploads_waits_and_reports_json(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, sandbox)
    a = write_file(tmp_path / "a.csv", 3000, 1)
    b = write_file(tmp_path / "b.mf4", 700 * 1024, 2)
    (tmp_path / "empty.csv").write_bytes(b"")
    result = run(
        "push",
        "--config",
        str(cfg),
        "--json",
        "--metadata",
        "run=7",
        str(tmp_path / "a.csv"),
        str(tmp_path / "b.mf4"),
        str(tmp_path / "empty.csv"),
    )
    assert result.returncode == 1, result.stderr  # one file failed
    doc = json.loads(result.stdout)
    rows = {Path(r["file"]).name: r for r in doc["files"]}
    assert rows["a.csv"]["import_status"] == "FINISHED"
    assert rows["b.mf4"]["mode"] == "multipart"
    assert "empty" in rows["empty.csv"]["error"]
    assert sandbox.dataset_bytes(rows["a.csv"]["dataset_id"]) == a
    assert sandbox.dataset_bytes(rows["b.mf4"]["dataset_id"]) == b
    assert sandbox.datasets[rows["a.csv"]["dataset_id"]].metadata["run"] == "7"
    assert TOKEN not in result.stdout + result.stderr


def test_push_follows_on_name_clash_unless_overwrite(sandbox: Sandbox, tmp_path: Path) -> None:
    """push honours [upload] on_name_clash (no silent "fail"); --overwrite replaces."""
    cfg = write_config(tmp_path, sandbox, upload={"on_name_clash": "fail"})
    write_file(tmp_path / "x.csv", 100)
    assert run("push", "--config", str(cfg), "--no-wait", str(tmp_path / "x.csv")).returncode == 0
    again = run("push", "--config", str(cfg), "--no-wait", str(tmp_path / "x.csv"))
    assert again.returncode == 1
    assert "already exists" in again.stdout
    forced = run("push", "--config", str(cfg), "--overwrite", str(tmp_path / "x.csv"))
    assert forced.returncode == 0, forced.stdout
    assert len(sandbox.datasets) == 1
    renaming = write_config(tmp_path, sandbox)  # the default: rename
    third = run("push", "--config", str(renaming), "--no-wait", str(tmp_path / "x.csv"))
    assert third.returncode == 0, third.stdout + third.stderr
    assert "(x (2).csv)" in third.stdout
    assert sorted(d.path for d in sandbox.datasets.values()) == ["x (2).csv", "x.csv"]


def test_demo_runs_end_to_end() -> None:
    result = run("demo", timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "every file imported exactly once" in result.stdout


def test_status_without_a_database_says_so(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[state]\npath = "{tmp_path / "none.db"}"\n')
    result = inboxd("status", "--config", str(cfg))
    assert result.returncode == 66
    assert "no state database" in result.stderr


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("inboxd ")
    helped = run("--help").stdout
    for cmd in ("push", "check", "run", "status", "retry", "sandbox", "demo"):
        assert cmd in helped


def test_progress_bar_shows_bytes_rate_and_eta() -> None:
    import io

    from daemon.commands.push import ProgressBar as _ProgressBar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    bar = _ProgressBar("run.mf4", 4 * 1024 * 1024, out)
    bar.start -= 1.0  # one second has passed
    bar.add(1024 * 1024)
    bar.add(3 * 1024 * 1024)
    bar.close()
    text = out.getvalue()
    assert "run.mf4" in text
    assert "4.0 MiB/4.0 MiB" in text and "100.0%" in text
    assert "MiB/s" in text and "ETA 0:00" in text
    quiet = io.StringIO()  # not a terminal: no bar at all (logs and --json stay clean)
    _ProgressBar("x", 10, quiet).add(10)
    assert quiet.getvalue() == ""


# ---- a state database inboxd cannot use: one line and an exit status systemd can act on ------


def test_retry_on_a_corrupt_database_exits_65_in_one_line(tmp_path: Path) -> None:
    import random

    import anyio

    from daemon.state import FileIdentity, NewJob, Queue

    db = tmp_path / "state.db"

    async def build() -> None:
        async with await Queue.open(db) as q:
            jobs = [
                NewJob(FileIdentity(f"f{i:05d}.csv", i + 1, i, i + 1), 1, f"{i}", {})
                for i in range(3000)
            ]
            await q.enqueue_many(jobs)

    anyio.run(build)
    data = bytearray(db.read_bytes())
    start, end = int(len(data) * 0.3), int(len(data) * 0.7)
    data[start:end] = random.Random(7).randbytes(end - start)
    db.write_bytes(bytes(data))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[state]\npath = "{db}"\n')
    result = run("retry", "--config", str(cfg), "--all-failed")
    assert result.returncode == 65, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"inboxd: state database {db} is corrupt"), line
    assert "restore it from a backup" in line and "-wal" in line
    assert db.read_bytes() == data


def test_the_reason_inside_the_daemons_exception_groups() -> None:
    """`inboxd run` fails out of nested task groups; the person gets the one error that says
    most, with its exit status; anything that is not ours stays a traceback."""
    from daemon.commands.cli import _reason
    from daemon.errors import StateError, TransportError
    from daemon.state import QueueError

    generic = QueueError("state database /s/state.db: cannot commit")
    full = QueueError("state database /s/state.db: no space left on its filesystem", reason="full")
    nested = ExceptionGroup("service", [ExceptionGroup("watcher", [generic]), full])
    found = _reason(nested)
    assert isinstance(found, StateError)
    assert (found.exit_status, str(found)) == (74, str(full))
    only_generic = _reason(ExceptionGroup("service", [generic, TransportError("reset")]))
    assert isinstance(only_generic, StateError) and only_generic.exit_status == 1
    assert _reason(ExceptionGroup("service", [full, RuntimeError("a bug")])) is None
    assert _reason(ExceptionGroup("service", [ExceptionGroup("empty?", [KeyError(1)])])) is None


def test_run_beside_another_daemon_names_it_and_exits_1(sandbox: Sandbox, tmp_path: Path) -> None:
    """Exit 1, not 65: the other daemon may stop, so systemd restarting this one is right."""
    import fcntl
    import os

    cfg = write_config(tmp_path, sandbox)
    lock = tmp_path / "state" / "state.db.lock"
    lock.parent.mkdir()
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"4242")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run("run", "--config", str(cfg), timeout=30)
    finally:
        os.close(fd)
    assert result.returncode == 1, result.stderr[-2000:]
    human = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert human == [
        f"inboxd: another inboxd (pid 4242) is running with the state database"
        f" {tmp_path / 'state' / 'state.db'} — stop it first, or give this one its own"
        " [state] path"
    ]
    assert not (tmp_path / "state" / "state.db").exists()  # it stopped before opening it
