"""Funnel, stage-dwell, stall and sales-health reports over the store's BI views.

The numbers come from the views that migration 0004 creates (the same ones BI tools query); this module writes
their configuration (stage order, thresholds, health targets) from the settings and builds the report queries
for the CLI: a report is one of the views' fact tables grouped by an optional dimension.

>>> stage_config_rows(Settings(stages=("lead", "demo", "won", "lost"), stage_stall_days={"demo": 3}))
[('lead', 1, 'open', 7.0, 'activity_note'), ('demo', 2, 'open', 3.0, 'activity_note'), ('won', 3, 'won', 0.0, ''), ('lost', 0, 'lost', 0.0, '')]
>>> report_query("funnel", by="region")[0].splitlines()[0]
'SELECT region, stage, position, count() AS entered, countIf(is_converted) AS converted,'
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store
from dealpulse.pipelines.store.migrations import Migration, migrate_up

REPORTS = ("funnel", "dwell", "stalls", "health")
DIMENSIONS = ("region", "industry", "product_line", "owner", "team", "cohort_week", "cohort_month")
OPEN_END = datetime(2100, 1, 1)
OPEN_START = datetime(1970, 1, 1)
FALLBACK_STALL_DAYS = 7.0


@dataclass(frozen=True)
class HealthTarget:
    metric: str
    target: float
    direction: str  # min: healthy at or above target; max: at or below
    from_stage: str
    to_stage: str
    description: str


def health_targets(settings: Settings) -> list[HealthTarget]:
    """The sales-health metrics with their targets (the seeds' table)."""
    first = settings.stages[0]
    return [
        HealthTarget("customer_health", 0.8, "min", "", "",
                     "share of active accounts without two weeks running of falling usage or rising tickets"),
        HealthTarget("deal_cycle_days", 45.0, "max", "", "", "average days from first stage to won"),
        HealthTarget("lead_nurturing", 0.25, "min", first, settings.nurtured_stage,
                     f"new leads reaching {settings.nurtured_stage} or later"),
        HealthTarget("mql_to_sql", 0.35, "min", settings.mql_stage, settings.sql_stage,
                     f"opportunities entering {settings.mql_stage} that reach {settings.sql_stage} or later"),
        HealthTarget("opportunity_compliance", 0.8, "min", "", "",
                     f"completed stage visits with the required activity ({settings.stage_required_activity})"),
    ]  # fmt: skip


def stage_config_rows(settings: Settings) -> list[tuple[str, int, str, float, str]]:
    """(stage, position, kind, threshold_days, required_activity) for the stage_config table."""
    rows = []
    position = 0
    for stage in settings.stages:
        if stage == settings.lost_stage:
            rows.append((stage, 0, "lost", 0.0, ""))
            continue
        position += 1
        if stage == settings.won_stage:
            rows.append((stage, position, "won", 0.0, ""))
        else:
            threshold = settings.stage_stall_days.get(stage, FALLBACK_STALL_DAYS)
            rows.append((stage, position, "open", float(threshold), settings.stage_required_activity))
    return rows


def apply_analytics_config(store: Store, settings: Settings) -> None:
    """Write the stage order, thresholds and health targets the views read (idempotent)."""
    store.command("TRUNCATE TABLE stage_config")
    store.insert("stage_config", list(stage_config_rows(settings)),
                 ("stage", "position", "kind", "threshold_days", "required_activity"))  # fmt: skip
    store.command("TRUNCATE TABLE health_targets")
    store.insert(
        "health_targets",
        [(t.metric, t.target, t.direction, t.from_stage, t.to_stage, t.description) for t in health_targets(settings)],
        ("metric", "target", "direction", "from_stage", "to_stage", "description"),
    )


_FUNNEL_COLUMNS = """count() AS entered, countIf(is_converted) AS converted,
       countIf(is_dropped) AS dropped, countIf(is_open) AS still_open, round(converted / entered, 4) AS conversion_rate,
       round(if(converted + dropped = 0, NULL, converted / (converted + dropped)), 4) AS decided_conversion_rate,
       round(quantileExactInclusiveIf(0.5)(days_to_convert, is_converted), 3) AS median_days_to_convert,
       round(quantileExactInclusiveIf(0.9)(days_to_convert, is_converted), 3) AS p90_days_to_convert"""

_DWELL_COLUMNS = """count() AS visits, countIf(NOT is_current) AS completed,
       round(avgIf(dwell_days, NOT is_current), 3) AS avg_dwell_days,
       round(quantileExactInclusiveIf(0.5)(dwell_days, NOT is_current), 3) AS p50_dwell_days,
       round(quantileExactInclusiveIf(0.9)(dwell_days, NOT is_current), 3) AS p90_dwell_days,
       any(threshold_days) AS stall_threshold_days, round(countIf(over_threshold) / count(), 4) AS blocking_rate,
       countIf(is_current AND over_threshold) AS stalled_now"""


def report_query(
    report: str,
    by: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    window_days: int = 30,
) -> tuple[str, dict[str, Any]]:
    """The SQL (with parameters) behind ``dealpulse report REPORT``; ``by`` is one of :data:`DIMENSIONS`."""
    if report not in REPORTS:
        raise ValueError(f"unknown report {report!r}; choose one of {', '.join(REPORTS)}")
    if by is not None and by not in DIMENSIONS:
        raise ValueError(f"cannot break down by {by!r}; choose one of {', '.join(DIMENSIONS)}")
    if by is not None and report in ("stalls", "health"):
        raise ValueError(
            f"the {report} report has no breakdown (it lists {'opportunities' if report == 'stalls' else 'metrics'})"
        )
    params: dict[str, Any] = {"since": since or OPEN_START, "until": until or OPEN_END, "window_days": window_days}
    group = f"{by}, " if by else ""
    if report == "funnel":
        sql = f"""SELECT {group}stage, position, {_FUNNEL_COLUMNS}
FROM funnel_steps_at(as_of = {{until:DateTime64(3, 'UTC')}}, window_days = {{window_days:UInt32}})
WHERE entered_at >= {{since:DateTime64(3, 'UTC')}} AND entered_at < {{until:DateTime64(3, 'UTC')}}
GROUP BY {group}stage, position ORDER BY {group}position"""
    elif report == "dwell":
        sql = f"""SELECT {group}stage, position, {_DWELL_COLUMNS}
FROM stage_visits_at(as_of = {{until:DateTime64(3, 'UTC')}})
WHERE entered_at >= {{since:DateTime64(3, 'UTC')}} AND entered_at < {{until:DateTime64(3, 'UTC')}}
GROUP BY {group}stage, position ORDER BY {group}position"""
    elif report == "stalls":
        sql = """SELECT * FROM stalled_opportunities_at(as_of = {until:DateTime64(3, 'UTC')})
WHERE entered_at >= {since:DateTime64(3, 'UTC')}"""
    else:
        sql = """SELECT metric, value, target, direction, status, numerator, denominator, description
FROM sales_health_at(since = {since:DateTime64(3, 'UTC')}, until = {until:DateTime64(3, 'UTC')})"""
    return sql, params


@dataclass(frozen=True)
class Report:
    """A report's rows, ready to print or render."""

    name: str
    columns: list[str]
    rows: list[tuple[Any, ...]]
    by: str | None = None

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def run_report(store: Store, report: str, **options: Any) -> Report:
    """Run one report against the store."""
    sql, params = report_query(report, **options)
    columns, rows = store.query_table(sql, params)
    return Report(report, columns, rows, options.get("by"))


def prepare_store(store: Store, settings: Settings) -> list[Migration]:
    """Apply the migrations, then the analytics configuration from the settings; return the migrations applied."""
    applied = migrate_up(store, settings.clickhouse_database)
    apply_analytics_config(store, settings)
    return applied
