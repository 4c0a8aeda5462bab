"""The spreadsheet data service: its sandbox (OAuth 1.0, version header, limits) and the target
run by a real daemon (CSV and Excel, a changed file, limits, faults, a SIGKILL, status)."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from authlib.oauth1 import ClientAuth  # type: ignore[import-untyped]
from authlib.oauth1.rfc5849 import client_auth  # type: ignore[import-untyped]

from daemon.config import load_settings
from daemon.delivery import Work
from daemon.delivery.data_service.client import RateLimits
from daemon.delivery.data_service.target import _check_still_newest, marker, source_name
from daemon.delivery.files import FileRef
from daemon.delivery.flow import MemoryJournal, Resume
from daemon.errors import ConfigError, FileChangedError, NotYetError
from daemon.sandbox import Sandbox
from daemon.sandbox.dataservice import (
    DataServiceConfig,
    column_name,
    hmac_sha1_signature,
    signature_base_string,
    url_of,
)
from daemon.state import FileIdentity, JobState, NewJob, Queue
from tests.support.runner import counts, inboxd, running_service, start_daemon, write_config
from tests.support.waits import wait_until

ACCEPT = {"Accept": "application/json;v=1"}
MiB = 1024 * 1024


# ---- helpers --------------------------------------------------------------------------------


@pytest.fixture
def ds(sandbox: Sandbox) -> Sandbox:
    """The sandbox with a call rate too high, and refresh intervals too short, to slow the tests
    that are not about them."""
    cfg = sandbox.data_service.config
    cfg.user_api_call_rate = 60_000
    cfg.user_hard_refresh_interval = cfg.user_soft_refresh_interval = 0
    return sandbox


def signed(
    method: str,
    url: str,
    cfg: DataServiceConfig,
    *,
    accept: bool = True,
    creds: dict[str, str] | None = None,
) -> dict[str, str]:
    """Headers of a request signed by authlib (independent of the target's code)."""
    creds = creds or {}
    auth = ClientAuth(
        creds.get("consumer_key", cfg.consumer_key),
        creds.get("consumer_secret", cfg.consumer_secret),
        token=creds.get("token", cfg.token),
        token_secret=creds.get("token_secret", cfg.token_secret),
    )
    _, headers, _ = auth.sign(method, url, {}, b"")
    out = {"Authorization": headers["Authorization"]}
    return {**out, **ACCEPT} if accept else out


def tiny_xlsx(sheets: dict[str, list[list[str]]]) -> bytes:
    """A minimal valid .xlsx (inline strings), built by hand with zipfile."""
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    pkg = "http://schemas.openxmlformats.org/package/2006/relationships"
    ct = "application/vnd.openxmlformats-officedocument.spreadsheetml"
    names = list(sheets)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        overrides = "".join(
            f'<Override PartName="/xl/worksheets/sheet{i}.xml" ContentType="{ct}.worksheet+xml"/>'
            for i in range(1, len(names) + 1)
        )
        z.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats'
            '.org/package/2006/content-types"><Default Extension="rels" ContentType="application'
            '/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" '
            f'ContentType="application/xml"/><Override PartName="/xl/workbook.xml" ContentType='
            f'"{ct}.sheet.main+xml"/>{overrides}</Types>',
        )
        z.writestr(
            "_rels/.rels",
            f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{pkg}"><Relationship '
            f'Id="rId1" Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        )
        sheet_list = "".join(
            f'<sheet name="{n}" sheetId="{i}" r:id="rId{i}"/>' for i, n in enumerate(names, 1)
        )
        z.writestr(
            "xl/workbook.xml",
            f'<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="{main}" xmlns:r="{rel}">'
            f"<sheets>{sheet_list}</sheets></workbook>",
        )
        links = "".join(
            f'<Relationship Id="rId{i}" Type="{rel}/worksheet" Target="worksheets/sheet{i}.xml"/>'
            for i in range(1, len(names) + 1)
        )
        z.writestr(
            "xl/_rels/workbook.xml.rels",
            f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{pkg}">{links}'
            "</Relationships>",
        )
        for i, rows in enumerate(sheets.values(), 1):
            body = "".join(
                f'<row r="{r}">'
                + "".join(
                    f'<c r="{column_name(c)}{r}" t="inlineStr"><is><t>{v}</t></is></c>'
                    for c, v in enumerate(row)
                )
                + "</row>"
                for r, row in enumerate(rows, 1)
            )
            z.writestr(
                f"xl/worksheets/sheet{i}.xml",
                f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{main}">'
                f"<sheetData>{body}</sheetData></worksheet>",
            )
    return buf.getvalue()


def ds_config(tmp: Path, sb: Sandbox, **data_service: Any) -> Path:
    """A daemon config delivering to the sandbox's data service."""
    cfg = sb.data_service.config
    return write_config(
        tmp,
        sb,
        api={"kind": "data-service", "url": url_of(sb.origin)},
        data_service={
            "consumer_key": cfg.consumer_key,
            "consumer_secret": cfg.consumer_secret,
            "token": cfg.token,
            "token_secret": cfg.token_secret,
            "rate_limit_wait": 0.2,
            **data_service,
        },
    )


def states(config: Path, **want: int) -> Callable[[], Any]:
    async def check() -> bool:
        c = await counts(config)
        return all(c.get(state, 0) == n for state, n in want.items())

    return check


def one_per_file(sb: Sandbox, files: dict[str, bytes]) -> dict[str, Any]:
    """Exactly one data source per file (matched by name), holding the file's bytes."""
    sources = list(sb.data_service.data_sources.values())
    out = {}
    for rel, data in files.items():
        stem = rel.rsplit(".", 1)[0]
        mine = [s for s in sources if s.name.startswith(f"{stem} [inboxd-")]
        assert len(mine) == 1, (rel, [s.name for s in sources])
        assert mine[0].content == data, rel
        out[rel] = mine[0]
    assert len(sources) == len(files), [s.name for s in sources]
    return out


# ---- pure pieces ----------------------------------------------------------------------------


def test_names_limits_and_signature_base_string() -> None:
    key = "0123456789abcdef0123456789abcdef"
    assert marker(key) == "inboxd-0123456789abcdef"
    assert source_name("dir/sales.csv", key, "csv") == "dir/sales [inboxd-0123456789abcdef].csv"
    assert source_name("sales", key, "xlsx") == "sales [inboxd-0123456789abcdef].xlsx"
    again = "dir/sales [inboxd-0123456789abcdef].csv"  # journaled by an earlier try
    assert source_name(again, key, "csv") == again
    limits = RateLimits.model_validate({"userApiCallRate": 200, "fileSizeLimit": 2})
    # The table's "2 MB" in decimal units; no refresh interval and no account limit given.
    assert limits.max_file_bytes == 2_000_000 and limits.offers("excel")
    assert limits.refresh_interval == 0 and limits.account_rate == 0
    limits = RateLimits.model_validate(
        {"userApiCallRate": 200, "fileSizeLimit": 5_000_000, "adapterTypes": ["CSV"]}
    )
    assert limits.max_file_bytes == 5_000_000 and limits.offers("csv")
    assert not limits.offers("excel")
    assert [column_name(i) for i in (0, 25, 26, 27, 701, 702)] == [
        "A",
        "Z",
        "AA",
        "AB",
        "ZZ",
        "AAA",
    ]
    # RFC 5849 §3.4.1.1's example request, signed with its (hmac-sha1) example secrets.
    params = {
        "oauth_consumer_key": "9djdj82h48djs9d2",
        "oauth_token": "kkk9d7dh3k39sjv7",
        "oauth_signature_method": "HMAC-SHA1",
        "oauth_timestamp": "137131201",
        "oauth_nonce": "7d8f3e4a",
    }
    base = signature_base_string(
        "POST", "http://example.com/request", "b5=%3D%253D&a3=a&c%40=&a2=r%20b", params
    )
    assert base == (
        "POST&http%3A%2F%2Fexample.com%2Frequest&a2%3Dr%2520b%26a3%3Da%26b5%3D%253D%25253D%26c"
        "%2540%3D%26oauth_consumer_key%3D9djdj82h48djs9d2%26oauth_nonce%3D7d8f3e4a%26oauth_"
        "signature_method%3DHMAC-SHA1%26oauth_timestamp%3D137131201%26oauth_token%3Dkkk9d7dh3"
        "k39sjv7"
    )
    assert len(hmac_sha1_signature(base, "j49sk3j29djd", "dh893hdasih9")) == 28


def test_config_secrets_from_files_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "cs").write_text("consumer-s3cret\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[api]\nkind = "data-service"\n[data_service]\nconsumer_key = "ck"\n'
        f'consumer_secret_file = "{tmp_path / "cs"}"\ntoken = "tok"\ntoken_secret = "ts"\n'
        'adapters = { ".CSV" = "csv", xlsx = "excel" }\n'
        'grants = [{ permission_type = "account", identifier = "42" }]\n'
    )
    settings = load_settings(cfg, require_token=True)  # no [api] token needed
    ds = settings.data_service
    assert ds.secret("consumer_secret").get_secret_value() == "consumer-s3cret"
    assert ds.adapters == {"csv": "csv", "xlsx": "excel"}
    assert ds.grants[0].role == "view"
    assert "consumer-s3cret" not in repr(settings) and "ts" not in str(ds.token_secret)
    cfg.write_text('[api]\nkind = "data-service"\n[data_service]\ntoken_secret = 12345\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, require_token=True)
    assert "12345" not in str(err.value) and "<hidden>" in str(err.value)
    cfg.write_text('[api]\nkind = "data-service"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, require_token=True)
    text = str(err.value)
    assert "data_service.consumer_key" in text and "data_service.token_secret" in text


# ---- the sandbox ----------------------------------------------------------------------------


def test_sandbox_checks_oauth_signatures(ds: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ds.data_service.config
    url = url_of(ds.origin) + "/rateLimits"
    with httpx.Client(timeout=5) as http:
        ok = http.get(url, headers=signed("GET", url, cfg))
        assert ok.status_code == 200, ok.text
        assert ok.json()["fileSizeLimit"] == 2_000_000 and ok.json()["userApiCallRate"] == 60_000
        assert http.get(url, headers=ACCEPT).status_code == 401
        for bad in (
            {"consumer_secret": "wrong"},
            {"token_secret": "wrong"},
            {"token": "someone-else"},
            {"consumer_key": "stranger"},
        ):
            answer = http.get(url, headers=signed("GET", url, cfg, creds=bad))
            assert answer.status_code == 401, bad
            assert answer.headers["WWW-Authenticate"].startswith("OAuth")
        # Signed for one query, sent with another: the signature covers the query.
        headers = signed("GET", url + "?a=1", cfg)
        assert http.get(url + "?a=2", headers=headers).status_code == 401
        # A replayed request (same nonce) is refused.
        headers = signed("GET", url, cfg)
        assert http.get(url, headers=headers).status_code == 200
        replay = http.get(url, headers=headers)
        assert replay.status_code == 401 and "nonce" in replay.json()["error"]
        # A timestamp far from the server's clock is refused.
        monkeypatch.setattr(client_auth, "generate_timestamp", lambda: str(int(time.time()) - 900))
        stale = http.get(url, headers=signed("GET", url, cfg))
        assert stale.status_code == 401 and "timestamp" in stale.json()["error"]


def test_sandbox_requires_the_version_header(ds: Sandbox) -> None:
    cfg = ds.data_service.config
    url = url_of(ds.origin) + "/dataSources"
    with httpx.Client(timeout=5) as http:
        for accept in (None, "application/json", "application/json;v=2"):
            headers = signed("GET", url, cfg, accept=False)
            if accept:
                headers["Accept"] = accept
            answer = http.get(url, headers=headers)
            assert answer.status_code == 406, accept
            assert "application/json;v=1" in answer.json()["error"]
        answer = http.get(url, headers=signed("GET", url, cfg))
        assert answer.status_code == 200 and answer.json()["dataSources"] == []


def test_sandbox_adapters_limits_and_call_rate(ds: Sandbox) -> None:
    cfg = ds.data_service.config
    base = url_of(ds.origin)
    with httpx.Client(timeout=5) as http:

        def call(method: str, path: str, **kw: Any) -> httpx.Response:
            query = kw.pop("query", "")
            url = f"{base}{path}" + (f"?{query}" if query else "")
            return http.request(method, url, headers=signed(method, url, cfg), **kw)

        made = call("POST", "/adapter/csv", files={"file": ("t.csv", b"a,b\n1,2\n3,4\n")})
        assert made.status_code == 201, made.text
        link = made.json()["uri"]
        source = ds.data_service.data_sources[int(link.rsplit("/", 1)[1])]
        assert (source.name, source.adapter, len(source.collections[0].rows)) == ("t.csv", "CSV", 3)
        assert [(g.permission_type, g.role) for g in source.grants] == [("user", "edit")]
        collection = made.json()["collections"]
        over = call(
            "PUT",
            "/adapter/csv",
            query=httpx.QueryParams({"dataSource": link}),
            files={"file": ("t.csv", b"a\n")},
        )
        assert over.status_code == 200 and over.json()["uri"] == link
        assert over.json()["collections"] == collection and source.writes == 2
        xlsx = tiny_xlsx({"Data": [["x", "y"], ["1", "2"]], "More": [["z"]]})
        made = call("POST", "/adapter/excel", files={"file": ("w.xlsx", xlsx)})
        assert made.status_code == 201, made.text
        book = ds.data_service.data_sources[int(made.json()["uri"].rsplit("/", 1)[1])]
        assert [(c.name, len(c.rows)) for c in book.collections] == [("Data", 2), ("More", 1)]
        # Refusals: not a spreadsheet, no file, no data source, an unknown one, too big.
        bad = call("POST", "/adapter/excel", files={"file": ("w.xlsx", b"not a zip")})
        assert bad.status_code == 400
        assert call("POST", "/adapter/csv", files={"other": (None, "x")}).status_code == 400
        assert call("PUT", "/adapter/csv", files={"file": ("t.csv", b"a\n")}).status_code == 400
        gone = call(
            "PUT",
            "/adapter/csv",
            query=httpx.QueryParams({"dataSource": f"{base}/dataSources/99"}),
            files={"file": ("t.csv", b"a\n")},
        )
        assert gone.status_code == 404
        big = b"x,y\n" * (MiB // 2 + 1)  # 4 bytes above 2 MiB
        assert call("POST", "/adapter/csv", files={"file": ("b.csv", big)}).status_code == 413
        # Pagination with prev/next links.
        cfg.page_size = 1
        first = call("GET", "/dataSources").json()
        assert first["total"] == 2 and len(first["dataSources"]) == 1 and first["prev"] is None
        second = http.get(first["next"], headers=signed("GET", first["next"], cfg)).json()
        assert second["dataSources"][0]["name"] == "w.xlsx" and second["next"] is None
        # The call rate: 2 requests per 1-second window, then 429 with Retry-After.
        cfg.user_api_call_rate, cfg.rate_window = 120, 1.0
        time.sleep(1.0)
        assert [call("GET", "/rateLimits").status_code for _ in range(2)] == [200, 200]
        limited = call("GET", "/rateLimits")
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1


# ---- the target in a real daemon ------------------------------------------------------------


async def test_csv_and_xlsx_delivered_then_a_changed_csv_overwrites_its_data_source(
    ds: Sandbox, tmp_path: Path
) -> None:
    data_set = ds.data_service.add_data_set("inbox")
    set_link = f"{url_of(ds.origin)}/dataSets/{data_set.id}"
    config = ds_config(
        tmp_path,
        ds,
        permission_type="account",
        data_set=set_link,
        grants=[{"permission_type": "user", "identifier": "77", "role": "view"}],
    )
    inbox = tmp_path / "inbox"
    files = {
        "plant/sales.csv": b"region,amount\nnorth,1\nsouth,2\n",
        "book.xlsx": tiny_xlsx({"Q1": [["a", "b"], ["1", "2"]], "Q2": [["c"]]}),
    }
    for rel, data in files.items():
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(data)
    (inbox / "notes.txt").write_text("not a spreadsheet")
    async with running_service(config) as svc:
        await wait_until(states(config, done=2, failed=1), timeout=20)
        sources = one_per_file(ds, files)
        csv_source = sources["plant/sales.csv"]
        assert csv_source.adapter == "CSV" and sources["book.xlsx"].adapter == "EXCEL"
        assert [c.name for c in sources["book.xlsx"].collections] == ["Q1", "Q2"]
        for source in sources.values():
            assert source.data_set_id == data_set.id
            grants = [(g.permission_type, g.identifier, g.role) for g in source.grants]
            assert grants == [("account", "2001", "edit"), ("user", "77", "view")]
        queue: Queue = svc.queue  # type: ignore[assignment]
        (txt,) = await queue.find_by_rel("notes.txt")
        assert txt.state == JobState.FAILED and "no adapter for .txt" in (txt.last_error or "")
        posts = [r for r in ds.data_service.requests if r.route == "POST /adapter/csv"]
        assert len(posts) == 1 and "permissionType=account" in posts[0].query

        changed = b"region,amount\nnorth,5\nsouth,6\neast,7\n"
        (inbox / "plant/sales.csv").write_bytes(changed)
        await wait_until(states(config, done=3, failed=1), timeout=20)
        files["plant/sales.csv"] = changed
        after = one_per_file(ds, files)
        assert after["plant/sales.csv"].id == csv_source.id  # the same data source, overwritten
        assert csv_source.writes == 2 and len(csv_source.collections[0].rows) == 4
        puts = [r for r in ds.data_service.requests if r.route == "PUT /adapter/csv"]
        assert len(puts) == 1 and f"dataSources%2F{csv_source.id}" in puts[0].query
        jobs = await queue.find_by_rel("plant/sales.csv")
        assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE]
        assert jobs[1].target_refs["action"] == "overwritten"
        assert jobs[1].remote_id == csv_source.id
    # Every request was signed and asked for version 1.
    for record in ds.data_service.requests:
        assert (record.authorization or "").startswith("OAuth "), record
        assert record.headers.get("accept") == "application/json;v=1"

    out = inboxd("status", "--config", str(config), "--json")
    assert out.returncode == 0, out.stderr
    by_path = {j["path"]: j for j in json.loads(out.stdout)["jobs"]}
    refs = by_path["plant/sales.csv"]["target_refs"]
    assert refs["data_source"] == f"{url_of(ds.origin)}/dataSources/{csv_source.id}"
    assert refs["collection"].endswith(f"/collections/{csv_source.collections[0].id}")
    assert refs["data_set"] == set_link and by_path["book.xlsx"]["target"] == "data-service"
    assert by_path["book.xlsx"]["import_status"] == "DELIVERED"
    check = inboxd("check", "--config", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OAuth 1.0 accepted" in check.stdout and "data set 'inbox'" in check.stdout


async def test_file_above_the_size_limit_is_refused_before_it_is_sent(
    ds: Sandbox, tmp_path: Path
) -> None:
    config = ds_config(tmp_path, ds)
    (tmp_path / "inbox" / "huge.csv").write_bytes(b"a,b\n" * (640 * 1024))  # 2.5 MiB
    async with running_service(config) as svc:
        await wait_until(states(config, failed=1), timeout=20)
        queue: Queue = svc.queue  # type: ignore[assignment]
        (job,) = await queue.find_by_rel("huge.csv")
    assert "above the data service's file size limit of 2000000 bytes" in (job.last_error or "")
    assert [r.route for r in ds.data_service.requests] == ["GET /rateLimits"]
    assert not ds.data_service.data_sources


@pytest.mark.parametrize("rate", ["user", "account"])
async def test_call_rate_limiter_keeps_under_the_user_and_the_account_rate(
    sandbox: Sandbox, tmp_path: Path, rate: str
) -> None:
    cfg = sandbox.data_service.config
    # 120 per minute counted over 5 s: 10 requests in any 5 s. The limiter spaces calls at 90 %
    # of the rate, so a request may arrive up to 0.5 s late before the server counts one too
    # many (with a 1 s window, a loaded machine's 0.1 s of scheduling jitter cost a 429; the
    # real service counts over a minute).
    cfg.rate_window = 5.0
    if rate == "user":
        cfg.user_api_call_rate = 120
    else:
        cfg.account_api_call_rate = 120  # the same for the whole account, the user's higher
    config = ds_config(tmp_path, sandbox)
    files = {f"f{i}.csv": f"n\n{i}\n".encode() for i in range(5)}
    for rel, data in files.items():
        (tmp_path / "inbox" / rel).write_bytes(data)
    async with running_service(config):
        await wait_until(states(config, done=5), timeout=25)
    one_per_file(sandbox, files)
    records = sandbox.data_service.requests
    assert all(r.status != 429 for r in records), [(r.route, r.status) for r in records]
    times = sorted(r.time for r in records)
    busiest = max(sum(1 for t in times if end - 5.0 < t <= end) for end in times)
    assert busiest <= 10, times
    assert times[-1] - times[0] >= (len(times) - 2) * 0.5  # the limiter did space them


async def test_faults_and_lost_answers_still_make_one_data_source_per_file(
    ds: Sandbox, tmp_path: Path
) -> None:
    faults = ds.faults
    faults.retry_after = 0.05
    faults.fail_next = {
        "POST /adapter/csv": [503, 0, 0],  # refused, then two answers lost after the work
        "GET /dataSources": [503],
        "PATCH /dataSources/{id}": [0],
        "POST /sourceGrants": [0, 503],
    }
    data_set = ds.data_service.add_data_set("faulty")
    config = ds_config(
        tmp_path,
        ds,
        data_set=f"{url_of(ds.origin)}/dataSets/{data_set.id}",
        grants=[{"permission_type": "account", "identifier": "9", "role": "edit"}],
    )
    files = {f"r{i}.csv": f"k,v\n{i},{i * i}\n".encode() for i in range(3)}
    for rel, data in files.items():
        (tmp_path / "inbox" / rel).write_bytes(data)
    async with running_service(config):
        await wait_until(states(config, done=3), timeout=25)
        assert not any(faults.fail_next.values()), faults.fail_next
        # Random 503s and lost answers on top.
        faults.api_503_rate = faults.drop_response_rate = 0.2
        more = {f"s{i}.csv": f"k\n{i}\n".encode() for i in range(4)}
        for rel, data in more.items():
            (tmp_path / "inbox" / rel).write_bytes(data)
        await wait_until(states(config, done=7), timeout=30)
        faults.api_503_rate = faults.drop_response_rate = 0.0
    files.update(more)
    for source in one_per_file(ds, files).values():
        assert source.data_set_id == data_set.id
        grants = [(g.permission_type, g.identifier) for g in source.grants]
        assert grants.count(("account", "9")) == 1, grants  # a lost grant answer: no double
    dropped = [r for r in ds.data_service.requests if r.dropped]
    assert len(dropped) >= 4


async def test_rate_limit_answer_waits_and_retries_without_looking(
    ds: Sandbox, tmp_path: Path
) -> None:
    ds.faults.fail_next = {"POST /adapter/csv": [429]}  # no Retry-After: rate_limit_wait
    config = ds_config(tmp_path, ds, rate_limit_wait=0.5)
    (tmp_path / "inbox" / "t.csv").write_bytes(b"a\n1\n")
    async with running_service(config):
        await wait_until(states(config, done=1), timeout=20)
    one_per_file(ds, {"t.csv": b"a\n1\n"})
    records = [r for r in ds.data_service.requests if r.route != "GET /rateLimits"]
    assert [(r.route, r.status) for r in records] == [
        ("POST /adapter/csv", 429),
        ("POST /adapter/csv", 201),  # a 429 made nothing: no lookup before the retry
        ("PATCH /collections/{id}/properties", 200),  # then its properties (headerRow, ...)
    ]
    assert records[1].time - records[0].time >= 0.45


def test_sigkill_mid_delivery_then_restart_makes_one_data_source(
    ds: Sandbox, tmp_path: Path
) -> None:
    ds.data_service.config.adapter_delay = 10.0  # the data source exists; its answer waits
    config = ds_config(tmp_path, ds)
    data = b"when,what\n1,kill\n"
    (tmp_path / "inbox" / "victim.csv").write_bytes(data)
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        deadline = time.monotonic() + 20
        while not ds.data_service.data_sources and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ds.data_service.data_sources, "no data source was made"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    ds.data_service.config.adapter_delay = 0.0
    proc = start_daemon(config, log)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = inboxd("status", "--config", str(config), "--json")
            if out.returncode == 0 and json.loads(out.stdout)["counts"].get("done") == 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("not done after the restart")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    (source,) = one_per_file(ds, {"victim.csv": data}).values()
    posts = [r for r in ds.data_service.requests if r.route == "POST /adapter/csv"]
    assert len(posts) == 1  # found by its marker, not posted again
    text = log.read_bytes()
    assert b"data_source.recovered" in text
    cfg = ds.data_service.config
    for secret in (cfg.consumer_secret, cfg.token_secret):
        assert secret.encode() not in text
        for db in (tmp_path / "state").glob("state.db*"):
            assert secret.encode() not in db.read_bytes()
    assert source.writes == 1


async def test_create_that_kept_failing_is_looked_up_then_posted_under_the_same_name(
    ds: Sandbox, tmp_path: Path
) -> None:
    ds.faults.fail_next = {"POST /adapter/csv": [503] * 4}  # every try of the first turn
    config = ds_config(tmp_path, ds)
    (tmp_path / "inbox" / "stubborn.csv").write_bytes(b"a\n1\n")
    async with running_service(config) as svc:
        await wait_until(states(config, done=1), timeout=20)
        queue: Queue = svc.queue  # type: ignore[assignment]
        (job,) = await queue.find_by_rel("stubborn.csv")
    (source,) = one_per_file(ds, {"stubborn.csv": b"a\n1\n"}).values()
    assert source.name == f"stubborn [{marker(job.upload_key)}].csv"
    assert job.attempts >= 1 and job.remote_name == source.name
    routes = [r.route for r in ds.data_service.requests]
    assert routes.count("GET /dataSources") >= 2  # looked before each repeated POST


async def test_file_changed_while_its_data_source_was_made_keeps_one_data_source(
    ds: Sandbox, tmp_path: Path
) -> None:
    ds.data_service.config.adapter_delay = 1.0
    config = ds_config(tmp_path, ds)
    path = tmp_path / "inbox" / "live.csv"
    path.write_bytes(b"v\n1\n")
    async with running_service(config) as svc:
        await wait_until(lambda: ds.data_service.data_sources, timeout=20)
        ds.data_service.config.adapter_delay = 0.0
        path.write_bytes(b"v\n2\n22\n")  # while the first version's answer is on its way
        await wait_until(states(config, done=1, superseded=1), timeout=20)
        queue: Queue = svc.queue  # type: ignore[assignment]
        jobs = await queue.find_by_rel("live.csv")
    (source,) = one_per_file(ds, {"live.csv": b"v\n2\n22\n"}).values()
    assert source.writes == 2  # the new version overwrote the first version's data source
    assert [j.state for j in jobs] == [JobState.SUPERSEDED, JobState.DONE]
    assert jobs[1].target_refs["action"] == "overwritten"


# ---- issue 13: the service's other rules, in the sandbox and kept by the target -------------


def test_sandbox_properties_header_row_locks_intervals_and_data_sets(ds: Sandbox) -> None:
    svc = ds.data_service
    cfg = svc.config
    base = url_of(ds.origin)
    with httpx.Client(timeout=5) as http:

        def call(method: str, path: str, **kw: Any) -> httpx.Response:
            query = kw.pop("query", "")
            url = (path if path.startswith("http") else f"{base}{path}") + (
                f"?{query}" if query else ""
            )
            return http.request(method, url, headers=signed(method, url, cfg), **kw)

        made = call("POST", "/adapter/csv", files={"file": ("h.csv", b"name,qty\npen,2\ncup,5\n")})
        assert made.status_code == 201, made.text
        link, collection = made.json()["uri"], made.json()["collections"]
        # Without headerRow the columns are A, B and every row is an item.
        items = call("GET", collection + "/items").json()
        assert items["items"][0]["fields"] == {"A": "name", "B": "qty"}
        assert len(items["items"]) == 3
        # Properties: strings only; headerRow a row number; PATCH answers what it changed.
        assert call("PATCH", collection + "/properties", json={"n": 1}).status_code == 400
        bad = call("PATCH", collection + "/properties", json={"headerRow": "first"})
        assert bad.status_code == 400 and "headerRow" in bad.json()["error"]
        patched = call("PATCH", collection + "/properties", json={"headerRow": "1", "rig": "r7"})
        assert patched.json() == {"headerRow": "1", "rig": "r7"}
        call("PATCH", collection + "/properties", json={"old": "x"})
        assert call("GET", collection + "/properties").json() == {
            "headerRow": "1",
            "rig": "r7",
            "old": "x",
        }
        gone = call("DELETE", collection + "/properties", query="properties=old,missing")
        assert (
            gone.status_code == 200 and "old" not in call("GET", collection + "/properties").json()
        )
        # With headerRow the first row names the fields and is no item.
        items = call("GET", collection + "/items").json()
        assert [i["fields"] for i in items["items"]] == [
            {"name": "pen", "qty": "2"},
            {"name": "cup", "qty": "5"},
        ]
        schema = call("GET", collection + "/schema").json()
        assert [(f["name"], f["order"]) for f in schema] == [("name", 1), ("qty", 2)]

        # A refresh in progress: overwrites, property changes and item reads answer 423.
        cid = int(collection.rsplit("/", 1)[1])
        svc.refresh(cid, 30.0)
        assert call("GET", collection).json()["syncStarted"] is not None
        put = call(
            "PUT",
            "/adapter/csv",
            query=httpx.QueryParams({"dataSource": link}),
            files={"file": ("h.csv", b"name,qty\n")},
        )
        assert put.status_code == 423 and "being refreshed" in put.json()["error"]
        assert call("PATCH", collection + "/properties", json={"a": "b"}).status_code == 423
        assert call("GET", collection + "/items").status_code == 423
        assert svc.refused["locked"] == 3
        svc._collection(cid).unlock()
        assert call("GET", collection).json()["syncStarted"] is None

        # The hard refresh interval, counted from the last adapter write (here: the create).
        cfg.user_hard_refresh_interval = 30
        early = call(
            "PUT",
            "/adapter/csv",
            query=httpx.QueryParams({"dataSource": link}),
            files={"file": ("h.csv", b"name,qty\n")},
        )
        assert early.status_code == 429 and 1 <= int(early.headers["Retry-After"]) <= 30
        assert "refresh interval" in early.json()["error"] and svc.refused["refresh"] == 1
        cfg.user_hard_refresh_interval = 0

        # An import in progress: the new data source is pending — hidden from the list, but
        # readable by id and listed through its collection — and its collection is locked.
        cfg.import_seconds = 1.0
        with httpx.Client(timeout=0.3) as impatient:
            url = f"{base}/adapter/csv"
            with pytest.raises(httpx.ReadTimeout):
                impatient.post(
                    url, headers=signed("POST", url, cfg), files={"file": ("p.csv", b"a\n1\n")}
                )
        cfg.import_seconds = 0.0
        (pending,) = [s for s in svc.data_sources.values() if s.name == "p.csv"]
        assert pending.pending
        listed = [s["name"] for s in call("GET", "/dataSources").json()["dataSources"]]
        assert listed == ["h.csv"]
        assert call("GET", f"/dataSources/{pending.id}").json()["pending"] is True
        owners = [c["dataSource"] for c in call("GET", "/collections").json()["collections"]]
        assert owners == [link, f"{base}/dataSources/{pending.id}"]
        assert call("GET", f"/collections/{pending.collections[0].id}/items").status_code == 423
        deadline = time.monotonic() + 10
        while pending.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pending.pending and not pending.collections[0].locked

        # Data sets: created with properties, properties patched and deleted, renamed, deleted.
        made_set = call("POST", "/dataSets", json={"name": "Runs", "properties": {"k": "v"}})
        set_link = made_set.json()["uri"]
        assert call("GET", set_link + "/properties").json() == {"k": "v"}
        assert call("PATCH", set_link + "/properties", json={"k": "w", "z": "1"}).json() == {
            "k": "w",
            "z": "1",
        }
        call("DELETE", set_link + "/properties", query="properties=z")
        assert call("GET", set_link + "/properties").json() == {"k": "w"}
        assert call("PATCH", set_link, json={"name": "Runs 2"}).json()["name"] == "Runs 2"
        assert call("DELETE", set_link).status_code == 200
        assert call("GET", set_link).status_code == 404

        # The file size limit in decimal megabytes: 2,000,001 bytes is too big.
        too_big = b"x,y\n" * 500_000 + b"z"
        assert call("POST", "/adapter/csv", files={"file": ("b.csv", too_big)}).status_code == 413
        fits = b"x,y\n" * 500_000
        assert call("POST", "/adapter/csv", files={"file": ("f.csv", fits)}).status_code == 201

        # The account's call rate counts every token of the account together.
        cfg.account_api_call_rate, cfg.rate_window = 120, 1.0
        time.sleep(1.0)
        assert [call("GET", "/rateLimits").status_code for _ in range(2)] == [200, 200]
        limited = call("GET", "/rateLimits")
        assert limited.status_code == 429 and "account" in limited.json()["error"]
        assert svc.refused["account_rate"] == 1 and "user_rate" not in svc.refused


def _collection_of(sb: Sandbox, source_id: int) -> Any:
    return sb.data_service.data_sources[source_id].collections[0]


async def test_metadata_becomes_collection_properties_and_data_sets_are_made_by_name(
    ds: Sandbox, tmp_path: Path
) -> None:
    svc = ds.data_service
    existing = svc.add_data_set("Existing")
    existing.properties = {"owner": "old", "keep": "1"}
    svc.add_data_set("Runs elsewhere")  # a similar name is not the same data set
    config = ds_config(tmp_path, ds, data_set="Runs", data_set_properties={"team": "test", "n": 2})
    text = config.read_text().replace(
        "[upload]\n",
        '[upload]\nmetadata = { site = "plant-a", batch = 7, ok = true }\n'
        'path_metadata = ["line"]\n',
    )
    text += (
        '[[routes]]\nglob = "line2/*"\ndata_set = "Existing"\n'
        'data_set_properties = { owner = "inboxd" }\nmetadata = { shift = "night" }\n'
    )
    config.write_text(text)
    check = inboxd("check", "--config", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "data set 'Runs': none yet, made with the first file" in check.stdout
    assert f"data set 'Existing' ({url_of(ds.origin)}/dataSets/{existing.id})" in check.stdout
    assert sorted(d.name for d in svc.data_sets.values()) == ["Existing", "Runs elsewhere"]

    ds.faults.fail_next = {"POST /dataSets": [0]}  # made, but its answer is lost
    inbox = tmp_path / "inbox"
    (inbox / "line1").mkdir()
    (inbox / "line2").mkdir()
    (inbox / "line1/a.csv.meta.json").write_text('{"operator": "kim", "empty": null}')
    files = {
        "line1/a.csv": b"region,amount\nnorth,1\nsouth,2\n",
        "line1/b.csv": b"k\n1\n",
        "line2/c.csv": b"x,y\n1,2\n",
        "book.xlsx": tiny_xlsx({"Q1": [["a", "b"], ["1", "2"]], "Q2": [["c"]]}),
    }
    for rel, data in files.items():
        (inbox / rel).write_bytes(data)
    async with running_service(config) as svc_:
        await wait_until(states(config, done=4), timeout=25)
        queue: Queue = svc_.queue  # type: ignore[assignment]
        (job_a,) = await queue.find_by_rel("line1/a.csv")
        sources = one_per_file(ds, files)
        runs = [d for d in svc.data_sets.values() if d.name == "Runs"]
        assert len(runs) == 1, [d.name for d in svc.data_sets.values()]  # lost answer: no twin
        assert runs[0].properties == {"team": "test", "n": "2"}
        assert existing.properties == {"owner": "inboxd", "keep": "1"}  # the missing one set
        posts = [r for r in svc.requests if r.route == "POST /dataSets"]
        assert [p.dropped for p in posts] == [True]  # one POST, its answer lost, then found
        for rel, source in sources.items():
            want = existing.id if rel.startswith("line2/") else runs[0].id
            assert source.data_set_id == want, rel

        a = _collection_of(ds, sources["line1/a.csv"].id)
        modified = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime((inbox / "line1/a.csv").stat().st_mtime)
        )
        assert a.properties == {
            "headerRow": "1",
            "site": "plant-a",
            "batch": "7",
            "ok": "true",
            "line": "line1",
            "operator": "kim",
            "inboxd_upload_id": job_a.upload_key,
            "inboxd_file_modified": modified,
        }
        assert a.fields() == ["region", "amount"] and a.items() == [["north", "1"], ["south", "2"]]
        c = _collection_of(ds, sources["line2/c.csv"].id)
        assert (c.properties["shift"], c.properties["line"]) == ("night", "line2")
        book = sources["book.xlsx"].collections
        assert "headerRow" not in book[0].properties and book[0].properties["site"] == "plant-a"

        # A new version without the sidecar's operator: the property goes, the rest follows.
        (inbox / "line1/a.csv.meta.json").write_text('{"shift": "early"}')
        (inbox / "line1/a.csv").write_bytes(b"region,amount\nwest,9\n")
        await wait_until(states(config, done=5), timeout=20)
        jobs = await queue.find_by_rel("line1/a.csv")
    assert jobs[-1].target_refs["action"] == "overwritten"
    assert "operator" not in a.properties and a.properties["shift"] == "early"
    assert a.properties["inboxd_upload_id"] == jobs[-1].upload_key
    assert a.items() == [["west", "9"]]
    assert sorted(jobs[-1].target_refs["properties"]) == sorted(a.properties)


async def test_lost_create_of_a_pending_data_source_makes_no_duplicate(
    ds: Sandbox, tmp_path: Path
) -> None:
    svc = ds.data_service
    svc.config.import_seconds = 8.0  # the import outlasts the client's patience
    config = ds_config(tmp_path, ds)
    config.write_text(config.read_text().replace("timeout = 5.0", "timeout = 1.0"))
    data = b"when,what\n1,slow import\n"
    (tmp_path / "inbox" / "slow.csv").write_bytes(data)
    async with running_service(config) as service:
        await wait_until(lambda: svc.data_sources, timeout=20)
        (source,) = svc.data_sources.values()
        assert source.pending  # what GET /dataSources hides while the import runs
        await wait_until(states(config, done=1), timeout=40)
        queue: Queue = service.queue  # type: ignore[assignment]
        (job,) = await queue.find_by_rel("slow.csv")
    one_per_file(ds, {"slow.csv": data})
    routes = [r.route for r in svc.requests]
    assert routes.count("POST /adapter/csv") == 1  # not posted again: no duplicate
    # The POST timed out; the list did not show the pending data source, its collection did.
    after = routes[routes.index("POST /adapter/csv") + 1 :]
    looked = after.index("GET /dataSources")
    assert after[looked + 1 : looked + 3] == ["GET /collections", "GET /dataSources/{id}"]
    assert job.target_refs["action"] == "created" and job.remote_id == source.id
    # Its properties had to wait for the import (423 while it ran), then were set.
    assert svc.refused.get("locked", 0) >= 1
    assert source.collections[0].properties["inboxd_upload_id"] == job.upload_key


async def test_423_during_an_overwrite_is_waited_out(ds: Sandbox, tmp_path: Path) -> None:
    svc = ds.data_service
    config = ds_config(tmp_path, ds)
    path = tmp_path / "inbox" / "locked.csv"
    path.write_bytes(b"v\n1\n")
    async with running_service(config) as service:
        await wait_until(states(config, done=1), timeout=20)
        (source,) = svc.data_sources.values()
        collection = source.collections[0]
        svc.refresh(collection.id, 60.0)  # someone refreshes it in the app meanwhile
        path.write_bytes(b"v\n2\n3\n")
        await wait_until(lambda: svc.refused.get("locked", 0) >= 2, timeout=20)
        collection.unlock()  # the refresh is over
        await wait_until(states(config, done=2), timeout=20)
        queue: Queue = service.queue  # type: ignore[assignment]
        jobs = await queue.find_by_rel("locked.csv")
    one_per_file(ds, {"locked.csv": b"v\n2\n3\n"})
    puts = [r for r in svc.requests if r.route == "PUT /adapter/csv"]
    assert [p.status for p in puts][-1] == 200 and 423 in [p.status for p in puts]
    assert source.writes == 2 and collection.rows == [["v"], ["2"], ["3"]]
    assert [j.state for j in jobs] == [JobState.DONE, JobState.DONE]  # never failed for it
    assert jobs[1].target_refs["action"] == "overwritten"


async def test_changes_faster_than_the_refresh_interval_coalesce(
    ds: Sandbox, tmp_path: Path
) -> None:
    svc = ds.data_service
    svc.config.user_hard_refresh_interval = 3
    svc.config.user_soft_refresh_interval = 2
    config = ds_config(tmp_path, ds)
    path = tmp_path / "inbox" / "live.csv"
    path.write_bytes(b"v\n1\n")
    async with running_service(config) as service:
        await wait_until(states(config, done=1), timeout=20)
        queue: Queue = service.queue  # type: ignore[assignment]

        async def waiting(n: int) -> bool:
            jobs = await queue.find_by_rel("live.csv")
            return len(jobs) == n and jobs[-1].error_kind == "not_yet"

        path.write_bytes(b"v\n2\n")  # too soon: waits in the queue for the interval
        await wait_until(lambda: waiting(2), timeout=20)
        path.write_bytes(b"v\n3\n33\n")  # sooner still: only this newest version is sent
        await wait_until(states(config, done=2, superseded=1), timeout=20)
        jobs = await queue.find_by_rel("live.csv")
    (source,) = one_per_file(ds, {"live.csv": b"v\n3\n33\n"}).values()
    assert source.writes == 2  # created, then overwritten once: version 2 never went out
    assert [j.state for j in jobs] == [JobState.DONE, JobState.SUPERSEDED, JobState.DONE]
    # Superseded by the newer version while it waited (the queue says by which job).
    assert f"now job {jobs[2].id}" in (jobs[1].last_error or ""), jobs[1].last_error
    writes = [r for r in svc.requests if r.route in ("POST /adapter/csv", "PUT /adapter/csv")]
    assert [w.route for w in writes] == ["POST /adapter/csv", "PUT /adapter/csv"]
    assert writes[1].time - writes[0].time >= 3  # the larger interval (hard) was kept
    assert "refresh" not in svc.refused  # the service never had to refuse


async def test_a_waiting_version_found_overtaken_is_superseded_with_the_reason(
    tmp_path: Path,
) -> None:
    """When a version that waited for the refresh interval is taken up and the file has
    changed (the newer version not yet queued), the reason says why it is not sent."""
    path = tmp_path / "live.csv"
    path.write_bytes(b"v\n1\n")
    ref = FileRef.stat(path)
    ident = FileIdentity("live.csv", ref.size, ref.mtime_ns, ref.inode)
    async with await Queue.open(tmp_path / "state.db") as queue:
        await queue.enqueue_many([NewJob(ident, 0, "live.csv", {}, "data-service")])
        job = await queue.claim("t", 30)
        assert job is not None
        work = Work(job, ref, Resume(), MemoryJournal(), progress=lambda n: None)
        _check_still_newest(work)  # unchanged: nothing to say
        await queue.retry_later(job.id, error="waits", kind=NotYetError.kind, delay=0)
        waited = await queue.claim("t", 30)
        assert waited is not None and waited.error_kind == "not_yet"
    path.write_bytes(b"v\n2\n22\n")
    with pytest.raises(FileChangedError, match="waited for the data service's refresh interval"):
        _check_still_newest(replace(work, job=waited))
    with pytest.raises(FileChangedError, match="was 4 bytes"):
        _check_still_newest(work)  # a version that did not wait: the usual reason
