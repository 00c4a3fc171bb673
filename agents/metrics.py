"""Prometheus metrics of a worker, on a registry of its own (no module-level global state).

Names follow Prometheus conventions (``dealpulse_…_total`` counters, base units). Labels are bounded: event type,
DLQ reason, table, topic and partition; never an account, lead or event id.
"""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

from dealpulse import __version__

#: latency buckets from 5 ms to a day: event time includes the sources' own lateness
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400)
#: finer buckets where the scoring latency target (50 ms) lives
SCORE_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class IngestMetrics:
    """The ingest agent's metrics. ``registry`` lets tests and benches use a private one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        Gauge("dealpulse_build_info", "dealpulse version", ["version"], registry=r).labels(__version__).set(1)
        self.messages_consumed = Counter(
            "dealpulse_messages_consumed_total", "Kafka messages consumed", ["topic"], registry=r
        )
        self.events_consumed = Counter(
            "dealpulse_events_consumed_total", "items (events) in consumed messages", ["topic"], registry=r
        )
        self.events_validated = Counter(
            "dealpulse_events_validated_total", "events that passed contract validation", ["type"], registry=r
        )
        self.events_stored = Counter(
            "dealpulse_events_stored_total", "events written to the store", ["type"], registry=r
        )
        self.dlq = Counter("dealpulse_dlq_total", "items sent to the dead-letter queue", ["reason"], registry=r)
        self.duplicates = Counter(
            "dealpulse_duplicates_dropped_total", "events dropped because their event_id was stored", registry=r
        )
        self.redelivered = Counter(
            "dealpulse_messages_redelivered_total",
            "messages delivered twice within one batch (the consumer moved back); processed once",
            registry=r,
        )
        self.offsets_skipped = Counter(
            "dealpulse_source_offsets_skipped_total",
            "offsets of the events topic that never reached this worker between two it processed: messages lost on "
            "the way (a transactional producer's commit markers are checked and do not count)",
            ["topic", "partition"],
            registry=r,
        )
        self.replay_skipped = Counter(
            "dealpulse_replay_skipped_total", "items skipped after a restart because the store had them", registry=r
        )
        self.batch_items = Histogram(
            "dealpulse_sink_batch_items",
            "items per store batch",
            buckets=(1, 10, 100, 1000, 5000, 10000, 50000, 100000),
            registry=r,
        )
        self.insert_seconds = Histogram(
            "dealpulse_store_insert_seconds", "store insert latency", ["table"], buckets=STORE_BUCKETS, registry=r
        )
        self.insert_rows = Counter("dealpulse_store_insert_rows_total", "rows inserted", ["table"], registry=r)
        self.insert_errors = Counter(
            "dealpulse_store_insert_errors_total", "failed store inserts", ["table"], registry=r
        )
        self.insert_retries = Counter(
            "dealpulse_store_insert_retries_total", "store inserts retried after a failure", ["table"], registry=r
        )
        self.store_waited = Counter(
            "dealpulse_store_wait_seconds_total",
            "time processing stood still because DEALPULSE_GROUPS_IN_FLIGHT store groups were still being written: "
            "the store is what limits throughput",
            registry=r,
        )
        self.store_backoff = Gauge(
            "dealpulse_store_backing_off", "1 while the sink waits for a failing store", registry=r
        )
        self.event_to_stored = Histogram(
            "dealpulse_event_to_stored_seconds",
            "event time to stored (includes the sources' lateness)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kafka_to_stored = Histogram(
            "dealpulse_kafka_to_stored_seconds",
            "Kafka message timestamp to stored: the pipeline's own latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.last_stored = Gauge(
            "dealpulse_last_batch_stored_timestamp_seconds", "wall-clock time of the last stored batch", registry=r
        )
        self.last_stored.set_to_current_time()  # a fresh worker gets the full grace period of the "no events" alert
        self.consumer_lag = Gauge(
            "dealpulse_consumer_lag_messages", "messages behind the log end", ["topic", "partition"], registry=r
        )
        self.switch_interval = Gauge(
            "dealpulse_gil_switch_interval_seconds",
            "the event loop's GIL switch interval: longer while the worker is behind (throughput first)",
            registry=r,
        )
        self.behind_seconds = Counter(
            "dealpulse_behind_seconds_total",
            "time spent processing batches while behind (the messages waiting would take longer than "
            "DEALPULSE_BACKLOG_AFTER_S)",
            registry=r,
        )
        self.assigned_partitions = Gauge(
            "dealpulse_assigned_partitions", "events-topic partitions this worker owns (0 until it joined)", registry=r
        )

        # scoring
        self.scores = Counter(
            "dealpulse_scores_total", "scores emitted, by model and grade", ["model", "grade"], registry=r
        )
        self.examples = Counter(
            "dealpulse_training_examples_total",
            "labelled snapshots sent to the trainer, by model and label source",
            ["model", "source"],
            registry=r,
        )
        self.feedback_unmatched = Counter(
            "dealpulse_feedback_unmatched_total", "feedback events whose score snapshot was not found", registry=r
        )
        self.kafka_to_score = Histogram(
            "dealpulse_kafka_to_score_seconds",
            "Kafka message timestamp to its scores acknowledged by the broker",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        # where kafka_to_score goes, stage by stage (the same sampled messages): waiting to be processed, then
        # processing (its batch's), then the rest is the scores' trip to the broker and back
        self.kafka_to_batch = Histogram(
            "dealpulse_kafka_to_batch_seconds",
            "Kafka message timestamp to the start of processing its batch (fetch, hand-off and queueing)",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.kafka_to_fetched = Histogram(
            "dealpulse_kafka_to_fetched_seconds",
            "Kafka message timestamp to aiokafka's consumer handing its fetch over to Faust (the newest record of "
            "each partition in each fetch); kafka_to_batch adds Faust's buffering and queueing",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.batch_process = Histogram(
            "dealpulse_batch_process_seconds",
            "validating, deduplicating, scoring and publishing one batch (the event loop is busy meanwhile)",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.states_commit = Histogram(
            "dealpulse_states_commit_seconds",
            "writing a stored group's entity states to the tables until their changelog records are in Kafka",
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.model_version = Gauge(
            "dealpulse_model_snapshot_version", "version of the snapshot this worker scores with", ["model"],
            registry=r,
        )  # fmt: skip
        self.model_snapshot_age = Gauge(
            "dealpulse_model_snapshot_age_seconds", "age of the snapshot this worker scores with", ["model"],
            registry=r,
        )  # fmt: skip
        self.states_written = Counter(
            "dealpulse_state_writes_total", "entity states written to the Faust tables", registry=r
        )

    def serve(self, port: int) -> int:
        """Expose /metrics on all interfaces; returns the bound port (``port=0`` picks a free one)."""
        server, _thread = start_http_server(port, addr="0.0.0.0", registry=self.registry)
        return int(server.server_address[1])


def serve_until_signalled(name: str, port: int, registry: CollectorRegistry) -> threading.Event:
    """Expose ``registry`` on ``port`` (all interfaces) and return an event that SIGTERM or SIGINT sets: the start
    of every long-running dealpulse process that is not a Faust worker (``dealpulse alerter``, ``trainer``).
    Call it from the main thread, where Python delivers signals."""
    server, _thread = start_http_server(port, addr="0.0.0.0", registry=registry)
    logging.getLogger(__name__).warning("%s metrics on http://127.0.0.1:%d/metrics", name, server.server_address[1])
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop
