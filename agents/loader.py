"""Load events into the store without Kafka: the same ingest core and writer, for bulk loads and benchmarks.

Every item is still validated, deduplicated and accounted for (stored, DLQ or duplicate); the source position is
``(topic, 0, message number)``, so a load that is run twice with the same topic name writes nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from dealpulse.agents.app import contract_rules
from dealpulse.pipelines.ingest import Batch, DedupState, SourceRef, process_message
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store
from dealpulse.pipelines.store.writer import BatchWriter, RetryPolicy


def load_direct(
    store: Store,
    settings: Settings,
    messages: Iterable[tuple[str, bytes, int]],
    topic: str = "direct-load",
    messages_per_batch: int = 500,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Validate and store ``(key, value, items)`` messages; return the number of items processed."""
    rules = contract_rules(settings)
    state = DedupState()
    writer = BatchWriter(store, RetryPolicy(settings.store_retry_initial_s, settings.store_retry_max_s))
    batch = Batch()
    items = pending = 0
    for offset, (_key, value, count) in enumerate(messages):
        process_message(value, SourceRef(topic, 0, offset), rules, state, batch, int(time.time() * 1000),
                        settings.max_message_bytes, settings.max_events_per_message)  # fmt: skip
        items += count
        pending += 1
        if pending >= messages_per_batch:
            writer.write(batch)
            batch, pending = Batch(), 0
            if on_progress:
                on_progress(items)
    if pending:
        writer.write(batch)
    if on_progress:
        on_progress(items)
    return items
