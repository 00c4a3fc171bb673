"""The BI views and reports against an independent plain-Python computation of the same definitions."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from dealpulse.agents.loader import load_direct
from dealpulse.agents.stack import WorkerProcess, produce
from dealpulse.pipelines.analytics import health_targets, run_report, stage_config_rows
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store, connect
from tests.analytics_reference import Reference
from tests.conftest import wait_accounted

pytestmark = pytest.mark.integration
SEED, N_EVENTS = 21, 40_000


def valid_events(seed: int, n_events: int) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in generate_world(seed, n_events).records() if r.kind == "valid"]


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def close(a: Any, b: Any, decimals: int) -> bool:
    """Equal up to the rounding the view publishes (``round(x, decimals)``)."""
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), abs_tol=0.5 * 10**-decimals + 1e-9)


FUNNEL_DECIMALS = {"conversion_rate": 4, "decided_conversion_rate": 4, "median_days_to_convert": 3,
                   "p90_days_to_convert": 3}  # fmt: skip
DWELL_DECIMALS = {"avg_dwell_days": 3, "p50_dwell_days": 3, "p90_dwell_days": 3, "blocking_rate": 4}


def assert_matches(rows: list[dict[str, Any]], expected: dict[tuple[Any, ...], dict[str, Any]],
                   key: Callable[[dict[str, Any]], tuple[Any, ...]], decimals: dict[str, int]) -> None:  # fmt: skip
    got = {key(row): row for row in rows}
    assert set(got) == set(expected)
    for k, want in expected.items():
        for column, value in want.items():
            if column in decimals:
                assert close(got[k][column], value, decimals[column]), (k, column, got[k][column], value)
            else:
                assert got[k][column] == value, (k, column, got[k][column], value)


@pytest.fixture(scope="module")
def loaded(services: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Reference]:
    """One store loaded with a world (through the real ingest core), and the reference over the same events."""
    from tests.conftest import make_settings

    settings = make_settings(services, tmp_path_factory.mktemp("analytics"))
    store = connect(settings)
    load_direct(store, settings, pack_messages(generate_world(SEED, N_EVENTS).records(), 100))
    store.close()
    return settings, Reference(valid_events(SEED, N_EVENTS), stage_config_rows(settings))


def test_the_world_has_the_hard_cases(loaded: tuple[Settings, Reference]) -> None:
    """Skipped stages, revisited stages and open (undecided) opportunities are all present, so they are checked."""
    _, ref = loaded
    paths: dict[str, list[str]] = {}
    for opp, _, _, stage in ref.stage_events:
        paths.setdefault(opp, []).append(stage)
    order = list(ref.stages)
    assert any(len(p) != len(set(p)) for p in paths.values()), "no revisits"
    assert any(any(order.index(b) - order.index(a) > 1 for a, b in itertools.pairwise(p) if b not in ("won", "lost"))
               for p in paths.values()), "no skipped stages"  # fmt: skip
    assert any(step["open"] for step in ref.funnel_steps(None, 30)), "no open funnel steps"


@pytest.mark.parametrize("by", [None, "region", "product_line"])
def test_funnel_matches_the_independent_computation(loaded: tuple[Settings, Reference], by: str | None) -> None:
    settings, ref = loaded
    store = connect(settings)
    report = run_report(store, "funnel", by=by)
    expected = ref.funnel(by=by)
    assert_matches(report.records(), expected,
                   lambda r: ((r[by],) if by else ()) + (r["stage"], r["position"]), FUNNEL_DECIMALS)  # fmt: skip
    if by is None:  # the BI view and the CLI report are the same numbers
        columns, rows = store.query_table("SELECT * FROM funnel")
        assert [dict(zip(columns, row, strict=True)) for row in rows] == report.records()


def test_funnel_as_of_a_past_moment_with_a_window(loaded: tuple[Settings, Reference]) -> None:
    """Looking from 1 Sep with a 14-day window: later events are invisible, undecided steps are open."""
    settings, ref = loaded
    since, until = datetime(2026, 7, 1, tzinfo=UTC), datetime(2026, 9, 1, tzinfo=UTC)
    report = run_report(connect(settings), "funnel", since=since, until=until, window_days=14)
    expected = ref.funnel(as_of_ms=ms(until), window_days=14, since_ms=ms(since))
    assert any(row["still_open"] for row in expected.values())
    assert_matches(report.records(), expected, lambda r: (r["stage"], r["position"]), FUNNEL_DECIMALS)


@pytest.mark.parametrize("until", [None, datetime(2026, 8, 15, tzinfo=UTC)])
def test_dwell_and_stalls_match(loaded: tuple[Settings, Reference], until: datetime | None) -> None:
    settings, ref = loaded
    store = connect(settings)
    as_of = ms(until) if until else None
    dwell = run_report(store, "dwell", until=until)
    assert_matches(dwell.records(), ref.dwell(as_of), lambda r: (r["stage"], r["position"]), DWELL_DECIMALS)
    stalls = {r["opportunity_id"]: r for r in run_report(store, "stalls", until=until).records()}
    expected = ref.stalls(as_of)
    assert expected and set(stalls) == set(expected)
    for opp, want in expected.items():
        assert stalls[opp]["stage"] == want["stage"] and stalls[opp]["owner"] == want["owner"]
        for column in ("days_in_stage", "days_stalled", "days_since_activity"):
            assert close(stalls[opp][column], want[column], 3), (opp, column)
    if until is None:
        columns, rows = store.query_table("SELECT * FROM stage_dwell")
        assert [dict(zip(columns, row, strict=True)) for row in rows] == dwell.records()


@pytest.mark.parametrize(
    "since,until", [(None, None), (datetime(2026, 7, 1, tzinfo=UTC), datetime(2026, 9, 15, tzinfo=UTC))]
)
def test_sales_health_matches(
    loaded: tuple[Settings, Reference], since: datetime | None, until: datetime | None
) -> None:
    settings, ref = loaded
    targets = {t.metric: t for t in health_targets(settings)}
    report = {r["metric"]: r for r in run_report(connect(settings), "health", since=since, until=until).records()}
    expected = ref.health(ms(since) if since else 0, ms(until) if until else None,
                          {m: (t.from_stage, t.to_stage) for m, t in targets.items() if t.from_stage})  # fmt: skip
    assert set(report) == set(expected)
    for metric, (numerator, denominator) in expected.items():
        row = report[metric]
        assert row["denominator"] == denominator and close(row["numerator"], numerator, 6), (metric, row)
        value = numerator / denominator if denominator else None
        assert close(row["value"], value, 4), (metric, row, value)
        target = targets[metric]
        healthy = value is not None and (
            value >= target.target if target.direction == "min" else value <= target.target
        )
        assert row["status"] == ("no_data" if value is None else "ok" if healthy else "warn")
        assert row["target"] == target.target


def test_views_follow_new_events_incrementally(
    settings: Settings, store: Store, start_worker: Callable[..., WorkerProcess]
) -> None:
    """Through Kafka and a worker, in two halves sent newest-first within each: the views keep up as events arrive
    out of order, and end equal to the computation over everything."""
    records = [r for r in generate_world(SEED + 1, 12_000).records()]
    half = len(records) // 2
    start_worker(settings)
    _, first = produce(settings, pack_messages(reversed(records[:half]), 50))
    wait_accounted(store, first)
    first_events = [orjson.loads(r.value) for r in records[:half] if r.kind == "valid"]
    stage_config = stage_config_rows(settings)
    assert_matches(run_report(store, "funnel").records(), Reference(first_events, stage_config).funnel(),
                   lambda r: (r["stage"], r["position"]), FUNNEL_DECIMALS)  # fmt: skip
    _, second = produce(settings, pack_messages(reversed(records[half:]), 50))
    wait_accounted(store, first + second)
    all_events = [orjson.loads(r.value) for r in records if r.kind == "valid"]
    reference = Reference(all_events, stage_config)
    assert_matches(run_report(store, "funnel").records(), reference.funnel(),
                   lambda r: (r["stage"], r["position"]), FUNNEL_DECIMALS)  # fmt: skip
    assert_matches(run_report(store, "dwell").records(), reference.dwell(),
                   lambda r: (r["stage"], r["position"]), DWELL_DECIMALS)  # fmt: skip
    # the daily aggregate is maintained by its materialized view, not recomputed
    daily = store.query_rows("SELECT sum(events) FROM daily_account_activity")[0][0]
    assert daily == len(all_events)


def test_the_bi_user_reads_every_view_and_writes_nothing(
    loaded: tuple[Settings, Reference], services: dict[str, object]
) -> None:
    from dealpulse.agents.embedded import StoreCredentials

    settings, _ = loaded
    credentials = services["credentials"]
    assert isinstance(credentials, StoreCredentials)
    bi = connect(settings, user=credentials.reader, password=credentials.reader_password)
    for view in ("funnel", "funnel_steps", "stage_dwell", "stage_visits", "stalled_opportunities", "customer_health",
                 "sales_health", "dim_accounts", "dim_opportunities"):  # fmt: skip
        assert bi.query_rows(f"SELECT count() FROM {view}")[0][0] > 0, view
    assert (
        bi.query_rows("SELECT count() FROM funnel_steps_at(as_of = '2026-09-01 00:00:00', window_days = 7)")[0][0] > 0
    )
    with pytest.raises(Exception, match=r"(?i)readonly|not allowed|cannot"):
        bi.command("INSERT INTO stage_config VALUES ('x', 99, 'open', 1, '')")
