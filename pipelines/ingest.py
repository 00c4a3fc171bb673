"""Ingest core: one Kafka message in, rows for the events / DLQ / duplicates tables out. No I/O here.

Every item of every message ends in exactly one place: stored, DLQ, or duplicate-dropped. Items a previous run
already wrote to the store (a replay after a crash) are recognised by their source position and skipped, so a
restart never writes a row twice.

>>> rules = ContractRules.default()
>>> state = DedupState()
>>> batch = Batch()
>>> msg = b'[{"event_id": "e1", "type": "feature_use", "ts": "2026-11-01T10:00:00Z", "account_id": "a",'
>>> msg += b' "props": {"feature": "export"}}, {"event_id": "e1", "type": "feature_use",'
>>> msg += b' "ts": "2026-11-01T10:00:00Z", "account_id": "a", "props": {"feature": "export"}}, 42]'
>>> process_message(msg, SourceRef("dealpulse.events", 0, 17), rules, state, batch, now_ms=1_800_000_000_000)
>>> len(batch.events), len(batch.duplicates), [row[1] for row in batch.dlq]
(1, 1, ['not_an_object'])
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from dealpulse.pipelines.contract import ContractRules, Event, Reason, Rejection, validate_event

EVENT_COLUMNS = (
    "event_id",
    "type",
    "ts",
    "tz_offset_min",
    "account_id",
    "lead_id",
    "opportunity_id",
    "source",
    "props",
    "keywords",
    "src_topic",
    "src_partition",
    "src_offset",
    "src_index",
    "ingested_at",
)
DLQ_COLUMNS = (
    "dlq_id",
    "reason",
    "detail",
    "field",
    "payload",
    "event_id",
    "src_topic",
    "src_partition",
    "src_offset",
    "src_index",
    "failed_at",
)
DUPLICATE_COLUMNS = ("event_id", "src_topic", "src_partition", "src_offset", "src_index", "dropped_at")
WHOLE_MESSAGE = -1  # src_index of a DLQ entry that rejects the whole message


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a message came from; together with the item index it identifies every item exactly."""

    topic: str
    partition: int
    offset: int


DEDUP_WINDOW_IDS = 2_000_000  # event ids a worker remembers per partition (``dealpulse bench dedup`` times the cap)


@dataclass(slots=True)
class PartitionDedup:
    """Dedup state of one partition: recently stored event ids and the positions already in the store."""

    # insertion-ordered, evicted oldest first. An OrderedDict, not a dict: a dict's oldest key is found by scanning
    # past every key deleted before it, so at the cap each event cost more than the last (11 -> 63 µs per event
    # over 120k evictions at the 2M cap, measured); popitem(last=False) is O(1) (0.7 µs per event at the cap)
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    accounted: set[tuple[int, int]] = field(default_factory=set)  # (offset, index) written by a previous run
    accounted_until: int = -1  # highest offset in ``accounted``; past it nothing needs checking
    loaded_from: int = -1  # the lowest offset whose positions were loaded from the store
    next_offset: int = -1  # one past the highest offset processed in this run
    covered_until: int = -1  # positions in [loaded_from, covered_until) are all in ``accounted``


@dataclass(slots=True)
class DedupState:
    """Per-partition dedup state of one worker, reloaded from the store when it (re)gains a partition."""

    max_ids_per_partition: int = DEDUP_WINDOW_IDS
    partitions: dict[tuple[str, int], PartitionDedup] = field(default_factory=dict)
    # offsets ahead known to hold no message (control records); kept apart from ``partitions``: the consumer can
    # find them before the partition's state is loaded
    no_records: dict[tuple[str, int], set[int]] = field(default_factory=dict)

    def load(self, topic: str, partition: int, event_ids: list[str], accounted: set[tuple[int, int]],
             from_offset: int = -1) -> None:  # fmt: skip
        state = PartitionDedup(OrderedDict.fromkeys(event_ids[-self.max_ids_per_partition :]), accounted)
        state.accounted_until = max((offset for offset, _ in accounted), default=-1)
        state.loaded_from = state.covered_until = from_offset
        self.partitions[(topic, partition)] = state

    def needs_positions_from(self, topic: str, partition: int, offset: int) -> bool:
        """True when a message arrives from before what was loaded or already processed: the consumer was moved
        back (Faust seeks to the committed offset after table recovery or a rebalance). The store then knows
        positions this run does not: the ones loaded later and the ones this run wrote itself."""
        state = self.partitions.get((topic, partition))
        if state is None or offset < 0:
            return False
        return offset < state.loaded_from or state.covered_until <= offset < state.next_offset

    def processed(self, topic: str, partition: int, offset: int) -> int:
        """Note a message as processed; returns how many offsets before it were skipped since the previous one.

        Every offset of the events topic is a message, except a transactional producer's control records (one per
        transaction and partition), which the consumer reports through :meth:`holds_no_record`: a skip means
        messages never reached this worker.

        >>> state = DedupState()
        >>> state.load("events", 0, [], set(), from_offset=10)
        >>> [state.processed("events", 0, offset) for offset in (10, 11, 11, 15, 12)]
        [0, 0, 0, 3, 0]
        >>> state.holds_no_record("events", 0, 16)  # a transaction's commit marker
        >>> [state.processed("events", 0, offset) for offset in (17, 20)]
        [0, 2]
        """
        state = self.partitions.get((topic, partition))
        if state is None or offset < state.next_offset:
            return 0
        skipped = offset - state.next_offset if state.next_offset >= 0 else 0
        empty = self.no_records.get((topic, partition))
        if empty:  # rare: only with a transactional source
            if skipped:
                skipped -= sum(1 for no_record in empty if state.next_offset <= no_record < offset)
            empty.difference_update([no_record for no_record in empty if no_record <= offset])
        state.next_offset = offset + 1
        return skipped

    def holds_no_record(self, topic: str, partition: int, offset: int) -> None:
        """Note that ``offset`` holds no message (reading the partition again from it skipped it): not a skip."""
        self.no_records.setdefault((topic, partition), set()).add(offset)

    def add_positions(self, topic: str, partition: int, accounted: set[tuple[int, int]], from_offset: int) -> None:
        """Merge positions stored from ``from_offset`` on (loaded after the consumer moved back to it)."""
        state = self.partitions[(topic, partition)]
        state.accounted |= accounted
        state.accounted_until = max([state.accounted_until, *(offset for offset, _ in accounted)])
        state.loaded_from = min(state.loaded_from, from_offset)
        state.covered_until = max(state.covered_until, state.next_offset)

    def forget(self, topic: str, partition: int) -> None:
        self.partitions.pop((topic, partition), None)

    def is_loaded(self, topic: str, partition: int) -> bool:
        return (topic, partition) in self.partitions


