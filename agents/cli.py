"""The ``dealpulse`` command line."""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson

from dealpulse.pipelines.analytics import DIMENSIONS, REPORTS
from dealpulse.pipelines.ingest import DEDUP_WINDOW_IDS
from dealpulse.pipelines.settings import Settings


class ExplainedGroup(click.Group):
    """A store that cannot be reached is a one-line error that says where and what to do, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from dealpulse.pipelines.store.client import quiet_client_retry_logs

        quiet_client_retry_logs()  # the client's own warning per failed attempt would come before ours
        try:
            return super().invoke(ctx)
        except Exception as exc:
            from clickhouse_connect.driver.exceptions import OperationalError

            from dealpulse.pipelines.store.writer import root_cause, unreachable

            if not (isinstance(exc, OperationalError) and unreachable(exc)):
                raise
            try:
                settings = Settings()
                where = f" at {settings.clickhouse_host}:{settings.clickhouse_port}"
            except Exception:  # settings that do not load say so themselves, elsewhere
                where = ""
            raise click.ClickException(
                f"cannot reach the store{where} ({root_cause(exc)}). Is it running? Set DEALPULSE_CLICKHOUSE_HOST "
                "and DEALPULSE_CLICKHOUSE_PORT, or start the embedded stack with `dealpulse demo --keep-running`."
            ) from exc


@click.group(cls=ExplainedGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dealpulse")
def main() -> None:
    """dealpulse: real-time sales-behaviour analytics (Kafka -> Faust -> River -> ClickHouse).

    Start with `dealpulse demo`: it runs the whole pipeline on an embedded broker and store.
    Settings come from DEALPULSE_* environment variables (see README).
    """


@main.command()
def schema() -> None:
    """Print the JSON Schema of event contract v1 (one Kafka message value)."""
    from dealpulse.pipelines.contract import json_schema

    click.echo(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode())


@main.group()
def store() -> None:
    """The embedded store (chDB behind ClickHouse's HTTP interface)."""


@store.command("serve")
@click.option("--path", type=click.Path(path_type=Path), required=True, help="chDB data directory")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8123, show_default=True, help="0 picks a free port")
@click.option("--ready-file", type=click.Path(path_type=Path), help="write the bound port here when ready")
def store_serve(path: Path, host: str, port: int, ready_file: Path | None) -> None:
    """Serve a chDB data directory over ClickHouse's HTTP interface.

    Users come from DEALPULSE_STORE_WRITER[_PASSWORD] and DEALPULSE_STORE_READER[_PASSWORD]; both passwords
    are required.
    """
    from dealpulse.agents.storeserver import StoreUsers, serve

    users = StoreUsers(
        os.environ.get("DEALPULSE_STORE_WRITER", "dealpulse"),
        os.environ.get("DEALPULSE_STORE_WRITER_PASSWORD", ""),
        os.environ.get("DEALPULSE_STORE_READER", "bi_reader"),
        os.environ.get("DEALPULSE_STORE_READER_PASSWORD", ""),
    )
    if not users.writer_password or not users.reader_password:
        raise click.UsageError("set DEALPULSE_STORE_WRITER_PASSWORD and DEALPULSE_STORE_READER_PASSWORD")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s store %(levelname)s %(message)s")
    serve(path, host, port, users, ready_file)


@main.command()
def migrate() -> None:
    """Apply the store's migrations (idempotent)."""
    from dealpulse.pipelines.analytics import prepare_store
    from dealpulse.pipelines.store.client import connect

    settings = Settings()
    store_ = connect(settings)
    applied = prepare_store(store_, settings)
    for migration in applied:
        click.echo(f"applied {migration.version:04d}_{migration.name}")
    if not applied:
        click.echo("store is up to date")


@main.command()
def worker() -> None:
    """Run a worker against the Kafka and ClickHouse given by DEALPULSE_* settings (the production path).

    Scale out by starting more workers with the same DEALPULSE_CONSUMER_GROUP (up to the partition count).
    """
    from faust.worker import Worker

    from dealpulse.agents.app import create_app
    from dealpulse.agents.gc_tuning import tune_for_worker as tune_gc_for_worker
    from dealpulse.agents.kafka_admin import ensure_topics
    from dealpulse.agents.log_repeats import collapse_repeated_logs
    from dealpulse.agents.metrics import IngestMetrics
    from dealpulse.pipelines.store.client import preload_insert_path, quiet_client_retry_logs
    from dealpulse.pipelines.store.migrations import applied_versions, load_migrations
    from dealpulse.pipelines.store.writer import connect_when_ready

    settings = Settings()
    quiet_client_retry_logs()
    preload_insert_path()  # before the GC freeze, so what it imports is frozen too
    store_ = connect_when_ready(settings)  # a worker started before its store waits for it
    missing = {m.version for m in load_migrations()} - (
        applied_versions(store_, settings.clickhouse_database)
        if store_.client.command(f"EXISTS TABLE {settings.clickhouse_database}.schema_migrations") == 1
        else set()
    )
    store_.close()
    if missing:
        raise click.ClickException(f"the store lacks migrations {sorted(missing)}: run `dealpulse migrate` first")
    ensure_topics(settings)
    metrics = IngestMetrics()
    port = metrics.serve(settings.metrics_port)
    click.echo(f"metrics on http://127.0.0.1:{port}/metrics", err=True)
    app = create_app(settings, metrics)
    collapse_repeated_logs(["aiokafka"])  # with Kafka down it logs ~80 lines/s, all alike
    process = Worker(app, loglevel=settings.log_level, quiet=True)
    # Faust's spinner sets the root logger to DEBUG (to spin on every record): every debug call on the hot path
    # would then build a log record for nothing (~3 % of a worker's CPU, measured)
    process.spinner = None
    tune_gc_for_worker()  # see gc_tuning: rare full collections (they were the scoring latency tail)
    # the live interval; the ingest agent lengthens it while the worker is behind (see agents/switching.py)
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    metrics.switch_interval.set(settings.gil_switch_interval_ms / 1000)
    process.execute_from_commandline()


