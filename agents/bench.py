"""Benchmarks that measure the real pipeline on the embedded stack, with the raw limit in the same run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from dealpulse.agents.stack import EmbeddedStack, produce
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.settings import Settings


def raw_consume_rate(settings: Settings, expected_messages: int, timeout: float = 300) -> tuple[float, int]:
    """confluent-kafka consume + orjson decode of every message, nothing else: the ceiling for ingest."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"dealpulse-bench-raw-{time.time_ns()}",
            "enable.auto.commit": False,
        }
    )
    metadata = consumer.list_topics(settings.events_topic, timeout=30).topics[settings.events_topic]
    consumer.assign([TopicPartition(settings.events_topic, p, 0) for p in metadata.partitions])
    messages = items = 0
    started = None
    deadline = time.monotonic() + timeout
    while messages < expected_messages and time.monotonic() < deadline:
        for message in consumer.consume(1000, 1.0):
            if message.error():
                continue
            if started is None:
                started = time.perf_counter()
            try:
                decoded = orjson.loads(message.value() or b"")
                items += len(decoded) if isinstance(decoded, list) else 1
            except orjson.JSONDecodeError:
                items += 1  # the generator's malformed records: decoding them is still the raw work
            messages += 1
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return items / elapsed if elapsed > 0 else 0.0, items


def bench_ingest(
    workdir: Path, n_events: int, seed: int, batch_size: int, metrics: bool = True, timeout: float = 900
) -> dict[str, Any]:
    world = generate_world(seed, n_events)
    messages = list(pack_messages(world.records(), batch_size))
    with EmbeddedStack(workdir) as stack:
        settings = stack.settings
        sent_messages, sent = produce(settings, messages)
        raw_rate, raw_items = raw_consume_rate(settings, sent_messages)
        worker_started = time.monotonic()
        stack.start_worker(metrics_enabled=metrics)
        first_at = first_total = None
        deadline = time.monotonic() + timeout
        while True:
            total = sum(stack.accounting().values())
            now = time.monotonic()
            if total and first_at is None:
                first_at, first_total = now, total
            if total >= sent:
                break
            if now > deadline:
                raise TimeoutError(f"{total} of {sent} accounted for after {timeout}s")
            time.sleep(0.05)
        assert first_at is not None and first_total is not None
        elapsed = now - first_at
        rate = (sent - first_total) / elapsed if elapsed > 0 else float("nan")
        counts = stack.accounting()
    return {
        "bench": "ingest",
        "events": sent,
        "messages": sent_messages,
        "events_per_message": batch_size,
        "metrics": metrics,
        "events_per_s": round(rate, 1),
        "raw_events_per_s": round(raw_rate, 1),
        "ratio_to_raw": round(rate / raw_rate, 3) if raw_rate else None,
        "worker_startup_s": round(first_at - worker_started, 2),
        "seconds": round(elapsed, 3),
        **counts,
        "accounted": sum(counts.values()) == sent,
        "raw_items_checked": raw_items,
    }
