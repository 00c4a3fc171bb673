"""`dealpulse report` and `dealpulse dims load` as a user runs them, and the HTML page in headless Chromium."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from dealpulse.agents.loader import load_direct
from dealpulse.agents.stack import settings_env
from dealpulse.pipelines.analytics import run_report
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store
from tests.e2e.test_cli import dealpulse

pytestmark = pytest.mark.e2e


@pytest.fixture
def filled(settings: Settings, store: Store) -> Settings:
    load_direct(store, settings, pack_messages(generate_world(8, 15_000).records(), 100))
    return settings


def test_report_formats_carry_the_same_numbers_as_the_views(filled: Settings, store: Store) -> None:
    env = settings_env(filled)
    expected = run_report(store, "funnel", by="region")
    as_json = dealpulse("report", "funnel", "--by", "region", "--format", "json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    assert orjson.loads(as_json.stdout) == orjson.loads(orjson.dumps(expected.records()))
    as_csv = dealpulse("report", "funnel", "--by", "region", "--format", "csv", env=env)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(r["region"], r["stage"], int(r["entered"]), int(r["converted"])) for r in rows] == [
        (r["region"], r["stage"], r["entered"], r["converted"]) for r in expected.records()
    ]
    table = dealpulse("report", "health", env=env)
    assert table.returncode == 0, table.stderr
    for row in run_report(store, "health").records():
        assert row["metric"] in table.stdout and row["status"] in table.stdout


def test_report_errors_are_clear(filled: Settings) -> None:
    env = settings_env(filled)
    bad_date = dealpulse("report", "funnel", "--since", "last tuesday", env=env)
    assert bad_date.returncode == 2 and "is not a date or time" in bad_date.stderr
    no_breakdown = dealpulse("report", "stalls", "--by", "region", env=env)
    assert no_breakdown.returncode == 2 and "--by works with funnel and dwell" in no_breakdown.stderr
    unreachable = dealpulse("report", "health", env={**env, "DEALPULSE_CLICKHOUSE_PORT": "1"})
    assert unreachable.returncode == 1 and "cannot reach the store" in unreachable.stderr


def test_dims_load_csv_feeds_the_breakdowns(filled: Settings, store: Store, tmp_path: Path) -> None:
    env = settings_env(filled)
    account = store.query_rows("SELECT account_id FROM dim_accounts ORDER BY account_id LIMIT 1")[0][0]
    good = tmp_path / "accounts.csv"
    good.write_text(f"account_id,region,arr\n{account},Mars,99.5\n")
    loaded = dealpulse("dims", "load", "accounts", str(good), env=env)
    assert loaded.returncode == 0 and "loaded 1 accounts" in loaded.stdout, loaded.stderr
    assert store.query_rows(f"SELECT region, arr, industry != '' FROM dim_accounts WHERE account_id = '{account}'") == [
        ("Mars", 99.5, True)  # the CSV's newer values win; attributes it leaves empty stay
    ]
    regions = {r["region"] for r in run_report(store, "funnel", by="region").records()}
    assert "Mars" in regions
    bad = tmp_path / "bad.csv"
    bad.write_text("account_id,contract_end\nacc-1,2026-13-45\n")
    failed = dealpulse("dims", "load", "accounts", str(bad), env=env)
    assert failed.returncode == 1 and f"{bad}:2:7: contract_end: '2026-13-45' is not a date" in failed.stderr


def chromium(html: Path, tmp_path: Path) -> tuple[str, str]:
    """Render a page headless; return its DOM and Chromium's log (console messages show as INFO:CONSOLE)."""
    binary = shutil.which("chromium")
    assert binary, "chromium is installed by `make tools` (Debian package chromium)"
    result = subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", html.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def test_the_console_check_catches_errors(tmp_path: Path) -> None:
    """The harness itself: a page with a script error must be caught, or the next test proves nothing."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('boom'); missing();</script></body></html>")
    _, log = chromium(page, tmp_path)
    assert "CONSOLE" in log and "missing is not defined" in log


def test_html_report_renders_offline_in_chromium(filled: Settings, store: Store, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    result = dealpulse("report", "funnel", "--html", str(page), env=settings_env(filled))
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    dom, log = chromium(page, tmp_path)
    assert "CONSOLE" not in log, log
    assert 'aria-label="funnel"' in dom and 'aria-label="dwell"' in dom
    funnel = run_report(store, "funnel").records()
    for row in funnel:
        assert f"{row['entered']} entered · {row['converted']} converted" in dom
    stalled = run_report(store, "stalls").records()
    assert f"Stalled opportunities ({len(stalled)})" in dom
    assert all(row["opportunity_id"] in dom for row in stalled)
    for row in run_report(store, "health").records():
        assert f'<td class="{row["status"]}">{row["status"]}</td>' in dom