@main.command()
def trainer() -> None:
    """Run the single trainer: learn from the training topic in order, publish model snapshots.

    Run exactly one. It resumes from the newest snapshot on the models topic; its metrics are on
    DEALPULSE_TRAINER_METRICS_PORT.
    """
    from dealpulse.agents.kafka_admin import ensure_topics
    from dealpulse.agents.trainer import serve_trainer

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper().replace("WARN", "WARNING"),
                        format="%(asctime)s trainer %(levelname)s %(message)s")  # fmt: skip
    ensure_topics(settings)
    serve_trainer(settings)


@main.command()
@click.option(
    "--events",
    "events_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a JSONL file of v1 events with outcome events (default: the generator's world)",
)
@click.option(
    "--features",
    "features_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="a features file (default: the shipped one)",
)
@click.option(
    "--world-events",
    type=click.IntRange(1000),
    default=100_000,
    show_default=True,
    help="size of the generated world when no --events file is given",
)
@click.option("--seed", type=int, default=7, show_default=True, help="chooses the generated world")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="keep broker/store/logs here")
@click.option("--timeout", type=float, default=1800, show_default=True, help="seconds to wait for the pipeline")
def evaluate(events_file: Path | None, features_file: Path | None, world_events: int, seed: int, as_json: bool,
             workdir: Path | None, timeout: float) -> None:  # fmt: skip
    """Run events through the real pipeline with the trainer and report how well the models rank outcomes.

    intent_auc / churn_auc are the trainer's progressive ROC AUC (each example predicted before it is learned);
    baseline_*_auc the same for a naive recency/frequency score; grade_accuracy the share of labelled leads whose
    last grade before the outcome was A/B for won and C/D for lost. See README "Models".
    """
    from dealpulse.agents.embedded import temporary_workdir
    from dealpulse.agents.evaluate import evaluate as run_evaluation
    from dealpulse.pipelines.features import load_features

    if features_file is not None:
        load_features(features_file)  # a bad file fails here with file:line:column, before anything starts
    truth: dict[str, Any] | None = None
    if events_file is not None:
        from dealpulse.pipelines.replay import jsonl_messages

        with events_file.open("rb") as handle:
            messages = list(jsonl_messages(handle, 100))
    else:
        from dealpulse.pipelines.generator import generate_world, pack_messages

        world = generate_world(seed, world_events)
        messages = list(pack_messages(world.records(), 100))
        truth = orjson.loads(world.truth.to_json())
    say = (lambda _stage: None) if as_json else (lambda stage: click.echo(f"... {stage}", err=True))
    with temporary_workdir(workdir) as wd:
        result = run_evaluation(wd, messages, truth, features_file, timeout, say)
    if as_json:
        click.echo(orjson.dumps(result).decode())
        return
    for key, value in result.items():
        if not key.endswith("_curve"):
            click.echo(f"{key:32} {value}")


@main.group()
def features() -> None:
    """The features file: what the intent and churn models see."""


@features.command("check")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def features_check(path: Path) -> None:
    """Check a features file; exits non-zero with file:line:column on the first error."""
    from dealpulse.pipelines.config_errors import ConfigError
    from dealpulse.pipelines.features import FeatureSpec

    try:
        spec = FeatureSpec.from_file(path)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error
    for name, model in spec.models.items():
        click.echo(
            f"{name}: {model.entity}, {len(spec.of(model.entity))} features: {', '.join(spec.names(model.entity))}"
        )


def _world_messages(events: int, seed: int, batch_size: int) -> list[tuple[str, bytes, int]]:
    from dealpulse.pipelines.generator import generate_world, pack_messages

    return list(pack_messages(generate_world(seed, events).records(), batch_size))


class _Progress:
    """A progress bar on stderr fed with absolute positions (``advance(done_so_far)``)."""

    def __init__(self, total: int, label: str) -> None:
        self._bar = click.progressbar(length=total, label=label, show_pos=True, file=sys.stderr)
        self._done = 0

    def __enter__(self) -> _Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(None, None, None)

    def advance(self, position: int) -> None:
        if position > self._done:
            self._bar.update(position - self._done)
            self._done = position


