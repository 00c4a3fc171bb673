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
import operator
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from faust import streams as faust_streams
from faust.types import TP, EventT, TableT

from dealpulse.agents.metrics import IngestMetrics
from dealpulse.agents.output import Delivered, DeliveryTally, OutputProducer
from dealpulse.models.online import ModelSnapshot, load_snapshot
from dealpulse.pipelines.features import FeatureSpec, load_features
from dealpulse.pipelines.ingest import Batch
from dealpulse.pipelines.scoring import EntityStates, Output, Predictor, Scorer
from dealpulse.pipelines.settings import Settings

log = logging.getLogger(__name__)

ITEMS_PER_MESSAGE = 1000  # scores or examples per Kafka message: well under the brokers' 1 MB default
STATES_PER_SLICE = 200  # table writes between two yields to the event loop (each is a changelog send)
END_MARKER = b"\x00end"  # not an entity id: ids are text
HeldStates = dict[int, list[tuple[str, str, bytes]]]  # partition -> (entity, key, serialised state) of a batch
ENTITY_TABLES = {"lead": "leads", "account": "accounts", "opportunity": "opportunities"}
_model_and_grade = operator.attrgetter("model", "grade")
_model_and_source = operator.attrgetter("model", "source")


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

    def _read_to_end(self, consumer: Consumer) -> bool:
        """Whether everything on the models topic has been read. Asked only until it has: with the broker down
        the question raises, and it used to end the thread (no hot swap until the worker restarted)."""
        models = TopicPartition(self.settings.models_topic, 0)
        try:
            _low, high = consumer.get_watermark_offsets(models, 5)
            position = consumer.position([models])[0].offset
        except KafkaException as exc:
            log.warning("cannot tell yet whether the newest model snapshots are read: %s", exc)
            return False
        return bool(high <= 0 or position >= high)

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
                    if not self.caught_up.is_set() and self._read_to_end(consumer):
                        self.caught_up.set()
                    continue
                if message.error() or not message.value():
                    continue
                try:
                    self.offer(load_snapshot(message.value() or b""))
                except Exception:  # a corrupt snapshot must not stop scoring with the current one
                    log.exception("ignoring an unreadable model snapshot at offset %s", message.offset())
        except Exception:  # a bug: say so loudly; scoring goes on with the snapshots it has
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
        self.scorer = Scorer.from_settings(self.spec, settings)
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
        for partition, first, end in spans:
            if partition not in per_partition:
                per_partition[partition] = (EntityStates(self._load, self.spec.fingerprint), Output())
            states, out = per_partition[partition]
            scorer = self.scorer
            for i in range(first, end):
                event = batch.valid[i]
                scored_before = len(out.scores)
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

    def publish(self, per_partition: dict[int, Any], output: OutputProducer) -> list[asyncio.Future[Delivered]]:
        """Send scores to their partition (in order per account), examples to the one training partition.

        Returns the delivery futures: the batch may be acked only after they all resolved.
        """
        settings = self.settings
        deliveries = []
        examples: list[dict[str, Any]] = []
        unmatched = 0
        for partition, (_states, out) in per_partition.items():
            for chunk in _chunks(out.scores, ITEMS_PER_MESSAGE):
                value = orjson.dumps(chunk)  # Score is a dataclass: orjson writes it as Score.to_json() would
                deliveries.append(output.send(settings.scores_topic, value, partition=partition))
            examples.extend(example.to_json() for example in out.examples)
            unmatched += out.feedback_unmatched
        for chunk in _chunks(examples, ITEMS_PER_MESSAGE):
            deliveries.append(output.send(settings.training_topic, orjson.dumps(chunk), partition=0))
        if self.settings.metrics_enabled:
            m = self.metrics
            graded: Counter[tuple[str, str]] = Counter()
            learned: Counter[tuple[str, str]] = Counter()
            for _partition, (_states, out) in per_partition.items():
                graded.update(map(_model_and_grade, out.scores))  # 0.12 µs per score; a generator 0.18
                learned.update(map(_model_and_source, out.examples))
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

    def attach(self, output: OutputProducer) -> None:
        """Send the tables' changelog records through ``output`` (see :class:`StateTable`)."""
        for table in self.tables.values():
            if isinstance(table, StateTable):
                table.output = output

    async def commit_states(self, parts: Sequence[tuple[int, Sequence[EventT], HeldStates]]) -> int:
        """Write the states of these batches ((seq, messages, states), in order) to their tables, each in the
        partition it came from, and wait until their changelog records are in Kafka; an entity several of them
        touched is written once, as the newest of them left it. Returns states written."""
        anchor: dict[int, EventT] = {}
        newest: dict[int, dict[tuple[str, str], tuple[int, bytes]]] = {}  # partition -> key -> (seq, state)
        for seq, events, held in parts:
            for event in events:
                anchor.setdefault(event.message.partition, event)
            for partition, rows in held.items():
                states = newest.setdefault(partition, {})
                for entity, key, raw in rows:
                    states[(entity, key)] = (seq, raw)
        written = 0
        pending = self.pending
        tally = self._count_changelog_deliveries()
        for partition, states in newest.items():
            items = list(states.items())
            for start in range(0, len(items), STATES_PER_SLICE):
                with in_partition_of(anchor[partition]):
                    for (entity, key), (seq, raw) in items[start : start + STATES_PER_SLICE]:
                        self.tables[entity][key.encode()] = raw
                        waiting = pending.get((entity, key))
                        if waiting is not None and waiting[0] == seq:  # no later batch changed it since
                            del pending[(entity, key)]
                written += len(items[start : start + STATES_PER_SLICE])
                await asyncio.sleep(0)  # let the next batch be scored meanwhile: scores wait for no store
        await self._changelog_delivered(tally)
        if self.settings.changelog_end_markers and written:
            # Tansu reports a high watermark of (base offset of the last batch + 1), and Faust recovers a table up
            # to the high watermark. A marker alone in the last batch of each changelog partition makes that
            # watermark exact, so a restarted worker recovers every state (the restart test proves it).
            for event in anchor.values():
                with in_partition_of(event):
                    for table in self.tables.values():
                        table[END_MARKER] = b""
            await self._changelog_delivered(tally)
        return written

    def _count_changelog_deliveries(self) -> DeliveryTally | None:
        """A new tally for the tables' changelog records (None until an output producer is attached)."""
        tally = None
        for table in self.tables.values():
            if isinstance(table, StateTable) and table.output is not None:
                tally = tally or DeliveryTally(table.output.loop)
                table.tally = tally
        return tally

    async def _changelog_delivered(self, tally: DeliveryTally | None) -> None:
        """Wait until the changelog records sent so far are in Kafka, then note how far each changelog partition
        is persisted (what Faust's own send callback does per record: RocksDB remembers it for recovery)."""
        if tally is None:
            return
        offsets = await tally.wait()
        for table in self.tables.values():
            if isinstance(table, StateTable):
                table.persisted(offsets)