@dataclass(slots=True)
class Batch:
    """Rows waiting for one store flush, plus per-outcome counts for metrics and accounting."""

    events: list[tuple[Any, ...]] = field(default_factory=list)
    dlq: list[tuple[Any, ...]] = field(default_factory=list)
    duplicates: list[tuple[Any, ...]] = field(default_factory=list)
    valid: list[Event] = field(default_factory=list)  # the validated events, aligned with ``events``
    scores: list[tuple[Any, ...]] = field(default_factory=list)  # rows for the scores table (SCORE_COLUMNS)
    replay_skipped: int = 0

    def __len__(self) -> int:
        return len(self.events) + len(self.dlq) + len(self.duplicates)

    def extend(self, other: Batch) -> None:
        """Append another batch's rows (for one store write of several batches).

        Only rows: ``valid`` (the events themselves, already scored) is not kept. Objects that wait for the store
        outlive young garbage collections, and thousands of them made full collections frequent.
        """
        self.events.extend(other.events)
        self.dlq.extend(other.dlq)
        self.duplicates.extend(other.duplicates)
        self.scores.extend(other.scores)
        self.replay_skipped += other.replay_skipped


def decode_message(raw: bytes, max_bytes: int, max_events: int) -> list[Any] | Rejection:
    """Decode a message value into its items (one object, or an array of them)."""
    if len(raw) > max_bytes:
        return Rejection(Reason.TOO_LARGE, f"{len(raw)} bytes > limit {max_bytes}")
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return Rejection(Reason.INVALID_UTF8, "message is not valid UTF-8")
        return Rejection(Reason.MALFORMED_JSON, str(exc))
    if isinstance(decoded, list):
        if not decoded:
            return Rejection(Reason.EMPTY_BATCH, "empty array")
        if len(decoded) > max_events:
            return Rejection(Reason.TOO_MANY_EVENTS, f"{len(decoded)} events > limit {max_events}")
        return decoded
    return [decoded]


def dlq_id(ref: SourceRef, index: int) -> str:
    """Deterministic id of a DLQ entry: the same bad item always gets the same id."""
    return f"{ref.topic}:{ref.partition}:{ref.offset}:{index}"


def _event_id_of(item: Any) -> str:
    value = item.get("event_id") if isinstance(item, dict) else None
    return value[:64] if isinstance(value, str) else ""


def process_message(
    raw: bytes,
    ref: SourceRef,
    rules: ContractRules,
    state: DedupState,
    batch: Batch,
    now_ms: int,
    max_bytes: int = 1_000_000,
    max_events: int = 10_000,
) -> None:
    """Validate and dedup one message, appending its rows to ``batch`` (the caller loaded ``state`` first)."""
    partition_state = state.partitions.setdefault((ref.topic, ref.partition), PartitionDedup())
    replaying = ref.offset <= partition_state.accounted_until
    accounted = partition_state.accounted
    items = decode_message(raw, max_bytes, max_events)
    if isinstance(items, Rejection):
        if replaying and (ref.offset, WHOLE_MESSAGE) in accounted:
            batch.replay_skipped += 1
            return
        batch.dlq.append(_dlq_row(items, raw, "", ref, WHOLE_MESSAGE, now_ms))
        return
    single = len(items) == 1
    seen = partition_state.seen
    for index, item in enumerate(items):
        if replaying and (ref.offset, index) in accounted:
            batch.replay_skipped += 1
            continue
        result = validate_event(item, rules, now_ms)
        if isinstance(result, Rejection):
            payload = raw if single else orjson.dumps(item)
            batch.dlq.append(_dlq_row(result, payload, _event_id_of(item), ref, index, now_ms))
            continue
        if result.event_id in seen:
            batch.duplicates.append((result.event_id, ref.topic, ref.partition, ref.offset, index, now_ms))
            continue
        seen[result.event_id] = None
        if len(seen) > state.max_ids_per_partition:
            seen.popitem(last=False)
        batch.valid.append(result)
        batch.events.append(
            (
                result.event_id,
                result.type,
                result.ts_ms,
                result.tz_offset_min,
                result.account_id,
                result.lead_id,
                result.opportunity_id,
                result.source,
                orjson.dumps(result.props).decode(),
                result.keywords,
                ref.topic,
                ref.partition,
                ref.offset,
                index,
                now_ms,
            )
        )


def _dlq_row(
    rejection: Rejection, payload: bytes, event_id: str, ref: SourceRef, index: int, now_ms: int
) -> tuple[Any, ...]:
    return (
        dlq_id(ref, index),
        str(rejection.reason),
        rejection.detail,
        rejection.field,
        payload,
        event_id,
        ref.topic,
        ref.partition,
        ref.offset,
        index,
        now_ms,
    )