@main.command()
@click.option("--events", "n_events", type=click.IntRange(1), default=20_000, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True, help="chooses the simulated world")
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True, help="events per message")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a summary")
@click.option("--keep-running", is_flag=True, help="leave broker, store and worker up until Ctrl-C")
@click.option("--workdir", type=click.Path(path_type=Path), help="keep logs and data here (default: temporary)")
@click.option("--timeout", type=float, default=600, show_default=True, help="seconds to wait for the pipeline")
def demo(n_events: int, seed: int, batch_size: int, as_json: bool, keep_running: bool, workdir: Path | None,
         timeout: float) -> None:  # fmt: skip
    """Run the whole pipeline on an embedded broker (Tansu) and store (chDB): generate, ingest, account.

    Prints a summary where every event sent is stored, dead-lettered or dropped as a duplicate.
    """
    import time

    from dealpulse.agents.embedded import temporary_workdir
    from dealpulse.agents.stack import EmbeddedStack, produce

    quiet = as_json
    say = (lambda *_: None) if quiet else (lambda text: click.echo(text, err=True))
    with temporary_workdir(workdir) as wd, EmbeddedStack(wd) as stack:
        settings = stack.settings
        say(f"broker  {settings.kafka_bootstrap} (Tansu, in memory)")
        say(f"store   http://127.0.0.1:{settings.clickhouse_port} (chDB {wd / 'store'})")
        worker_proc = stack.start_worker()
        say(f"worker  pid {worker_proc.pid}, metrics http://127.0.0.1:{worker_proc.metrics_port}/metrics")
        trainer_proc = stack.start_trainer()
        say(f"trainer pid {trainer_proc.pid}, metrics http://127.0.0.1:{trainer_proc.metrics_port}/metrics")
        messages = _world_messages(n_events, seed, batch_size)
        stack.wait_worker_ready(worker_proc)
        started = time.monotonic()
        if quiet:
            _, sent = produce(settings, messages)
            counts = stack.wait_accounted(sent, timeout)
        else:
            with _Progress(n_events, "sending  ") as bar:
                _, sent = produce(settings, messages, bar.advance)
                bar.advance(sent)
            with _Progress(sent, "ingesting") as bar:
                counts = stack.wait_accounted(sent, timeout, bar.advance)
        seconds = time.monotonic() - started
        summary = {"events_sent": sent, **counts, "seconds": round(seconds, 3),
                   "events_per_s": round(sent / seconds, 1), "seed": seed}  # fmt: skip
        summary["accounted"] = counts["events_stored"] + counts["dlq"] + counts["duplicates_dropped"] == sent
        if as_json:
            click.echo(orjson.dumps(summary).decode())
        else:
            _print_demo_summary(stack, summary)
        if keep_running:
            _print_connection_help(stack)
            try:
                while all(p.alive() for p in stack.processes + stack.workers + stack.trainers):
                    time.sleep(1)
            except KeyboardInterrupt:
                say("stopping ...")
        if not summary["accounted"]:
            raise click.ClickException("accounting identity violated: see the worker log in --workdir")


def _print_demo_summary(stack: object, summary: dict[str, Any]) -> None:
    from dealpulse.agents.stack import EmbeddedStack

    assert isinstance(stack, EmbeddedStack)
    by_type = stack.store.query_rows("SELECT type, count() FROM events GROUP BY type ORDER BY count() DESC")
    by_reason = stack.store.query_rows("SELECT reason, count() FROM dlq GROUP BY reason ORDER BY count() DESC")
    click.echo("")
    click.echo(f"  sent       {summary['events_sent']:>9,}  events in {summary['seconds']} s "
               f"({summary['events_per_s']:,} events/s end to end)")  # fmt: skip
    click.echo(f"  stored     {summary['events_stored']:>9,}")
    click.echo(f"  DLQ        {summary['dlq']:>9,}  " + ", ".join(f"{r}={n}" for r, n in by_reason))
    click.echo(f"  duplicates {summary['duplicates_dropped']:>9,}  (dropped by event_id)")
    verdict = "every event accounted for" if summary["accounted"] else "MISMATCH"
    click.echo(f"  identity   stored + DLQ + duplicates = sent: {verdict}")
    click.echo("  by type    " + ", ".join(f"{t}={n}" for t, n in by_type))


def _print_connection_help(stack: object) -> None:
    from dealpulse.agents.stack import EmbeddedStack

    assert isinstance(stack, EmbeddedStack)
    s, c = stack.settings, stack.credentials
    metrics = ", ".join(f"http://127.0.0.1:{w.metrics_port}/metrics" for w in stack.workers)
    click.echo(f"""
The pipeline keeps running. Connect with:
  Kafka       bootstrap.servers={s.kafka_bootstrap}   produce JSON events to {s.events_topic} (key = account_id)
  ClickHouse  http://127.0.0.1:{s.clickhouse_port}  database {s.clickhouse_database}
              writer:     user {c.writer}  password {c.writer_password}
              BI (read):  user {c.reader}  password {c.reader_password}
  e.g.        curl -u {c.reader}:{c.reader_password} 'http://127.0.0.1:{s.clickhouse_port}/?database={s.clickhouse_database}' \\
                   --data-binary 'SELECT type, count() FROM events GROUP BY type'
              DEALPULSE_KAFKA_BOOTSTRAP={s.kafka_bootstrap} dealpulse replay my-events.jsonl
  Metrics     {metrics}
The embedded broker keeps every record in memory, and each fetch gets slower as they accumulate (at 300
messages/s a consumer's p99 rose from 8 to 105 ms within a minute): restart the demo now and then, or use Kafka.
Press Ctrl-C to stop everything.""")


