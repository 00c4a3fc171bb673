"""The single trainer: learns from the one-partition training topic in order, publishes versioned snapshots.

Learning is single-writer (River models are sequential), scoring is parallel (every worker follows the compacted
models topic). A snapshot carries the trainer's whole state and the training offset it has learned up to, so a
restarted trainer resumes from the newest snapshot instead of starting over, and never learns an example twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from dealpulse.agents.metrics import serve_until_signalled
from dealpulse.models.online import ModelSnapshot, OnlineModel, dump_snapshot, load_snapshot
from dealpulse.pipelines.features import FeatureSpec, load_features
from dealpulse.pipelines.settings import Settings

log = logging.getLogger(__name__)


def read_to_end(settings: Settings, topic: str, start: int = OFFSET_BEGINNING,
                timeout: float = 30.0) -> Iterator[Message]:  # fmt: skip
    """Every message of partition 0 of ``topic`` from ``start`` until the partition goes quiet.

    The end is where a poll comes back empty after the reported high watermark was reached: some brokers
    (Tansu, measured) report a high watermark one short after a multi-record batch.
    """
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "dealpulse-reader", "enable.auto.commit": False}
    )
    try:
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout)
        if high <= 0:
            return
        consumer.assign([TopicPartition(topic, 0, start)])
        deadline = time.monotonic() + timeout
        position = -1
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                if position >= high - 1:
                    return
                continue
            if message.error():
                continue
            position = message.offset() or 0
            yield message
    finally:
        consumer.close()


def newest_snapshots(settings: Settings, timeout: float = 30.0) -> dict[str, ModelSnapshot]:
    """Read the models topic to its end; the newest snapshot of each model."""
    newest: dict[str, ModelSnapshot] = {}
    for message in read_to_end(settings, settings.models_topic, timeout=timeout):
        try:
            snapshot = load_snapshot(message.value() or b"")
        except Exception:
            log.exception("ignoring an unreadable snapshot at offset %d", message.offset())
            continue
        if snapshot.name not in newest or snapshot.version > newest[snapshot.name].version:
            newest[snapshot.name] = snapshot
    return newest


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.examples = Counter("dealpulse_trainer_examples_total", "examples learned", ["model"], registry=r)
        self.auc = Gauge("dealpulse_model_progressive_auc", "predict-then-learn ROC AUC", ["model"], registry=r)
        self.baseline_auc = Gauge(
            "dealpulse_model_baseline_auc", "ROC AUC of the naive recency/frequency baseline", ["model"], registry=r
        )
        self.log_loss = Gauge("dealpulse_model_progressive_log_loss", "predict-then-learn log loss", ["model"],
                              registry=r)  # fmt: skip
        self.version = Gauge(
            "dealpulse_model_snapshot_version", "newest published snapshot version", ["model"], registry=r
        )
        self.published = Gauge(
            "dealpulse_model_snapshot_published_timestamp_seconds", "when the newest snapshot was published",
            ["model"], registry=r,
        )  # fmt: skip
        self.drifts = Counter("dealpulse_model_drift_total", "drift detections", ["model"], registry=r)
        self.lag = Gauge("dealpulse_trainer_lag_messages", "training messages not learned yet", registry=r)


@dataclass
class Trainer:
    """Owns one :class:`OnlineModel` per model of the features file."""

    settings: Settings
    spec: FeatureSpec
    metrics: TrainerMetrics = field(default_factory=TrainerMetrics)
    models: dict[str, OnlineModel] = field(init=False)
    offsets: dict[str, int] = field(init=False)  # last training offset each model has learned
    versions: dict[str, int] = field(init=False)
    resumed_from: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.models = {
            name: OnlineModel(name, self.spec.names(model.entity)) for name, model in self.spec.models.items()
        }
        self.offsets = dict.fromkeys(self.models, -1)
        self.versions = dict.fromkeys(self.models, 0)
        self.resumed_from = {}

    def resume(self, snapshots: dict[str, ModelSnapshot]) -> None:
        """Continue from the newest snapshots (their models, metrics, drift detectors and offsets)."""
        for name, snapshot in snapshots.items():
            if name not in self.models or not snapshot.checkpoint:
                continue
            if snapshot.feature_names != self.models[name].feature_names:
                log.warning("model %s: the features changed since snapshot v%d; starting a new model",
                            name, snapshot.version)  # fmt: skip
                self.versions[name] = snapshot.version
                continue
            self.models[name] = OnlineModel.resume(snapshot.checkpoint)
            self.offsets[name] = snapshot.training_offset
            self.versions[name] = snapshot.version
            self.resumed_from[name] = snapshot.version
            log.info("model %s: resumed from snapshot v%d (%d examples, training offset %d)",
                     name, snapshot.version, snapshot.learned, snapshot.training_offset)  # fmt: skip

    def learn_message(self, offset: int, value: bytes) -> list[dict[str, object]]:
        """Learn the examples of one training message; returns the drift signals it raised."""
        signals: list[dict[str, object]] = []
        try:
            examples = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.error("skipping an undecodable training message at offset %d", offset)
            return signals
        for example in examples if isinstance(examples, list) else [examples]:
            name = example.get("model")
            model = self.models.get(name)
            if model is None or offset <= self.offsets[name]:
                continue  # learned before the snapshot we resumed from
            drifted = model.learn(example["vector"], int(example["label"]), example["served"], example["baseline"])
            self.metrics.examples.labels(name).inc()
            if drifted:
                self.metrics.drifts.labels(name).inc()
                signals.append(
                    {"signal": "model_drift", "model": name, "version": self.versions[name],
                     "examples": model.learned, "at_ms": int(time.time() * 1000),
                     "recent_log_loss": round(model.detector.estimation, 4)}
                )  # fmt: skip
        for name in self.models:
            self.offsets[name] = max(self.offsets[name], offset)
        return signals

    def snapshots(self) -> list[ModelSnapshot]:
        """New versions of every model that learned something since its last snapshot."""
        out = []
        now_ms = int(time.time() * 1000)
        for name, model in self.models.items():
            self.versions[name] += 1
            snapshot = model.snapshot(self.versions[name], self.offsets[name], now_ms)
            out.append(snapshot)
            summary = snapshot.metrics
            if summary["auc"] is not None:
                self.metrics.auc.labels(name).set(summary["auc"])
            if summary["baseline_auc"] is not None:
                self.metrics.baseline_auc.labels(name).set(summary["baseline_auc"])
            if summary["log_loss"] is not None:
                self.metrics.log_loss.labels(name).set(summary["log_loss"])
            self.metrics.version.labels(name).set(snapshot.version)
            self.metrics.published.labels(name).set(now_ms / 1000)
        return out


def run_trainer(settings: Settings, stop: threading.Event, metrics: TrainerMetrics | None = None) -> Trainer:
    """Resume from the newest snapshots, then learn and publish until ``stop`` is set."""
    trainer = Trainer(settings, load_features(settings.features_file), metrics or TrainerMetrics())
    trainer.resume(newest_snapshots(settings))
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True,
                         "message.max.bytes": 16 * 1024 * 1024})  # fmt: skip
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.consumer_group}-trainer",
         "enable.auto.commit": False, "fetch.max.bytes": 16 * 1024 * 1024}
    )  # fmt: skip
    start = min(trainer.offsets.values()) + 1
    consumer.assign([TopicPartition(settings.training_topic, 0, start if start > 0 else OFFSET_BEGINNING)])
    unpublished_since: float | None = None
    pending = 0
    try:
        while not stop.is_set():
            for message in consumer.consume(200, 0.5):
                if message.error():
                    continue
                for signal in trainer.learn_message(message.offset() or 0, message.value() or b""):
                    producer.produce(settings.signals_topic, key=str(signal["model"]).encode(),
                                     value=orjson.dumps(signal))  # fmt: skip
                    log.warning("model drift: %s", signal)
                pending += 1
                unpublished_since = unpublished_since or time.monotonic()
            due = unpublished_since is not None and (
                pending >= settings.snapshot_every_examples
                or time.monotonic() - unpublished_since >= settings.snapshot_interval_s
            )
            if due:
                for snapshot in trainer.snapshots():
                    producer.produce(settings.models_topic, key=snapshot.name.encode(), value=dump_snapshot(snapshot))
                producer.flush(30)
                pending, unpublished_since = 0, None
            try:
                _low, high = consumer.get_watermark_offsets(TopicPartition(settings.training_topic, 0), 5)
            except KafkaException as exc:  # the broker is unreachable: the clients reconnect by themselves
                log.warning("training lag unknown: %s", exc)
                continue
            trainer.metrics.lag.set(max(0, high - 1 - min(trainer.offsets.values())))
    finally:
        producer.flush(30)
        consumer.close()
    return trainer


def serve_trainer(settings: Settings) -> None:
    """`dealpulse trainer`: metrics on their port, train until SIGTERM/SIGINT."""
    metrics = TrainerMetrics()
    stop = serve_until_signalled("trainer", settings.trainer_metrics_port, metrics.registry)
    run_trainer(settings, stop, metrics)
