"""`dealpulse dlq replay`: re-submit dead letters after a fix, without duplicating what already made it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Producer

from dealpulse.agents.app import contract_rules
from dealpulse.pipelines.contract import Rejection, validate_event
from dealpulse.pipelines.ingest import decode_message
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store


@dataclass
class ReplayReport:
    resubmitted: int = 0
    still_invalid: int = 0
    already_stored: int = 0
    reasons_left: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "resubmitted": self.resubmitted,
            "still_invalid": self.still_invalid,
            "already_stored": self.already_stored,
            "still_invalid_by_reason": self.reasons_left,
        }


def pending_dead_letters(store: Store, reason: str | None, limit: int) -> list[tuple[Any, ...]]:
    """DLQ entries not yet re-submitted (oldest first)."""
    where = "dlq_id NOT IN (SELECT dlq_id FROM dlq_replays WHERE outcome = 'resubmitted')"
    params: dict[str, Any] = {}
    if reason:
        where += " AND reason = {reason:String}"
        params["reason"] = reason
    return store.query_rows(
        f"SELECT dlq_id, payload FROM dlq WHERE {where} ORDER BY failed_at, dlq_id LIMIT {int(limit)}",
        params,
    )


def replay_dead_letters(
    settings: Settings, store: Store, reason: str | None = None, limit: int = 1_000_000, dry_run: bool = False
) -> ReplayReport:
    """Validate each pending entry with today's rules; send the ones that now pass and are not stored yet."""
    rules = contract_rules(settings)
    report = ReplayReport()
    now_ms = int(time.time() * 1000)
    outcomes: list[tuple[str, int, str]] = []
    to_send: list[tuple[str, bytes, str]] = []
    entries = pending_dead_letters(store, reason, limit)
    for dlq_id, payload in entries:
        raw = payload if isinstance(payload, bytes) else str(payload).encode()
        items: Any = decode_message(raw, settings.max_message_bytes, settings.max_events_per_message)
        if isinstance(items, Rejection):
            report.still_invalid += 1
            report.reasons_left[str(items.reason)] = report.reasons_left.get(str(items.reason), 0) + 1
            outcomes.append((dlq_id, now_ms, "still_invalid"))
            continue
        results = [validate_event(item, rules, now_ms) for item in items]
        rejected = [r for r in results if isinstance(r, Rejection)]
        if rejected:
            report.still_invalid += 1
            key = str(rejected[0].reason)
            report.reasons_left[key] = report.reasons_left.get(key, 0) + 1
            outcomes.append((dlq_id, now_ms, "still_invalid"))
            continue
        # whole-message and single-item entries are re-sent alike: as the bytes they were
        to_send.append((dlq_id, raw, results[0].account_id))  # type: ignore[union-attr]
    stored_ids = _already_stored(store, [orjson.loads(raw) for _, raw, _ in to_send])
    producer = (
        None if dry_run else Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    )
    for dlq_id, raw, account_id in to_send:
        decoded = orjson.loads(raw)
        ids = {e["event_id"] for e in (decoded if isinstance(decoded, list) else [decoded])}
        if ids <= stored_ids:
            report.already_stored += 1
            outcomes.append((dlq_id, now_ms, "already_stored"))
            continue
        report.resubmitted += 1
        outcomes.append((dlq_id, now_ms, "resubmitted"))
        if producer is not None:
            producer.produce(settings.events_topic, value=raw, key=account_id.encode(),
                             headers=[("dealpulse.replay_of", dlq_id.encode())])  # fmt: skip
            producer.poll(0)
    if producer is not None and producer.flush(60):
        raise RuntimeError("some re-submitted dead letters were not delivered; nothing was marked replayed")
    if not dry_run and outcomes:
        store.insert("dlq_replays", outcomes, ("dlq_id", "replayed_at", "outcome"))
    return report


def _already_stored(store: Store, decoded: list[Any]) -> set[str]:
    ids = [e["event_id"] for item in decoded for e in (item if isinstance(item, list) else [item])]
    if not ids:
        return set()
    rows = store.query_rows("SELECT event_id FROM events WHERE event_id IN {ids:Array(String)}", {"ids": ids})
    return {row[0] for row in rows}