@main.command()
@click.option("--events", "n_events", type=click.IntRange(1), default=20_000, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="write JSONL here instead of sending to Kafka")
@click.option("--truth", type=click.Path(path_type=Path), help="write the hidden ground truth (JSON) here")
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True, help="events per message")
def generate(n_events: int, seed: int, out: Path | None, truth: Path | None, batch_size: int) -> None:
    """Generate a synthetic sales world: to a JSONL file (--out) or to the events topic."""
    from dealpulse.agents.stack import produce
    from dealpulse.pipelines.generator import generate_world, pack_messages

    world = generate_world(seed, n_events)
    if truth:
        truth.write_bytes(world.truth.to_json())
    if out:
        with out.open("wb") as handle:
            for record in world.records():
                handle.write(record.value + b"\n")
        click.echo(f"wrote {n_events} records to {out}", err=True)
        return
    settings = Settings()
    from dealpulse.agents.kafka_admin import ensure_topics

    ensure_topics(settings)
    with _Progress(n_events, "sending") as bar:
        messages, items = produce(settings, pack_messages(world.records(), batch_size), bar.advance)
        bar.advance(items)
    click.echo(f"sent {items} events in {messages} messages to {settings.events_topic}", err=True)


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True, help="events per message")
def replay(path: Path, batch_size: int) -> None:
    """Send a JSONL file of v1 events (e.g. a real export) into the pipeline, keyed by account_id.

    Lines that are not valid JSON are sent as they are: the pipeline dead-letters them, nothing is dropped.
    """
    from dealpulse.agents.kafka_admin import ensure_topics
    from dealpulse.agents.stack import produce
    from dealpulse.pipelines.replay import jsonl_messages

    settings = Settings()
    ensure_topics(settings)
    lines = sum(1 for line in path.open("rb") if line.strip())
    with _Progress(lines, "replaying") as bar, path.open("rb") as handle:
        messages, items = produce(settings, jsonl_messages(handle, batch_size), bar.advance)
        bar.advance(items)
    click.echo(f"sent {items} events in {messages} messages to {settings.events_topic}", err=True)


@main.group()
def dlq() -> None:
    """Dead-letter queue: inspect and re-submit."""


@dlq.command("replay")
@click.option("--reason", help="only entries with this reason (e.g. schema_violation)")
@click.option("--limit", type=click.IntRange(1), default=1_000_000, show_default=True)
@click.option("--dry-run", is_flag=True, help="report what would be re-submitted, send nothing")
@click.option("--json", "as_json", is_flag=True)
def dlq_replay(reason: str | None, limit: int, dry_run: bool, as_json: bool) -> None:
    """Re-submit dead letters that pass validation now (after a fix to the data, the contract or the settings).

    Entries whose events are already stored are marked and skipped; entries that still fail stay in the DLQ.
    """
    from dealpulse.agents.dlq import replay_dead_letters
    from dealpulse.pipelines.store.client import connect

    settings = Settings()
    report = replay_dead_letters(settings, connect(settings), reason, limit, dry_run)
    if as_json:
        click.echo(orjson.dumps(report.as_dict()).decode())
    else:
        click.echo(f"re-submitted {report.resubmitted}, already stored {report.already_stored}, "
                   f"still invalid {report.still_invalid} {report.reasons_left or ''}".rstrip())  # fmt: skip


def _parse_moment(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a date or time (e.g. 2026-09-01 or 2026-09-01T12:00:00+02:00)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@main.command()
@click.argument("name", type=click.Choice(["funnel", "dwell", "stalls", "health"]))
@click.option("--by", type=click.Choice(list(DIMENSIONS)), help="break down by a dimension (funnel, dwell)")
@click.option("--since", help="only stage entries at or after this date/time (UTC unless an offset is given)")
@click.option("--until", help="look from this moment: later events are ignored, entries before it count")
@click.option("--window-days", type=click.IntRange(1), help="funnel conversion window [default: settings, 30]")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="also write one self-contained HTML page with every report and its charts")  # fmt: skip
def report(name: str, by: str | None, since: str | None, until: str | None, window_days: int | None, fmt: str,
           html_path: Path | None) -> None:  # fmt: skip
    """Funnel, stage dwell, stalled opportunities or sales health, from the store's BI views.

    \b
    Examples:
      dealpulse report funnel --by region
      dealpulse report health --since 2026-07-01 --until 2026-10-01 --format json
      dealpulse report stalls --html sales.html
    """
    from dealpulse.pipelines.analytics import run_report
    from dealpulse.pipelines.report_render import render_csv, render_html, render_json, render_table
    from dealpulse.pipelines.store.client import connect

    settings = Settings()
    options: dict[str, Any] = {"since": _parse_moment(since), "until": _parse_moment(until),
                               "window_days": window_days or settings.funnel_window_days}  # fmt: skip
    if by and name in ("stalls", "health"):
        raise click.UsageError(f"--by works with funnel and dwell; the {name} report has no breakdown")
    try:
        store_ = connect(settings)
    except Exception as error:
        raise click.ClickException(f"cannot reach the store at {settings.clickhouse_host}:{settings.clickhouse_port}: "
                                   f"{error}") from error  # fmt: skip
    result = run_report(store_, name, by=by, **options)
    render = {"table": render_table, "json": render_json, "csv": render_csv}[fmt]
    click.echo(render(result))
    if html_path:
        reports = {r: result if r == name else run_report(store_, r, **options) for r in REPORTS}
        span = f"{since or 'the beginning'} to {until or 'the newest event'}"
        subtitle = f"database {settings.clickhouse_database} · {span} · funnel window {options['window_days']} days"
        html_path.write_text(render_html(reports, "dealpulse sales report", subtitle), encoding="utf-8")
        click.echo(f"wrote {html_path}", err=True)
    store_.close()


