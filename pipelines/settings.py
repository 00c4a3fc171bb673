"""The one settings object of dealpulse, read from ``DEALPULSE_*`` environment variables.

>>> s = Settings(kafka_bootstrap="127.0.0.1:9092")
>>> s.events_topic, s.clickhouse_database
('dealpulse.events', 'dealpulse')
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STAGES = (
    "lead",
    "outreach",
    "diagnosis",
    "presentation",
    "objection",
    "negotiation",
    "contract_review",
    "won",
    "lost",
)

DEFAULT_STALL_DAYS = {
    "lead": 5.0,
    "outreach": 7.0,
    "diagnosis": 10.0,
    "presentation": 10.0,
    "objection": 10.0,
    "negotiation": 14.0,
    "contract_review": 7.0,
}


class Settings(BaseSettings):
    """Everything a worker, the CLI and the tests need; frozen so it can be passed around safely."""

    model_config = SettingsConfigDict(env_prefix="DEALPULSE_", frozen=True, extra="ignore")

    # Kafka
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="bootstrap servers, host:port[,host:port]")
    events_topic: str = "dealpulse.events"
    dlq_topic: str = "dealpulse.events.dlq"
    topic_partitions: int = Field(4, ge=1)
    topic_replication: int = Field(1, ge=1)
    consumer_group: str = Field("dealpulse", description="Faust app id = Kafka consumer group")
    kafka_session_timeout_s: float = Field(10.0, ge=1, description="group session and rebalance timeout")
    output_linger_ms: float = Field(
        1.0, ge=0, le=1000, description="how long the worker's output producer gathers records into one request"
    )
    kafka_fetch_wait_ms: int = Field(
        5,
        ge=0,
        le=5000,
        description="longest a fetch waits for data (latency; Tansu always waits this long; an idle worker polls "
        "at this pace: ~12 % of a core at 5 ms, ~6 % at 20 ms, measured)",
    )

    kafka_consumer_thread: bool = Field(
        False,
        description="run the worker's Kafka consumer (aiokafka) in a thread of its own, as Faust does by default, "
        "instead of on the worker's event loop (fewer GIL hand-offs on every record's way: see README, Performance)",
    )

    # ClickHouse (a server, or the embedded chDB store behind the same HTTP interface)
    clickhouse_host: str = "127.0.0.1"
    clickhouse_port: int = 8123
    clickhouse_user: str = "dealpulse"
    clickhouse_password: str = ""
    clickhouse_database: str = "dealpulse"
    clickhouse_secure: bool = False

    # ingest
    max_message_bytes: int = Field(1_000_000, ge=1024, description="larger messages go to the DLQ as too_large")
    max_events_per_message: int = Field(10_000, ge=1)
    min_event_time: str = Field("2000-01-01T00:00:00+00:00", description="older events are out of range")
    max_future_skew_s: float = Field(86_400.0, ge=0, description="events further ahead of wall-clock are rejected")
    dedup_window_hours: float = Field(
        168.0, gt=0, description="event_ids stored this recently are reloaded as dedup state on restart"
    )
    keywords_file: Path | None = Field(None, description="YAML keyword dictionary; built-in default if unset")
    stages: tuple[str, ...] = DEFAULT_STAGES

    # analytics (written to the store's stage_config / health_targets tables by `dealpulse migrate`)
    won_stage: str = "won"
    lost_stage: str = "lost"
    stage_stall_days: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_STALL_DAYS),
        description="days in a stage after which a visit is blocking / an open deal is stalled (JSON object)",
    )
    stage_required_activity: str = Field("activity_note", description="event type a stage visit needs")
    funnel_window_days: int = Field(30, ge=1, description="conversion window of the funnel")
    mql_stage: str = "outreach"
    sql_stage: str = "diagnosis"
    nurtured_stage: str = Field("presentation", description="lead nurturing counts leads reaching this stage")

    # scoring: features, models and their topics
    scoring_enabled: bool = Field(True, description="false runs ingest only")
    features_file: Path | None = Field(None, description="YAML features file; built-in default if unset")
    scores_topic: str = "dealpulse.scores"
    training_topic: str = Field("dealpulse.training", description="labelled snapshots, one partition")
    models_topic: str = Field("dealpulse.models", description="versioned model snapshots, compacted")
    signals_topic: str = Field("dealpulse.signals", description="operational signals such as model_drift")
    grade_thresholds: tuple[float, float, float] = Field(
        (0.75, 0.5, 0.25), description="lower score bounds of grades A, B and C (below: D)"
    )
    snapshots_per_entity: int = Field(3, ge=1, le=20, description="feature snapshots kept for labelling")
    label_guard_s: float = Field(0.0, ge=0, description="snapshots this close before an outcome stay unlabelled")
    state_ttl_days: float = Field(120.0, gt=0, description="entity state idle this long (event time) expires")
    changelog_end_markers: bool = Field(
        False, description="end table writes with a marker in its own batch (brokers with a wrong high watermark)"
    )
    state_store: str = Field("rocksdb://", description="Faust table store: rocksdb:// or memory://")

    # trainer
    snapshot_every_examples: int = Field(500, ge=1, description="publish a model snapshot after this many ...")
    snapshot_interval_s: float = Field(5.0, gt=0, description="... or this long after the first unpublished one")
    trainer_metrics_port: int = Field(9465, ge=0, description="the trainer's /metrics port; 0 picks a free one")

    # alerts: rules, the alerter (rules + stall timers) and the notifier (webhooks)
    rules_path: Path | None = Field(None, description="rules file or directory; the alerter publishes changes")
    rules_topic: str = Field("dealpulse.rules", description="published rule versions, compacted")
    alerts_topic: str = Field("dealpulse.alerts", description="alert state changes: the subscribers' contract")
    alerts_dead_topic: str = Field("dealpulse.alerts.dead", description="notifications no retry could deliver")
    alerter_group: str = "dealpulse-alerter"
    alert_allowed_lateness_s: float = Field(60.0, ge=0, description="event-time lateness before timers fire")
    alert_idle_advance_s: float = Field(
        30.0, ge=0, description="a partition idle this long advances its watermark with wall-clock; 0: never"
    )
    alerter_checkpoint_s: float = Field(2.0, gt=0, description="how often rule state and alerts are stored")
    alerter_metrics_port: int = Field(9466, ge=0)
    subscribers_file: Path | None = Field(None, description="webhook subscribers (YAML); none: topic only")
    notifier_group: str = "dealpulse-notifier"
    notifier_port: int = Field(9467, ge=0, description="the notifier's /metrics and POST /feedback port")
    notifier_public_url: str = Field("", description="base URL subscribers post feedback to")

    # sink
    batch_max_messages: int = Field(500, ge=1, description="process (score) after this many Kafka messages ...")
    # Faust's take waits this long after every batch unless the batch is full, so it adds to every event's latency;
    # 2 ms read p50 / p99 Kafka -> score 15 / 53 ms against 18 / 63 ms at 5 ms (means of six interleaved runs at 17k
    # events/s), throughput unchanged; an idle worker wakes more often (7 % of a core against 5.6 %). 1 ms read no
    # better (p99 64 ms). Three later pairs: p50 14 against 18 ms again, p99 65 against 70 ms (noisy).
    batch_max_seconds: float = Field(
        0.002, gt=0, description="... or this long after the previous batch was processed, whichever first"
    )
    store_flush_events: int = Field(50_000, ge=1, description="write processed items to the store at this many ...")
    store_flush_seconds: float = Field(0.5, gt=0, description="... or this long after the first, whichever first")
    groups_in_flight: int = Field(
        2, ge=1, le=16, description="store writes waiting while processing goes on; past that processing waits"
    )
    store_retry_initial_s: float = Field(0.2, gt=0)
    store_retry_max_s: float = Field(10.0, gt=0)
    shutdown_grace_s: float = Field(
        20.0,
        ge=0,
        description="on SIGTERM, how long a worker lets processed batches reach the store; what has not by then is "
        "not acked (read again after a restart). Keep it under the orchestrator's kill timeout (Kubernetes: 30 s)",
    )

    # worker process
    data_dir: Path = Field(Path(".dealpulse/worker"), description="Faust data directory")
    metrics_port: int = Field(9464, ge=0, description="Prometheus /metrics port; 0 picks a free one")
    metrics_enabled: bool = Field(True, description="false skips per-batch metric updates (for benchmarks)")
    gil_switch_interval_ms: float = Field(
        5.0, gt=0, description="how long the worker's event loop keeps the GIL before a waiting thread gets it"
    )
    gil_switch_interval_backlog_ms: float = Field(
        50.0,
        gt=0,
        description="the same while the worker is behind (see backlog_after_s): longer stretches, more events/s; "
        "equal to gil_switch_interval_ms keeps one interval",
    )
    backlog_after_s: float = Field(
        0.5, gt=0, description="behind = the messages waiting in Kafka would take the worker longer than this"
    )
    log_level: str = "warn"
