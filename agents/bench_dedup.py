"""``dealpulse bench dedup``: ingest's per-event cost below the dedup window's cap and at it.

A worker remembers each partition's last ``DedupState.max_ids_per_partition`` event ids (2M) and evicts the oldest
for every new one once the window is full. An eviction that is not O(1) makes every event cost more than the one
before, but only after millions of events on one partition: no end-to-end bench reaches that. (It happened: a
``dict`` finds its oldest key by scanning past every key deleted before it, 11 -> 63 µs per event over 120,000
evictions.) This bench fills a window to its cap and times the real ingest function there against a window far
from it, with no broker or store: a regression shows as ``at_cap_ratio`` or ``at_cap_growth`` well above 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from dealpulse.agents.gc_tuning import collections_deferred, worker_gc
from dealpulse.pipelines.contract import ContractRules
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.ingest import Batch, DedupState, SourceRef, process_message

AT_CAP_SLICES = 5  # runs are timed in fifths: an eviction that grows with the evictions before it shows
# what the figures must stay within (a full window costs one O(1) eviction per event, ~0.7 µs on ~10 µs, measured)
MAX_AT_CAP_RATIO = 1.5
MAX_AT_CAP_GROWTH = 1.25
TOPIC, PARTITION = "bench", 0


def filled_window(ids: int, cap: int) -> DedupState:
    """A dedup state whose one partition already holds ``ids`` ids (none of them a generated event's id), and
    keeps at most ``cap``.

    >>> state = filled_window(3, 5)
    >>> len(state.partitions[(TOPIC, PARTITION)].seen), state.max_ids_per_partition
    (3, 5)
    """
    state = DedupState(max_ids_per_partition=cap)
    state.load(TOPIC, PARTITION, [f"bench-fill-{i:012d}" for i in range(ids)], set())
    return state


class Timed(NamedTuple):
    cpu_s: float
    items: int  # every item of the messages: stored, dead-lettered or dropped as a duplicate
    stored: int  # the new ids: each one evicts the oldest from a full window


def timed_ingest(messages: Sequence[tuple[str, bytes, int]], state: DedupState, rules: ContractRules,
                 first_offset: int = 0) -> Timed:  # fmt: skip
    """Decode, validate and dedup ``messages`` as the next offsets of one partition, under the worker's collector
    settings; timed in CPU time, so that time spent waiting for a core is not counted."""
    now_ms = int(time.time() * 1000)
    items = stored = 0
    with worker_gc():
        started = time.thread_time()
        for offset, (_key, value, _items) in enumerate(messages, start=first_offset):
            with collections_deferred():  # as the worker defers them per batch
                batch = Batch()
                process_message(value, SourceRef(TOPIC, PARTITION, offset), rules, state, batch, now_ms)
                items += len(batch)
                stored += len(batch.valid)
        used = time.thread_time() - started
    return Timed(used, items, stored)


def bench_dedup(
    n_events: int, seed: int, batch_size: int, cap: int, on_step: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Per-event cost of ingest (decode, validate, dedup) in a dedup window of ``cap`` ids below its cap, and in one
    at it, where every new id evicts the oldest (µs of CPU per event, also by fifths of the run)."""
    say = on_step or (lambda _text: None)
    say(f"generating {n_events:,} events")
    messages = list(pack_messages(generate_world(seed, n_events).records(), batch_size))
    rules = ContractRules.default()
    # the same number of ids in both windows (a large window costs cache misses of its own); only one is at its cap.
    # Both are timed in fifths of the same messages, so each fifth compares like with like.
    say(f"ingesting into a window of {cap:,} ids below its cap")
    below = timed_in_fifths(messages, filled_window(cap, cap + n_events), rules)
    say(f"ingesting into a window of {cap:,} ids at its cap")
    at_cap = timed_in_fifths(messages, filled_window(cap, cap), rules)
    ratios = [us_per_item(full) / us_per_item(free) for full, free in zip(at_cap, below, strict=True)]
    below_us, at_cap_us = us_per_item(*below), us_per_item(*at_cap)
    ratio, growth = at_cap_us / below_us, ratios[-1] / ratios[0]
    return {
        "bench": "dedup",
        "events": sum(timed.items for timed in below),
        "messages": len(messages),
        "window_ids": cap,
        "evictions": sum(timed.stored for timed in at_cap),
        "us_per_event_below_cap": round(below_us, 3),
        "us_per_event_at_cap": round(at_cap_us, 3),
        "at_cap_ratio_by_fifth": [round(value, 3) for value in ratios],
        "at_cap_ratio": round(ratio, 3),
        "at_cap_growth": round(growth, 3),
        "within_bounds": ratio <= MAX_AT_CAP_RATIO and growth <= MAX_AT_CAP_GROWTH,
    }


def timed_in_fifths(messages: Sequence[tuple[str, bytes, int]], state: DedupState, rules: ContractRules) -> list[Timed]:
    step = -(-len(messages) // AT_CAP_SLICES)
    return [
        timed_ingest(messages[start : start + step], state, rules, first_offset=start)
        for start in range(0, len(messages), step)
    ]


def us_per_item(*timed: Timed) -> float:
    """µs of CPU per item over these timings.

    >>> us_per_item(Timed(0.002, 1000, 990), Timed(0.004, 1000, 1000))
    3.0
    """
    return 1e6 * sum(t.cpu_s for t in timed) / max(sum(t.items for t in timed), 1)