@main.group()
def dims() -> None:
    """Dimension tables (accounts, opportunities) for breakdowns."""


@dims.command("load")
@click.argument("kind", type=click.Choice(["accounts", "opportunities"]))
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def dims_load(kind: str, path: Path) -> None:
    """Load a CSV with a header (account_id or opportunity_id first) into the dimension tables.

    Empty cells leave the attribute as it was; the newest non-empty value of each attribute wins.
    """
    from dealpulse.pipelines.config_errors import ConfigError
    from dealpulse.pipelines.dims import TABLES, dimension_rows, parse_dimension_csv
    from dealpulse.pipelines.store.client import connect

    try:
        parsed = parse_dimension_csv(path.read_text(encoding="utf-8"), kind, str(path))
    except ConfigError as error:
        raise click.ClickException(str(error)) from error
    rows, columns = dimension_rows(parsed, kind, datetime.now(UTC))
    store_ = connect(Settings())
    store_.insert(TABLES[kind], rows, columns)
    store_.close()
    click.echo(f"loaded {len(rows)} {kind} from {path}")


@main.group()
def bench() -> None:
    """Benchmarks on the embedded stack (figures, not pass/fail)."""


# At its limit a worker's store groups grow to STORE_FLUSH_EVENTS (50k) while the writer is busy, and up to three are
# unstored at once: 150k, which must stay within 10 % of a run for its measuring window to end before the drain.
BENCH_EVENTS_HELP = "events to generate; short runs end their measuring window in the final store drain"


def _warn_if_not_steady(result: dict[str, Any]) -> None:
    from dealpulse.agents.bench import STEADY_STATE_MAX_UNSTORED_SHARE

    if not result.get("steady_state", True):
        click.echo(
            f"warning: up to {result['unstored_share']:.0%} of this run was processed but not yet stored (more than"
            f" {STEADY_STATE_MAX_UNSTORED_SHARE:.0%}): its events/s include the final store drain and read high;"
            f" use --events {_events_needed(result):,} or more",
            err=True,
        )


def _events_needed(result: dict[str, Any]) -> int:
    """Events for a run whose in-flight share stays within the steady-state bound (from this run's share)."""
    from dealpulse.agents.bench import STEADY_STATE_MAX_UNSTORED_SHARE

    return int(result["events"] * result["unstored_share"] / STEADY_STATE_MAX_UNSTORED_SHARE) + 1


def _print_bench(result: dict[str, Any], as_json: bool) -> None:
    """One JSON object, or one figure per line."""
    if as_json:
        click.echo(orjson.dumps(result).decode())
        return
    width = max(map(len, result), default=0)
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            click.echo(f"{key:>{width}}")  # a table: one row per item
            for item in value:
                click.echo(" " * (width + 2) + "  ".join(f"{k} {v}" for k, v in item.items()))
            continue
        click.echo(f"{key:>{width}}  {value}")


def _say_step(text: str) -> None:
    click.echo(f"… {text}", err=True)


@bench.command("ingest")
@click.option("--events", "n_events", type=click.IntRange(1), default=2_000_000, show_default=True,
              help=BENCH_EVENTS_HELP)  # fmt: skip
@click.option("--seed", type=int, default=11, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True, help="events per message")
@click.option("--metrics/--no-metrics", default=True, show_default=True, help="update Prometheus metrics per batch")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_ingest_cmd(n_events: int, seed: int, batch_size: int, metrics: bool, as_json: bool) -> None:
    """Validate + dedup + store throughput of one worker, and the raw consume+decode limit in the same run."""
    from dealpulse.agents.bench import bench_ingest
    from dealpulse.agents.embedded import temporary_workdir

    with temporary_workdir() as wd:
        result = bench_ingest(wd, n_events, seed, batch_size, metrics)
    _warn_if_not_steady(result)
    _print_bench(result, as_json)


@bench.command("score")
@click.option("--events", "n_events", type=click.IntRange(1), default=2_000_000, show_default=True,
              help=BENCH_EVENTS_HELP)  # fmt: skip
@click.option("--seed", type=int, default=11, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True, help="events per message")
@click.option("--latency-at", "latency_at", type=click.FloatRange(min=1), metavar="EVENTS_PER_S",
              help="only the latency part, at this rate offered (to compare settings). Its traffic is sampled from "
                   "a world of --events if given (as the full bench does), else of only the 20 s it sends (quicker)")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_context
def bench_score_cmd(
    ctx: click.Context, n_events: int, seed: int, batch_size: int, latency_at: float | None, as_json: bool
) -> None:
    """Full-path throughput (ingest + state + both models + store) and the framework-free limit, same run
    (the limit measured before and after the worker's run; the ratio uses their mean). The limit is also measured
    during the worker's run, in short bursts in a process of their own (`_during`): on a shared machine the
    cores' speed drifts within minutes.

    Then the Kafka append -> scores acknowledged latency (p50/p99) at half the measured rate, in steady state:
    20 s of traffic without a pause; what the worker observes before the first 5 s of it are accounted for is
    warm-up and not counted. The worker takes its settings from DEALPULSE_* variables, as a real one does.

    The broker's and store's data live in a temporary directory under $TMPDIR. The output names its filesystem
    and what creating one file there costs (`workdir_file_create_us`): the store writes ~13 files per part, and
    where that is slow (~600 µs on an unjournaled ext4 seen here, ~7 on tmpfs) its kernel time
    (`store_system_cores`) is taken from the worker's cores. TMPDIR=/dev/shm takes the disk out of the figures.
    """
    from dealpulse.agents.bench import TooShortToMeasure, bench_latency, bench_score
    from dealpulse.agents.embedded import temporary_workdir
    from dealpulse.pipelines.generator import generate_world, pack_messages

    with temporary_workdir() as wd:
        try:
            if latency_at is not None:
                world = None
                if ctx.get_parameter_source("n_events") is not click.core.ParameterSource.DEFAULT:
                    world = list(pack_messages(generate_world(seed, n_events).records(), batch_size))
                result = {"bench": "score-latency", **bench_latency(wd, latency_at, seed, batch_size, world)}
            else:
                result = bench_score(wd, n_events, seed, batch_size)
        except TooShortToMeasure as exc:
            raise click.ClickException(f"{exc}; use --events {_events_needed(exc.result):,} or more") from exc
    _warn_if_not_steady(result)
    _print_bench(result, as_json)


