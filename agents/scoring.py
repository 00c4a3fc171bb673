"""Scoring inside the worker: entity state in Faust tables, scores out, labelled snapshots to the trainer.

The ingest agent hands each batch's validated events here, message by message. State lives in three Faust tables
(leads, accounts, opportunities; changelog-backed, RocksDB or memory). Their changelog partitions are the input
partitions the events came from, so a worker that gains partition *p* of the events topic recovers exactly the
state of the entities whose events live on *p* (co-partitioned by account_id, whatever the key of the table).

Per batch: load each touched entity once, fold and score every event, publish scores (one message per input
partition, same partition number) and labelled examples (one message on the one-partition training topic), then —
after the store accepted the batch — write the touched states back to the tables.

Batches are pipelined: the next batch is scored while the store still writes the previous one. Its states reach
the tables only after that write, so until then they wait in ``pending`` (serialised, one copy per batch), and the
next batch reads them from there: it continues from the newest state without making it durable early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from faust import streams as faust_streams
from faust.types import EventT, TableT

from dealpulse.agents.metrics import IngestMetrics
from dealpulse.models.online import ModelSnapshot, load_snapshot
from dealpulse.pipelines.features import DAY_MS, FeatureSpec, load_features
from dealpulse.pipelines.ingest import Batch
from dealpulse.pipelines.scoring import EntityStates, Output, Predictor, Scorer
from dealpulse.pipelines.settings import Settings

log = logging.getLogger(__name__)

ITEMS_PER_MESSAGE = 1000  # scores or examples per Kafka message: well under the brokers' 1 MB default
STATES_PER_SLICE = 200  # table writes between two yields to the event loop (each is a changelog send)
END_MARKER = b"\x00end"  # not an entity id: ids are text
HeldStates = dict[int, list[tuple[str, str, bytes]]]  # partition -> (entity, key, serialised state) of a batch
ENTITY_TABLES = {"lead": "leads", "account": "accounts", "opportunity": "opportunities"}


@contextlib.contextmanager
def in_partition_of(event: EventT) -> Iterator[None]:
    """Make ``event`` Faust's current event, so table writes go to (and are stored for) its partition.

    Faust picks a table's changelog partition from the event being processed; a batch spans partitions,
    so each write is scoped to an event of its own partition.
    """
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


class SnapshotFollower:
    """Follows the compacted models topic in a thread and keeps the newest snapshot per model (hot swap)."""

    def __init__(self, settings: Settings, spec: FeatureSpec) -> None:
        self.settings = settings
        self.min_labels = {name: model.min_labels for name, model in spec.models.items()}
        self.snapshots: dict[str, ModelSnapshot] = {}
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshot-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def predictors(self) -> dict[str, Predictor]:
        """Models that have learned enough to replace the prior; the others score with the prior (cold)."""
        return {
            name: snapshot
            for name, snapshot in self.snapshots.items()
            if snapshot.learned >= self.min_labels.get(name, 0)
        }

    def offer(self, snapshot: ModelSnapshot) -> bool:
        current = self.snapshots.get(snapshot.name)
        if current is not None and current.version >= snapshot.version:
            return False
        self.snapshots = {**self.snapshots, snapshot.name: snapshot}  # swap the dict: readers never see a half
        log.info("model %s: now scoring with snapshot v%d (%d examples learned)",
                 snapshot.name, snapshot.version, snapshot.learned)  # fmt: skip
        return True

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": "dealpulse-snapshot-follower",  # unused: partitions are assigned, never committed
                "enable.auto.commit": False,
            }
        )
        try:
            tp = TopicPartition(self.settings.models_topic, 0, OFFSET_BEGINNING)
            consumer.assign([tp])
            while not self._stop.is_set():
                message = consumer.poll(0.5)
                if message is None:
                    _low, high = consumer.get_watermark_offsets(TopicPartition(self.settings.models_topic, 0), 5)
                    position = consumer.position([TopicPartition(self.settings.models_topic, 0)])[0].offset
                    if high <= 0 or position >= high:
                        self.caught_up.set()
                    continue
                if message.error() or not message.value():
                    continue
                try:
                    self.offer(load_snapshot(message.value() or b""))
                except Exception:  # a corrupt snapshot must not stop scoring with the current one
                    log.exception("ignoring an unreadable model snapshot at offset %s", message.offset())
        except Exception:
            log.exception("snapshot follower stopped")
        finally:
            consumer.close()


@dataclass
class ScoringService:
    """Per worker: the scorer, the tables and the snapshot follower. Nothing here is module-level."""

    settings: Settings
    tables: dict[str, TableT]
    metrics: IngestMetrics
    spec: FeatureSpec = field(init=False)
    scorer: Scorer = field(init=False)
    follower: SnapshotFollower = field(init=False)
    # (entity, key) -> (batch sequence number, serialised state) of states scored but not yet in the tables
    pending: dict[tuple[str, str], tuple[int, bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        settings = self.settings
        self.spec = load_features(settings.features_file)
        self.scorer = Scorer(
            self.spec,
            settings.grade_thresholds,
            settings.snapshots_per_entity,
            label_guard_ms=int(settings.label_guard_s * 1000),
        )
        self.follower = SnapshotFollower(settings, self.spec)

    async def wait_for_snapshots(self, timeout: float = 15.0) -> None:
        """Before the first batch: let the follower read the newest snapshots, so a restart scores warm."""
        if self.follower.caught_up.is_set():
            return
        deadline = time.monotonic() + timeout
        while not self.follower.caught_up.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.follower.caught_up.set()  # after the timeout: score with the prior rather than not at all

    def _load(self, entity: str, key: str) -> dict[str, Any] | None:
        waiting = self.pending.get((entity, key))
        raw = waiting[1] if waiting is not None else self.tables[entity].get(key.encode())
        if raw is None:
            return None
        state: dict[str, Any] = orjson.loads(raw)
        return state

    def score_batch(self, events: Sequence[EventT], batch: Batch, spans: list[tuple[int, int, int]]) -> dict[int, Any]:
        """Score the batch's valid events; ``spans`` are (partition, first, end) slices of ``batch.valid``.

        Returns the per-partition working states, to be written back by :meth:`commit_states` after the store
        accepted the batch.
        """
        models = self.follower.predictors()
        per_partition: dict[int, tuple[EntityStates, Output]] = {}
        now_ms = int(time.time() * 1000)
        topic = self.settings.events_topic
        ttl_ms = int(self.settings.state_ttl_days * DAY_MS)
        for partition, first, end in spans:
            if partition not in per_partition:
                per_partition[partition] = (EntityStates(self._load, self.spec.fingerprint), Output())
            states, out = per_partition[partition]
            scorer = self.scorer
            for i in range(first, end):
                event = batch.valid[i]
                scored_before = len(out.scores)
                self._expire_idle(states, event.lead_id, event.account_id, event.ts_ms, ttl_ms)
                scorer.process_into(event, states, models, out)
                row = batch.events[i]
                for score in out.scores[scored_before:]:
                    batch.scores.append(
                        (
                            score.score_id,
                            score.model,
                            score.entity,
                            score.entity_id,
                            score.account_id,
                            score.event_id,
                            score.ts_ms,
                            score.score,
                            score.grade,
                            score.model_version,
                            score.cold,
                            topic,
                            row[11],
                            row[12],
                            row[13],
                            now_ms,
                        )
                    )
        return per_partition

    def _expire_idle(self, states: EntityStates, lead: str, account: str, ts_ms: int, ttl_ms: int) -> None:
        """State idle longer than the TTL (in event time) starts afresh: it no longer describes the entity."""
        for entity, key in (("lead", lead), ("account", account)):
            if key:
                state = states.get(entity, key)
                if state["t"] and ts_ms - state["t"] > ttl_ms:
                    states.cache[(entity, key)] = {"t": 0, "s": {}, "a": [], "v": self.spec.fingerprint}

    async def publish(self, per_partition: dict[int, Any], scores_topic: faust.TopicT,
                      training_topic: faust.TopicT) -> list[asyncio.Future[Any]]:  # fmt: skip
        """Send scores to their partition (in order per account), examples to the one training partition.

        Returns the delivery futures: the batch may be acked only after they all resolved.
        """
        deliveries = []
        examples: list[dict[str, Any]] = []
        unmatched = 0
        for partition, (_states, out) in per_partition.items():
            for chunk in _chunks(out.scores, ITEMS_PER_MESSAGE):
                value = orjson.dumps([score.to_json() for score in chunk])
                deliveries.append(await scores_topic.send(value=value, partition=partition))
            examples.extend(example.to_json() for example in out.examples)
            unmatched += out.feedback_unmatched
        for chunk in _chunks(examples, ITEMS_PER_MESSAGE):
            deliveries.append(await training_topic.send(value=orjson.dumps(chunk), partition=0))
        if self.settings.metrics_enabled:
            m = self.metrics
            graded: Counter[tuple[str, str]] = Counter()
            learned: Counter[tuple[str, str]] = Counter()
            for _partition, (_states, out) in per_partition.items():
                graded.update((score.model, score.grade) for score in out.scores)
                learned.update((example.model, example.source) for example in out.examples)
            for (model, grade), count in graded.items():
                m.scores.labels(model, grade).inc(count)
            for (model, source), count in learned.items():
                m.examples.labels(model, source).inc(count)
            m.feedback_unmatched.inc(unmatched)
            for name, snapshot in self.follower.snapshots.items():
                m.model_version.labels(name).set(snapshot.version)
                m.model_snapshot_age.labels(name).set(max(0.0, time.time() - snapshot.created_ms / 1000))
        return deliveries

    def hold(self, per_partition: dict[int, Any], seq: int) -> HeldStates:
        """Serialise the batch's touched states and keep them in ``pending`` until :meth:`commit_states`."""
        held: HeldStates = {}
        pending = self.pending
        for partition, (states, _out) in per_partition.items():
            rows = held.setdefault(partition, [])
            for entity, key in states.dirty:
                raw = orjson.dumps(states.cache[(entity, key)])
                pending[(entity, key)] = (seq, raw)
                rows.append((entity, key, raw))
        return held

    def forget_pending(self) -> None:
        """Nothing in flight any more (all written, or given up with the partitions): read the tables again."""
        self.pending.clear()

    async def commit_states(self, parts: Sequence[tuple[int, Sequence[EventT], HeldStates]], producer: Any) -> int:
        """Write the states of these batches ((seq, messages, states), in order) to their tables, each in the
        partition it came from; returns states written."""
        written = 0
        anchor: dict[int, EventT] = {}
        pending = self.pending
        for seq, events, held in parts:
            for event in events:
                anchor.setdefault(event.message.partition, event)
            for partition, rows in held.items():
                for start in range(0, len(rows), STATES_PER_SLICE):
                    with in_partition_of(anchor[partition]):
                        for entity, key, raw in rows[start : start + STATES_PER_SLICE]:
                            self.tables[entity][key.encode()] = raw
                            waiting = pending.get((entity, key))
                            if waiting is not None and waiting[0] == seq:  # no later batch changed it since
                                del pending[(entity, key)]
                    written += len(rows[start : start + STATES_PER_SLICE])
                    await asyncio.sleep(0)  # let the next batch be scored meanwhile: scores wait for no store
        if self.settings.changelog_end_markers and written:
            # Tansu reports a high watermark of (base offset of the last batch + 1), and Faust recovers a table up
            # to the high watermark. A marker alone in the last batch of each changelog partition makes that
            # watermark exact, so a restarted worker recovers every state (the restart test proves it).
            await producer.flush()
            for event in anchor.values():
                with in_partition_of(event):
                    for table in self.tables.values():
                        table[END_MARKER] = b""
            await producer.flush()
        return written


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def make_tables(app: faust.App, settings: Settings) -> dict[str, TableT]:
    """One changelog-backed table per entity kind, partitioned like the events topic."""
    return {
        entity: app.Table(
            name,
            partitions=settings.topic_partitions,
            key_type=bytes,  # bytes -> the "raw" serializer for the table and its changelog (recovery too)
            value_type=bytes,
            help=f"dealpulse {entity} state",
        )
        for entity, name in ENTITY_TABLES.items()
    }
