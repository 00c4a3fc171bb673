"""Prometheus metrics of a worker, on a registry of its own (no module-level global state).

Labels are bounded: event type, DLQ reason, table, topic/partition; never an account or lead id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        self.messages_consumed = Counter(
            "dealpulse_messages_consumed_total", "Kafka messages consumed", ["topic"], registry=r
        )
        self.events_validated = Counter(
            "dealpulse_events_validated_total", "events that passed contract validation", ["type"], registry=r
        )
        self.events_stored = Counter("dealpulse_events_stored_total", "events written to the store", registry=r)
        self.dlq = Counter("dealpulse_dlq_total", "items sent to the dead-letter queue", ["reason"], registry=r)
        self.duplicates = Counter(
            "dealpulse_duplicates_dropped_total",
            "events dropped because their event_id was stored",
            registry=r,
        )
        self.replay_skipped = Counter(
            "dealpulse_replay_skipped_total",
            "items skipped after a restart because the store had them",
            registry=r,
        )
        self.batch_items = Histogram(
            "dealpulse_sink_batch_items", "items per store batch",
            buckets=(1, 10, 100, 1000, 5000, 10000, 50000, 100000), registry=r,
        )  # fmt: skip
        self.insert_seconds = Histogram("dealpulse_store_insert_seconds", "store insert latency", ["table"], registry=r)
        self.insert_rows = Counter("dealpulse_store_insert_rows_total", "rows inserted", ["table"], registry=r)
        self.insert_errors = Counter(
            "dealpulse_store_insert_errors_total",
            "failed store inserts (each is retried)",
            ["table"],
            registry=r,
        )
        self.event_to_stored = Histogram(
            "dealpulse_event_to_stored_seconds", "event time to stored (includes source lateness)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.consumer_lag = Gauge(
            "dealpulse_consumer_lag_messages",
            "messages behind the log end",
            ["topic", "partition"],
            registry=r,
        )

        self.assigned_partitions = Gauge(
            "dealpulse_assigned_partitions", "partitions this worker owns (0 until it joined its group)", registry=r
        )

    def serve(self, port: int) -> int:
        """Expose /metrics; returns the bound port (``port=0`` picks a free one)."""
        server, _thread = start_http_server(port, addr="0.0.0.0", registry=self.registry)
        return int(server.server_address[1])