class StateTable(faust.Table):
    """A Faust table whose changelog records go through the worker's output producer (librdkafka) once one is
    attached: Faust's own producer sends them one coroutine at a time (aiokafka), which measured as a burst of
    event-loop work at every store group — the scoring latency tail. Until then, Faust sends them itself."""

    output: OutputProducer | None = None
    tally: DeliveryTally | None = None  # counts this commit's changelog records (see ScoringService.commit_states)

    def on_key_set(self, key: Any, value: Any) -> None:
        output = self.output
        if output is None:
            super().on_key_set(key, value)
            return
        partition = self.partition_for_key(key)  # the partition of the event being processed
        assert partition is not None, "table writes happen inside in_partition_of(event)"
        assert self.tally is not None, "table writes happen inside ScoringService.commit_states"
        output.send_counted(self.changelog_topic.get_topic_name(), value, self.tally, key=key, partition=partition)
        self._maybe_set_key_ttl(key, partition)
        self._sensor_on_set(self, key, value)

    def persisted(self, offsets: dict[tuple[str, int], int]) -> None:
        """Note the highest acknowledged offset of each of this table's changelog partitions (RocksDB remembers
        how far its changelog is applied; Faust's own send callback does this per record)."""
        topic = self.changelog_topic.get_topic_name()
        for (to, partition), offset in offsets.items():
            if to == topic:
                self.data.set_persisted_offset(TP(topic, partition), offset)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def make_tables(app: faust.App, settings: Settings) -> dict[str, Any]:
    """One changelog-backed table per entity kind, partitioned like the events topic (what ``app.Table`` does,
    with our table class)."""
    return {
        entity: app.tables.add(
            StateTable(
                app,
                name=name,
                beacon=app.tables.beacon,
                partitions=settings.topic_partitions,
                key_type=bytes,  # bytes -> the "raw" serializer for the table and its changelog (recovery too)
                value_type=bytes,
                help=f"dealpulse {entity} state",
            )
        )
        for entity, name in ENTITY_TABLES.items()
    }
