"""`dealpulse alerter`: rules and stage-stall timers over events, scores and signals, alerts to Kafka and the store.

One consumer group over ``dealpulse.events``, ``dealpulse.scores`` (same partition numbers as the events: the
range assignor gives one member partition *p* of both) and ``dealpulse.signals``. Per partition it keeps the rule
engine's state; every ``alerter_checkpoint_s`` it flushes the alerts it published, stores them (ClickHouse
``alerts``), stores the state with the offsets it covers (``alerter_checkpoints``) and commits. A restarted or
rebalanced alerter resumes from the checkpoint: alerts raised after it are raised again with the same
``alert_id`` (consumers deduplicate on ``alert_id`` + ``status``; the store's table replaces them).

Rules come from the compacted ``dealpulse.rules`` topic (newest version wins, on every alerter); with
``DEALPULSE_RULES_PATH`` the alerter watches that file or directory and publishes each valid change.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dealpulse.agents.app import contract_rules
from dealpulse.agents.metrics import serve_until_signalled
from dealpulse.pipelines.config_errors import ConfigError
from dealpulse.pipelines.contract import Event, validate_event
from dealpulse.pipelines.delivery import Matcher, Silence, silenced_by
from dealpulse.pipelines.ingest import decode_message
from dealpulse.pipelines.rules import PartitionState, RuleEngine, RuleSet
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store, connect
from dealpulse.pipelines.store.writer import connect_when_ready

log = logging.getLogger(__name__)

SOURCE_TS_HEADER = "dealpulse.source_ts_ms"
SIGNALS_SLOT = 10_000  # checkpoint slot of signals partition p: p + SIGNALS_SLOT (events use p)
ALERT_COLUMNS = (
    "alert_id", "fingerprint", "status", "rule", "rule_version", "severity", "entity", "entity_id", "account_id",
    "lead_id", "opportunity_id", "team", "region", "recipients", "message", "starts_at", "ts", "evidence",
    "silenced_by", "raised_at",
)  # fmt: skip


class AlerterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.alerts = Counter("dealpulse_alerts_total", "alert state changes published", ["rule", "status"],
                              registry=r)  # fmt: skip
        self.silenced = Counter("dealpulse_alerts_silenced_total", "alerts published muted by a silence", ["rule"],
                                registry=r)  # fmt: skip
        self.errors = Counter("dealpulse_alerter_errors_total", "inputs the rule engine failed on (logged, skipped)",
                              ["input"], registry=r)  # fmt: skip
        self.consumed = Counter("dealpulse_alerter_messages_total", "messages consumed", ["topic"], registry=r)
        self.skipped = Counter("dealpulse_alerter_items_skipped_total",
                               "invalid items ignored (the worker sends them to the DLQ)", registry=r)  # fmt: skip
        self.latency = Histogram(
            "dealpulse_alert_latency_seconds", "Kafka append of the triggering message to alert published",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )  # fmt: skip
        self.watermark = Gauge("dealpulse_alerter_watermark_seconds", "event-time watermark", ["partition"],
                               registry=r)  # fmt: skip
        self.assigned = Gauge("dealpulse_alerter_assigned_partitions", "partitions this alerter owns", registry=r)
        self.entities = Gauge("dealpulse_alerter_entities", "entities with rule state", registry=r)
        self.timers = Gauge("dealpulse_alerter_timers", "pending event-time timers", registry=r)
        self.checkpoint_seconds = Histogram("dealpulse_alerter_checkpoint_seconds", "checkpoint duration",
                                            registry=r)  # fmt: skip
        self.last_checkpoint = Gauge("dealpulse_alerter_last_checkpoint_timestamp_seconds",
                                     "wall-clock time of the last checkpoint", registry=r)  # fmt: skip
        self.rules_version = Gauge("dealpulse_rules_info", "rules version in use", ["version"], registry=r)
        self.rules_invalid = Gauge("dealpulse_rules_invalid", "1 while the watched rules file has errors",
                                   registry=r)  # fmt: skip


def publish_rules(settings: Settings, rules: RuleSet, producer: Producer | None = None) -> None:
    """Put a validated rule set on the rules topic; every alerter switches to it."""
    own = producer is None
    producer = producer or Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    value = orjson.dumps({"version": rules.version, "source": rules.source, "text": rules.text})
    producer.produce(settings.rules_topic, key=b"rules", value=value)
    if own:
        producer.flush(30)


def load_silences(store: Store) -> list[Silence]:
    rows = store.query_rows(
        "SELECT silence_id, matchers, toUnixTimestamp64Milli(starts_at), toUnixTimestamp64Milli(ends_at), "
        "created_by, comment FROM silences FINAL"
    )
    out = []
    for silence_id, matchers, starts, ends, created_by, comment in rows:
        try:
            parsed = tuple(Matcher.parse(m) for m in matchers)
        except ValueError:
            continue
        out.append(Silence(silence_id, parsed, int(starts), int(ends), created_by, comment))
    return out


@dataclass
class PartitionSlot:
    state: PartitionState
    offsets: dict[str, int] = field(default_factory=dict)  # topic -> next offset to read
    last_message: float = field(default_factory=time.monotonic)
    dirty: bool = False  # consumed something since the last checkpoint


class Alerter:
    """The consumer loop; ``run`` until ``stop`` is set."""

    def __init__(self, settings: Settings, metrics: AlerterMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or AlerterMetrics()
        self.store = connect_when_ready(settings)  # an alerter started before its store waits for it
        self.rules = RuleSet.load(None)
        self.engine = self._engine(self.rules)
        self.slots: dict[int, PartitionSlot] = {}
        self.pending_rows: list[tuple[Any, ...]] = []
        self.silences: list[Silence] = []
        self.contract = contract_rules(settings)
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True,
                                  "linger.ms": 2})  # fmt: skip
        self._watched: tuple[float, ...] | None = None
        self.published = 0
        self.assigned = 0  # partitions this alerter owns
        self._writes: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._lock = threading.Lock()
        self._committable: list[TopicPartition] = []

    def _engine(self, rules: RuleSet) -> RuleEngine:
        self.metrics.rules_version.clear()
        self.metrics.rules_version.labels(rules.version).set(1)
        return RuleEngine(rules, int(self.settings.alert_allowed_lateness_s * 1000),
                          int(self.settings.state_ttl_days * 86_400_000))  # fmt: skip

    # rules -----------------------------------------------------------------------------------------------------

    def watch_rules_file(self) -> None:
        """Publish the watched rules path when it changed and is valid; keep the old version when it is not."""
        path = self.settings.rules_path
        if path is None:
            return
        files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
        stamp = tuple(f.stat().st_mtime_ns for f in files if f.exists())
        if stamp == self._watched:
            return
        self._watched = stamp
        try:
            rules = RuleSet.load(path)
        except (ConfigError, OSError) as exc:
            self.metrics.rules_invalid.set(1)
            log.error("rules not reloaded, keeping version %s: %s", self.rules.version, exc)
            return
        self.metrics.rules_invalid.set(0)
        if rules.version != self.rules.version:
            publish_rules(self.settings, rules, self.producer)
            self.producer.flush(10)

    def offer_rules(self, raw: bytes) -> None:
        try:
            data = orjson.loads(raw)
            rules = RuleSet.parse(data["text"], data.get("source") or "rules topic")
        except (ConfigError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring an invalid rules version on %s: %s", self.settings.rules_topic, exc)
            return
        if rules.version != self.rules.version:
            log.warning("rules: now version %s (%d rules) from %s", rules.version, len(rules.rules), rules.source)
            self.rules = rules
            self.engine = self._engine(rules)

    # checkpoints -----------------------------------------------------------------------------------------------

    def restore(self, slot_ids: list[int]) -> dict[int, PartitionSlot]:
        if not slot_ids:
            return {}
        rows = self.store.query_rows(
            "SELECT partition, offsets, state FROM alerter_checkpoints FINAL "
            "WHERE consumer_group = {g:String} AND partition IN {p:Array(UInt16)}",
            {"g": self.settings.alerter_group, "p": slot_ids},
        )
        restored = {int(p): PartitionSlot(PartitionState.from_json(state.encode() if isinstance(state, str)
                                                                   else state), orjson.loads(offsets))
                    for p, offsets, state in rows}  # fmt: skip
        return {slot: restored.get(slot) or PartitionSlot(PartitionState()) for slot in slot_ids}

    def checkpoint(self, wait: bool = False) -> None:
        """Snapshot the changed partitions now; a writer thread stores them (alerts delivered to Kafka first, then
        stored, then state + offsets) and only then are the offsets committed: a crash replays, never loses.

        The loop keeps consuming meanwhile; at most two checkpoints wait (back-pressure). ``wait`` blocks until
        everything snapshotted so far is stored (partition revocation, shutdown)."""
        now = _now_dt()
        changed = {slot_id: slot for slot_id, slot in self.slots.items() if slot.dirty}
        state_rows = [(self.settings.alerter_group, slot_id, orjson.dumps(slot.offsets).decode(),
                       slot.state.to_json().decode(), self.rules.version, now)
                      for slot_id, slot in changed.items()]  # fmt: skip
        commits = [TopicPartition(topic, slot_id % SIGNALS_SLOT, offset)
                   for slot_id, slot in changed.items() for topic, offset in slot.offsets.items()]  # fmt: skip
        for slot in changed.values():
            slot.dirty = False
        rows, self.pending_rows = self.pending_rows, []
        if rows or state_rows:
            self._writes.put((rows, state_rows, commits))
        if wait:
            self._writes.join()
        self.metrics.entities.set(sum(len(s.state.entities) for s in self.slots.values()))
        self.metrics.timers.set(sum(len(s.state.timers) for s in self.slots.values()))

    def _write_checkpoints(self) -> None:
        store = connect(self.settings)  # its own connection: a client serves one query at a time
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                rows, state_rows, commits = item
                started = time.perf_counter()
                while self.producer.flush(30) > 0:
                    log.warning("alerts not yet delivered to Kafka after 30 s; still trying")
                if rows:
                    token = hashlib.sha256(orjson.dumps([r[:3] for r in rows])).hexdigest()
                    self._insert(store, "alerts", rows, ALERT_COLUMNS, token)
                if state_rows:
                    self._insert(store, "alerter_checkpoints", state_rows,
                                 ("consumer_group", "partition", "offsets", "state", "rule_version", "written_at"),
                                 None)  # fmt: skip
                with self._lock:
                    self._committable.extend(commits)
                self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
                self.metrics.last_checkpoint.set(time.time())
            finally:
                self._writes.task_done()

    def commit_stored(self, consumer: Consumer) -> None:
        """Commit the offsets whose checkpoints are stored (consumer calls stay on the loop's thread)."""
        with self._lock:
            commits, self._committable = self._committable, []
        if commits:
            consumer.commit(offsets=commits, asynchronous=True)

    def _insert(self, store: Store, table: str, rows: list[tuple[Any, ...]], columns: tuple[str, ...],
                token: str | None) -> None:  # fmt: skip
        delay = self.settings.store_retry_initial_s
        while True:
            try:
                store.insert(table, rows, columns, dedup_token=token)
                return
            except Exception as exc:  # the store is down: retry, never skip (the offsets wait too)
                log.warning("store insert into %s failed (%s); retrying in %.1fs", table, exc, delay)
                time.sleep(delay)
                delay = min(self.settings.store_retry_max_s, delay * 2)

    # processing ------------------------------------------------------------------------------------------------

    def handle(self, message: Message) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        s = self.settings
        if offset is None or partition is None:
            return
        slot = self.slots.get(partition + SIGNALS_SLOT if topic == s.signals_topic else partition)
        if slot is None:
            return
        if offset < slot.offsets.get(topic or "", 0):
            return  # already covered by the checkpoint
        slot.offsets[topic or ""] = offset + 1
        slot.last_message = time.monotonic()
        slot.dirty = True
        self.metrics.consumed.labels(topic).inc()
        raw = message.value() or b""
        alerts: list[dict[str, Any]] = []
        kind = "event" if topic == s.events_topic else "score" if topic == s.scores_topic else "signal"
        try:
            if kind == "event":
                items = decode_message(raw, s.max_message_bytes, s.max_events_per_message)
                if not isinstance(items, list):
                    self.metrics.skipped.inc()
                    return
                now_ms = int(time.time() * 1000)
                for item in items:
                    event = validate_event(item, self.contract, now_ms)
                    if isinstance(event, Event):
                        alerts.extend(self._safely(kind, self.engine.on_event, slot.state, event))
                    else:
                        self.metrics.skipped.inc()
            elif kind == "score":
                for score in orjson.loads(raw):
                    alerts.extend(self._safely(kind, self.engine.on_score, slot.state, score))
            else:
                _type, ts_ms = message.timestamp()
                alerts.extend(self._safely(kind, self.engine.on_signal, slot.state, orjson.loads(raw), int(ts_ms)))
        except orjson.JSONDecodeError:
            self.metrics.errors.labels(kind).inc()
            log.error("%s[%s]@%s: not JSON; skipped", topic, partition, offset)
        self.emit(alerts, message.timestamp()[1] / 1000)
        self.metrics.watermark.labels(f"{topic}[{partition}]").set(slot.state.watermark / 1000)

    def _follow_silences(self, stop: threading.Event) -> None:
        """Reload silences every second on a thread of its own: a store round trip never holds up alerts."""
        store = connect(self.settings)
        while not stop.wait(1.0):
            try:
                self.silences = load_silences(store)  # one assignment: the loop sees the old or the new list
            except Exception as exc:  # keep the last known silences while the store is away
                log.warning("could not reload silences: %s", exc)

    def _safely(self, kind: str, apply: Any, *args: Any) -> list[dict[str, Any]]:
        """One input through the engine; a failure is logged and counted, and the rest of the stream goes on."""
        try:
            result: list[dict[str, Any]] = apply(*args)
            return result
        except Exception:
            self.metrics.errors.labels(kind).inc()
            log.exception("rule evaluation failed on a %s; skipped it", kind)
            return []

    def advance_idle(self) -> None:
        """Live mode: a partition with nothing new for a while moves its watermark with wall-clock."""
        idle_s = self.settings.alert_idle_advance_s
        if not idle_s:
            return
        now = time.monotonic()
        wall_ms = int(time.time() * 1000) - int(self.settings.alert_allowed_lateness_s * 1000)
        for slot in self.slots.values():
            if now - slot.last_message >= idle_s and wall_ms > slot.state.watermark:
                slot.dirty = True
                self.emit(self.engine.advance(slot.state, wall_ms), None)

    def emit(self, alerts: list[dict[str, Any]], source_ts_s: float | None) -> None:
        if not alerts:
            return
        now_ms = int(time.time() * 1000)
        raised = _now_dt()
        for alert in alerts:
            muted = silenced_by(alert, self.silences, now_ms)
            if muted:
                alert["silenced_by"] = muted
                self.metrics.silenced.labels(alert["rule"]).inc()
            # the triggering message's Kafka time rides along as a header: the notifier measures event -> webhook
            headers: list[tuple[str, str | bytes | None]] | None = (
                [(SOURCE_TS_HEADER, str(int(source_ts_s * 1000)).encode())] if source_ts_s else None
            )
            self.producer.produce(self.settings.alerts_topic, key=alert["fingerprint"].encode(),
                                  value=orjson.dumps(alert), headers=headers)  # fmt: skip
            self.pending_rows.append(_alert_row(alert, raised))
            self.metrics.alerts.labels(alert["rule"], alert["status"]).inc()
            self.published += 1
        self.producer.poll(0)
        if source_ts_s:
            self.metrics.latency.observe(max(0.0, time.time() - source_ts_s))

    def run(self, stop: threading.Event) -> None:
        s = self.settings
        consumer = Consumer({
            "bootstrap.servers": s.kafka_bootstrap, "group.id": s.alerter_group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "partition.assignment.strategy": "range",
            "session.timeout.ms": int(s.kafka_session_timeout_s * 1000),
            "fetch.wait.max.ms": s.kafka_fetch_wait_ms,
        })  # fmt: skip
        rules_reader = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": f"{s.alerter_group}-rules",
                                 "enable.auto.commit": False})  # fmt: skip
        rules_reader.assign([TopicPartition(s.rules_topic, 0, OFFSET_BEGINNING)])

        def on_assign(c: Consumer, partitions: list[TopicPartition]) -> None:
            slot_ids = sorted({p.partition + (SIGNALS_SLOT if p.topic == s.signals_topic else 0) for p in partitions})
            self.slots.update(self.restore([i for i in slot_ids if i not in self.slots]))
            for p in partitions:
                slot = self.slots[p.partition + (SIGNALS_SLOT if p.topic == s.signals_topic else 0)]
                p.offset = slot.offsets.get(p.topic, OFFSET_BEGINNING)
            c.assign(partitions)
            self.assigned = len(partitions)
            self.metrics.assigned.set(self.assigned)
            log.info("alerter: assigned %s", [(p.topic, p.partition, p.offset) for p in partitions])

        def on_revoke(c: Consumer, partitions: list[TopicPartition]) -> None:
            self.checkpoint(wait=True)
            self.commit_stored(c)
            for p in partitions:
                self.slots.pop(p.partition + (SIGNALS_SLOT if p.topic == s.signals_topic else 0), None)
            self.assigned = 0
            self.metrics.assigned.set(0)

        self.silences = load_silences(self.store)
        self.watch_rules_file()
        for message in _drain(rules_reader, 3.0):
            self.offer_rules(message.value() or b"")
        consumer.subscribe([s.events_topic, s.scores_topic, s.signals_topic], on_assign=on_assign,
                           on_revoke=on_revoke)  # fmt: skip
        last_checkpoint = last_housekeeping = time.monotonic()
        writer = threading.Thread(target=self._write_checkpoints, name="alerter-checkpoints", daemon=True)
        writer.start()
        threading.Thread(target=self._follow_silences, args=(stop,), name="alerter-silences", daemon=True).start()
        try:
            while not stop.is_set():
                for message in take_messages(consumer, 500, 0.05):
                    if message.error():
                        continue
                    self.handle(message)
                now = time.monotonic()
                if now - last_housekeeping >= 1.0:
                    last_housekeeping = now
                    self.advance_idle()
                    self.watch_rules_file()
                    for message in _drain(rules_reader, 0.0):
                        self.offer_rules(message.value() or b"")
                if now - last_checkpoint >= s.alerter_checkpoint_s or len(self.pending_rows) >= 5000:
                    self.checkpoint()
                    last_checkpoint = now
                self.commit_stored(consumer)
            self.checkpoint(wait=True)
            self.commit_stored(consumer)
        finally:
            self._writes.put(None)
            writer.join(60)
            consumer.close()
            rules_reader.close()
            self.producer.flush(10)


def take_messages(consumer: Consumer, most: int, wait_s: float) -> list[Message]:
    """What is there now (up to ``most``), or the first message within ``wait_s``.

    ``consume(n, timeout)`` waits for n messages or the whole timeout; this returns as soon as anything arrived.
    """
    messages = consumer.consume(most, 0)
    if messages:
        return list(messages)
    first = consumer.poll(wait_s)
    return [first] if first is not None else []


def _drain(consumer: Consumer, timeout: float) -> list[Message]:
    out = []
    deadline = time.monotonic() + timeout
    while True:
        message = consumer.poll(0.2 if timeout else 0)
        if message is not None and not message.error():
            out.append(message)
            continue
        if time.monotonic() >= deadline:
            return out


def _now_dt() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _alert_row(alert: dict[str, Any], raised: Any) -> tuple[Any, ...]:
    from datetime import UTC, datetime

    def dt(ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, UTC)

    return (
        alert["alert_id"], alert["fingerprint"], alert["status"], alert["rule"], alert["rule_version"],
        alert["severity"], alert["entity"], alert["entity_id"], alert["account_id"], alert["lead_id"],
        alert["opportunity_id"], alert["team"], alert["region"], orjson.dumps(alert["recipients"]).decode(),
        alert["message"], datetime.fromisoformat(alert["starts_at"]), dt(alert["ts_ms"]),
        orjson.dumps(alert["evidence"]).decode(), alert.get("silenced_by", []), raised,
    )  # fmt: skip


def serve_alerter(settings: Settings) -> None:
    """`dealpulse alerter`: metrics on their port, evaluate rules until SIGTERM/SIGINT."""
    metrics = AlerterMetrics()
    stop = serve_until_signalled("alerter", settings.alerter_metrics_port, metrics.registry)
    Alerter(settings, metrics).run(stop)
