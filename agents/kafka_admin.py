"""Topic management with confluent-kafka's admin client."""

from __future__ import annotations

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from dealpulse.pipelines.settings import Settings


def ensure_topics(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create dealpulse's topics if missing; return the ones created."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(settings.events_topic, settings.topic_partitions, settings.topic_replication),
        NewTopic(settings.dlq_topic, settings.topic_partitions, settings.topic_replication),
        # scores share the events' partitioning: an account's scores are in order, next to its events
        NewTopic(settings.scores_topic, settings.topic_partitions, settings.topic_replication),
        # one partition: the single trainer learns in one order
        NewTopic(settings.training_topic, 1, settings.topic_replication),
        NewTopic(settings.models_topic, 1, settings.topic_replication, config={"cleanup.policy": "compact"}),
        NewTopic(settings.signals_topic, 1, settings.topic_replication),
        NewTopic(settings.rules_topic, 1, settings.topic_replication, config={"cleanup.policy": "compact"}),
        # alerts are keyed by fingerprint: one alert's firing and resolved stay in order
        NewTopic(settings.alerts_topic, settings.topic_partitions, settings.topic_replication),
        NewTopic(settings.alerts_dead_topic, 1, settings.topic_replication),
    ]
    missing = [t for t in wanted if t.topic not in existing]
    if not missing:
        return []
    created = []
    for name, future in admin.create_topics(missing, request_timeout=timeout).items():
        try:
            future.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return created
