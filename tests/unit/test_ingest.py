"""Ingest core: every item ends stored, dead-lettered or dropped as a duplicate; replays are recognised."""

from __future__ import annotations

import orjson

from dealpulse.pipelines.contract import ContractRules
from dealpulse.pipelines.ingest import DLQ_COLUMNS, Batch, DedupState, SourceRef, process_message

RULES = ContractRules.default()
NOW_MS = 1_795_000_000_000
DLQ = {name: i for i, name in enumerate(DLQ_COLUMNS)}


def event(event_id: str, **extra: object) -> dict[str, object]:
    return {"event_id": event_id, "type": "feature_use", "ts": "2026-11-01T10:00:00+01:00",
            "account_id": "acme", "props": {"feature": "export"}, **extra}  # fmt: skip


def run(messages: list[bytes], state: DedupState | None = None, start_offset: int = 0) -> Batch:
    state = state or DedupState()
    batch = Batch()
    for offset, raw in enumerate(messages, start=start_offset):
        process_message(raw, SourceRef("t", 0, offset), RULES, state, batch, NOW_MS)
    return batch


def test_array_message_items_are_accounted_individually() -> None:
    raw = orjson.dumps([event("a"), event("b"), {"type": "feature_use"}, event("a")])
    batch = run([raw])
    assert [row[0] for row in batch.events] == ["a", "b"]
    assert [row[0] for row in batch.duplicates] == ["a"]
    assert len(batch.dlq) == 1
    row = batch.dlq[0]
    assert row[DLQ["reason"]] == "schema_violation" and row[DLQ["field"]] == "event_id"
    assert row[DLQ["src_index"]] == 2 and row[DLQ["dlq_id"]] == "t:0:0:2"
    assert orjson.loads(row[DLQ["payload"]]) == {"type": "feature_use"}


def test_whole_message_rejection_keeps_original_bytes() -> None:
    raw = b'{"event_id": "x", "type": '
    batch = run([raw])
    row = batch.dlq[0]
    assert row[DLQ["payload"]] == raw and row[DLQ["src_index"]] == -1 and row[DLQ["reason"]] == "malformed_json"


def test_single_event_rejection_keeps_original_bytes_exactly() -> None:
    raw = b'{"event_id":"x","type":"feature_use","ts":"2026-11-01T10:00:00Z","account_id":"a",  "props":{}}'
    row = run([raw]).dlq[0]
    assert row[DLQ["payload"]] == raw and row[DLQ["field"]] == "props.feature"


def test_duplicates_across_messages_and_after_reload() -> None:
    state = DedupState()
    first = run([orjson.dumps(event("a"))], state)
    assert len(first.events) == 1
    # a restart: state is rebuilt from the store, which knows "a" was stored
    reloaded = DedupState()
    reloaded.load("t", 0, ["a"], set())
    second = run([orjson.dumps(event("a"))], reloaded, start_offset=1)
    assert second.events == [] and [row[0] for row in second.duplicates] == ["a"]


def test_replayed_positions_are_skipped_not_counted_twice() -> None:
    messages = [orjson.dumps([event("a"), event("b")]), b"not json", orjson.dumps(event("c"))]
    state = DedupState()
    # the store already has offset 0 item 0 and the DLQ entry of offset 1 from before the crash
    state.load("t", 0, ["a"], {(0, 0), (1, -1)})
    batch = run(messages, state)
    assert [row[0] for row in batch.events] == ["b", "c"]
    assert batch.dlq == [] and batch.duplicates == [] and batch.replay_skipped == 2


def test_seen_ids_are_bounded() -> None:
    state = DedupState(max_ids_per_partition=3)
    run([orjson.dumps(event(str(i))) for i in range(10)], state)
    assert list(state.partitions[("t", 0)].seen) == ["7", "8", "9"]


def test_a_consumer_moved_back_over_stored_positions_replays_instead_of_counting_duplicates() -> None:
    """Faust can seek a partition back (committed offset after recovery): what this run stored must be skipped."""
    messages = [orjson.dumps(event(f"e{i}")) for i in range(6)]
    state = DedupState()
    state.load("t", 0, [], set(), from_offset=2)
    first = run(messages[2:], state, start_offset=2)
    for offset in range(2, 6):
        state.processed("t", 0, offset)
    assert len(first.events) == 4
    # back to offset 3 (inside what this run processed) and to offset 0 (before what was loaded)
    assert state.needs_positions_from("t", 0, 3) and state.needs_positions_from("t", 0, 0)
    assert not state.needs_positions_from("t", 0, 6)
    stored = {(offset, 0) for offset in range(2, 6)}  # what the store answers: (offset, item index)
    state.add_positions("t", 0, stored | {(0, 0), (1, 0)}, from_offset=0)
    assert not state.needs_positions_from("t", 0, 3)  # covered now: no reload per message
    again = run(messages, state)
    assert again.events == [] and again.duplicates == [] and again.replay_skipped == 6


def test_offsets_that_never_arrived_are_counted_but_a_consumer_moved_back_is_not() -> None:
    """The worker's last check that every message reached it: a jump past the next offset is counted."""
    state = DedupState()
    state.load("t", 0, [], set(), from_offset=100)
    assert state.processed("t", 0, 100) == 0  # the first after loading: nothing to compare with
    assert [state.processed("t", 0, offset) for offset in (101, 102, 110)] == [0, 0, 7]
    assert [state.processed("t", 0, offset) for offset in (103, 104, 111)] == [0, 0, 0]  # moved back, read again
    assert state.processed("t", 1, 5) == 0  # a partition not loaded is not tracked
    state.forget("t", 0)
    state.load("t", 0, [], set(), from_offset=500)  # reassigned: starts from the committed offset afresh
    assert state.processed("t", 0, 500) == 0


def test_control_records_found_before_the_partition_is_loaded_are_not_skips() -> None:
    state = DedupState()
    state.holds_no_record("events", 0, 12)  # the consumer can find one before the first batch loads the partition
    state.load("events", 0, [], set(), from_offset=10)
    assert [state.processed("events", 0, offset) for offset in (10, 11, 13, 15)] == [0, 0, 0, 1]
    assert state.no_records[("events", 0)] == set(), "passed marks are dropped"