@bench.command("alerts")
@click.option("--events", "n_events", type=click.IntRange(1), default=100_000, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option(
    "--live/--no-live",
    default=True,
    show_default=True,
    help="also run the alerter + notifier on the embedded stack: rate and p99 latencies",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="events per message (live; per-account packing reorders event time, which alerting sees as lateness)",
)
def bench_alerts_cmd(n_events: int, seed: int, as_json: bool, live: bool, batch_size: int) -> None:
    """Rule engine rate, alert volume with and without grouping, stall precision against the world's truth;
    live: alerter throughput and p50/p99 event -> alert published and event -> webhook delivered at half of it."""
    from dealpulse.agents.bench import bench_alerts, bench_alerts_live
    from dealpulse.agents.embedded import temporary_workdir

    result = bench_alerts(n_events, seed)
    if live:
        with temporary_workdir() as wd:
            result.update(bench_alerts_live(wd, n_events, seed, batch_size))
    _print_bench(result, as_json)


@bench.command("scale")
@click.option("--events", "n_events", type=click.IntRange(1), default=1_000_000, show_default=True,
              help=BENCH_EVENTS_HELP)  # fmt: skip
@click.option("--seed", type=int, default=11, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True, help="events per message")
@click.option("--partitions", type=click.IntRange(2), default=4, show_default=True)
@click.option("--rebalance-events", type=click.IntRange(1000), default=90_000, show_default=True)
@click.option("--rebalance-rate", type=float, default=3_000, show_default=True, help="events/s offered meanwhile")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_scale_cmd(n_events: int, seed: int, batch_size: int, partitions: int, rebalance_events: int,
                    rebalance_rate: float, as_json: bool) -> None:  # fmt: skip
    """1 vs 2 workers on the same stream; join/leave rebalance times with nothing lost or doubled."""
    from dealpulse.agents.bench import bench_scale
    from dealpulse.agents.embedded import temporary_workdir

    with temporary_workdir() as wd:
        result = bench_scale(wd, n_events, seed, batch_size, partitions, rebalance_events, rebalance_rate,
                             on_step=_say_step)  # fmt: skip
    _warn_if_not_steady(result)
    _print_bench(result, as_json)


@bench.command("query")
@click.option("--events", "n_events", type=click.IntRange(1), default=10_000_000, show_default=True)
@click.option("--seed", type=int, default=11, show_default=True)
@click.option("--chunk", "chunk_events", type=click.IntRange(1000), default=500_000, show_default=True,
              help="events generated and ingested; the rest are copies with fresh ids")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_query_cmd(n_events: int, seed: int, chunk_events: int, as_json: bool) -> None:
    """Load N generated events into the embedded store, then time each BI view / report query."""
    from dealpulse.agents.bench import bench_query
    from dealpulse.agents.embedded import temporary_workdir

    with temporary_workdir() as wd:
        result = bench_query(wd, n_events, seed, chunk_events, on_step=_say_step)
    _print_bench(result, as_json)


@bench.command("dedup")
@click.option("--events", "n_events", type=click.IntRange(1), default=200_000, show_default=True)
@click.option("--seed", type=int, default=11, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True, help="events per message")
@click.option("--window", "cap", type=click.IntRange(1), default=DEDUP_WINDOW_IDS, show_default=True,
              help="event ids a partition's dedup window holds (a worker's cap)")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_dedup_cmd(n_events: int, seed: int, batch_size: int, cap: int, as_json: bool) -> None:
    """Ingest's per-event cost (decode, validate, dedup) with a full dedup window against one below its cap.

    A worker evicts the oldest id for every new one once a partition's window is full, after millions of events
    on that partition: no end-to-end bench gets there. An eviction that is not O(1) shows here as an
    `at_cap_ratio` or `at_cap_growth` (last fifth over first) well above 1; `within_bounds` checks both.
    Runs of a few thousand events are too short to judge by: their fifths take milliseconds.
    """
    from dealpulse.agents.bench_dedup import bench_dedup

    result = bench_dedup(n_events, seed, batch_size, cap, on_step=_say_step)
    _print_bench(result, as_json)


@bench.command("broker")
@click.option("--rate", "events_per_s", type=click.FloatRange(min=1), default=14_000, show_default=True,
              metavar="EVENTS_PER_S", help="events offered per second (`bench score --latency-at` takes the same)")  # fmt: skip
@click.option("--seconds", type=click.FloatRange(min=1), default=60, show_default=True, help="of traffic")
@click.option("--seed", type=int, default=11, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True, help="events per message")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_broker_cmd(events_per_s: float, seconds: float, seed: int, batch_size: int, as_json: bool) -> None:
    """The embedded broker alone: Kafka append -> a plain consumer has the record, with no worker, and the
    broker's CPU, per 10 s window.

    The same message mix and pacing as `bench score --latency-at`, and a consumer that fetches as a worker does
    (`DEALPULSE_KAFKA_FETCH_WAIT_MS`): the floor under the worker's `p99_kafka_to_score_ms`. The windows show
    how the embedded broker slows down as records accumulate (it lists a partition's stored batches at every
    fetch); a real Kafka broker does not.
    """
    from dealpulse.agents.bench_broker import bench_broker
    from dealpulse.agents.embedded import temporary_workdir

    with temporary_workdir() as wd:
        result = bench_broker(wd, events_per_s, seconds, seed, batch_size, on_step=_say_step)
    _print_bench(result, as_json)


# --- alerts ---------------------------------------------------------------------------------------------------


def _setup_logging(settings: Settings, name: str) -> None:
    logging.basicConfig(level=settings.log_level.upper().replace("WARN", "WARNING"),
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")  # fmt: skip


@main.command()
def alerter() -> None:
    """Run the alerter: rules and stage-stall timers over events, scores and signals -> the alerts topic.

    Scale like workers (same DEALPULSE_ALERTER_GROUP, up to the partition count). Rules: the newest version on the
    rules topic; with DEALPULSE_RULES_PATH the alerter also watches that file or directory and publishes changes.
    """
    from dealpulse.agents.alerter import serve_alerter
    from dealpulse.agents.kafka_admin import ensure_topics
    from dealpulse.pipelines.store.client import preload_insert_path

    settings = Settings()
    _setup_logging(settings, "alerter")
    ensure_topics(settings)
    preload_insert_path()
    serve_alerter(settings)


@main.command()
def notifier() -> None:
    """Run the notifier: alerts -> webhook subscribers (DEALPULSE_SUBSCRIBERS_FILE), grouped, signed, retried.

    Also serves POST /feedback (a subscriber's accepted/rejected verdict on an alert) and /metrics.
    """
    from dealpulse.agents.kafka_admin import ensure_topics
    from dealpulse.agents.notifier import serve_notifier
    from dealpulse.pipelines.config_errors import ConfigError
    from dealpulse.pipelines.store.client import preload_insert_path

    settings = Settings()
    _setup_logging(settings, "notifier")
    ensure_topics(settings)
    preload_insert_path()
    try:
        serve_notifier(settings)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error


@main.group()
def rules() -> None:
    """Alert rules: check a rules file or directory, publish it to every alerter."""


def _load_rules(path: Path) -> Any:
    from dealpulse.pipelines.config_errors import ConfigError
    from dealpulse.pipelines.rules import RuleSet

    try:
        return RuleSet.load(path)
    except ConfigError as error:
        raise click.ClickException(str(error)) from error


@rules.command("check")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def rules_check(path: Path) -> None:
    """Check a rules file or directory; exits non-zero with file:line:column on the first error."""
    ruleset = _load_rules(path)
    click.echo(f"{path}: {len(ruleset.rules)} rules, version {ruleset.version}")
    for rule in ruleset.rules:
        click.echo(f"  {rule.name:<28} {rule.entity:<12} {rule.severity:<9} -> {', '.join(rule.notify)}")


@rules.command("publish")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def rules_publish(path: Path) -> None:
    """Validate and publish rules to the rules topic: every running alerter switches to this version."""
    from dealpulse.agents.alerter import publish_rules
    from dealpulse.agents.kafka_admin import ensure_topics

    ruleset = _load_rules(path)
    settings = Settings()
    ensure_topics(settings)
    publish_rules(settings, ruleset)
    click.echo(f"published rules version {ruleset.version} ({len(ruleset.rules)} rules) to {settings.rules_topic}")


@main.group()
def alerts() -> None:
    """Alerts: follow them live, manage silences."""


@alerts.command("tail")
@click.option("--from-beginning", is_flag=True, help="start with the oldest alert on the topic")
@click.option("--rule", "rule_names", multiple=True, help="only these rules (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="one alert JSON per line")
@click.option("--limit", type=click.IntRange(1), help="stop after this many alerts")
@click.option("--timeout", type=float, help="stop after this many seconds without a new alert")
def alerts_tail(from_beginning: bool, rule_names: tuple[str, ...], as_json: bool, limit: int | None,
                timeout: float | None) -> None:  # fmt: skip
    """Follow the alerts topic live (Ctrl-C to stop)."""
    import time as _time
    import uuid

    from confluent_kafka import Consumer

    settings = Settings()
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"dealpulse-tail-{uuid.uuid4()}",
                         "enable.auto.commit": False,
                         "auto.offset.reset": "earliest" if from_beginning else "latest"})  # fmt: skip
    consumer.subscribe([settings.alerts_topic])
    shown, last = 0, _time.monotonic()
    colours = {"critical": "red", "warning": "yellow", "info": "cyan"}
    try:
        while limit is None or shown < limit:
            message = consumer.poll(0.5)
            if message is None or message.error():
                if timeout is not None and _time.monotonic() - last > timeout:
                    break
                continue
            alert = orjson.loads(message.value() or b"{}")
            if rule_names and alert.get("rule") not in rule_names:
                continue
            last = _time.monotonic()
            shown += 1
            if as_json:
                click.echo(orjson.dumps(alert).decode())
                continue
            status = alert["status"].upper()
            when = alert["ends_at"] if alert["status"] == "resolved" else alert["starts_at"]
            muted = " (silenced)" if alert.get("silenced_by") else ""
            head = click.style(f"{status:<8} {alert['severity']:<8}", fg=colours.get(alert["severity"]), bold=True)
            click.echo(f"{head} {when}  {alert['rule']}  {alert['entity']}:{alert['entity_id']}{muted}")
            click.echo(f"         {alert['message']}")
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


@alerts.group("silence")
def silence() -> None:
    """Silences mute matching alerts until they end (matchers: rule=x, team!=y, rule=~stage_.*)."""


@silence.command("add")
@click.argument("matchers", nargs=-1, required=True)
@click.option("--for", "duration", default="2h", show_default=True, help="how long: 30m, 2h, 3d")
@click.option("--until", "until", help="end time instead of --for (ISO 8601)")
@click.option("--comment", default="", help="why")
@click.option("--by", "created_by", default=lambda: os.environ.get("USER", ""), help="who")
def silence_add(matchers: tuple[str, ...], duration: str, until: str | None, comment: str, created_by: str) -> None:
    """Create a silence, e.g. `dealpulse alerts silence add rule=stage_stall team=team-3 --for 1d`."""
    import time as _time
    import uuid

    from dealpulse.pipelines.calendar import Duration
    from dealpulse.pipelines.delivery import Matcher
    from dealpulse.pipelines.store.client import connect

    try:
        parsed = [Matcher.parse(m) for m in matchers]
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="MATCHERS") from error
    now = datetime.now(UTC)
    if until:
        ends = _parse_moment(until)
    else:
        try:
            ends = datetime.fromtimestamp(_time.time() + Duration.parse(duration).ms / 1000, UTC)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--for") from error
    if ends is None or ends <= now:
        raise click.BadParameter("the silence must end in the future", param_hint="--until")
    silence_id = uuid.uuid4().hex[:12]
    store_ = connect(Settings())
    store_.insert("silences", [(silence_id, [str(m) for m in parsed], now, ends, created_by, comment, now)],
                  ("silence_id", "matchers", "starts_at", "ends_at", "created_by", "comment", "updated_at"))  # fmt: skip
    click.echo(f"silence {silence_id}: {' '.join(map(str, parsed))} until {ends.isoformat(timespec='seconds')}")


@silence.command("list")
@click.option("--all", "show_all", is_flag=True, help="include expired silences")
@click.option("--json", "as_json", is_flag=True)
def silence_list(show_all: bool, as_json: bool) -> None:
    """List active silences (with --all: expired ones too)."""
    from dealpulse.pipelines.store.client import connect

    rows = connect(Settings()).query_rows(
        "SELECT silence_id, matchers, starts_at, ends_at, created_by, comment, ends_at > now64(3) AS active "
        "FROM silences FINAL ORDER BY starts_at"
    )
    listed = [r for r in rows if show_all or r[6]]
    if as_json:
        keys = ("silence_id", "matchers", "starts_at", "ends_at", "created_by", "comment", "active")
        click.echo(orjson.dumps([dict(zip(keys, r, strict=True)) for r in listed], default=str).decode())
        return
    if not listed:
        click.echo("no active silences" if not show_all else "no silences")
    for silence_id, matchers, _starts, ends, created_by, comment, active in listed:
        state = "active " if active else "expired"
        click.echo(f"{silence_id}  {state}  until {ends:%Y-%m-%d %H:%M} UTC  {' '.join(matchers)}  "
                   f"by {created_by or '-'}  {comment}".rstrip())  # fmt: skip


@silence.command("expire")
@click.argument("silence_id")
def silence_expire(silence_id: str) -> None:
    """End a silence now."""
    from dealpulse.pipelines.store.client import connect

    store_ = connect(Settings())
    rows = store_.query_rows(
        "SELECT matchers, starts_at, created_by, comment FROM silences FINAL WHERE silence_id = {i:String}",
        {"i": silence_id},
    )
    if not rows:
        raise click.ClickException(f"no silence {silence_id!r} (see `dealpulse alerts silence list --all`)")
    matchers, starts, created_by, comment = rows[0]
    now = datetime.now(UTC)
    store_.insert("silences", [(silence_id, matchers, starts, now, created_by, comment, now)],
                  ("silence_id", "matchers", "starts_at", "ends_at", "created_by", "comment", "updated_at"))  # fmt: skip
    click.echo(f"silence {silence_id} expired")


if __name__ == "__main__":
    sys.exit(main())
