"""``dealpulse bench broker``: the embedded broker alone, with no worker. Kafka append -> a plain consumer has the
record, at the rate and message mix of ``bench score``'s latency run, and the broker's CPU, window by window.

It is the floor under ``p99_kafka_to_score_ms``: what the broker and one fetch cycle cost before a worker does
anything. Over time it also shows how the embedded broker (Tansu 0.6, memory storage) slows down as batches
accumulate: every fetch that returns records lists all the batches the partition holds, and every fetch waits
out the full fetch wait, data or not (both in its source, ``dynostore.rs`` and ``service/fetch.rs``). A worker
fetches the same way, so the same growth lies under its latency, and under a ``demo --keep-running`` that runs for
hours.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from dealpulse.agents.bench import paced, process_cpu_seconds, spread_sample
from dealpulse.agents.embedded import start_broker
from dealpulse.agents.kafka_admin import ensure_topics
from dealpulse.agents.stack import produce
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.settings import Settings

WINDOW_S = 10.0  # one line of figures per this many seconds of traffic
WARMUP_S = 2.0  # not counted: the first sends wait for the producer's id and the topic's metadata (~0.5 s)
DRAIN_TIMEOUT_S = 60.0  # after the last send, how long the consumer may take to receive the rest


def quantile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of values sorted ascending.

    >>> quantile([1.0, 2.0, 3.0, 4.0], 0.5), quantile([1.0, 2.0, 3.0, 4.0], 0.99)
    (2.0, 4.0)
    """
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]


def window_figures(
    latencies: Sequence[tuple[float, float]],
    cpu: Sequence[tuple[float, float]],
    window_s: float = WINDOW_S,
    start: float = 0.0,
) -> list[dict[str, Any]]:
    """Per window of ``window_s`` seconds from ``start``: records, p50/p99 latency (ms) and the broker's cores.

    ``latencies`` are (seconds since the start, latency in seconds) per record; ``cpu`` are (seconds since
    the start, the broker's CPU seconds so far), sampled now and then. A window's cores come from the samples
    nearest its start and its end.

    >>> received = [(0.5, 0.004), (1.5, 0.006), (2.5, 0.050), (3.5, 0.010)]
    >>> window_figures(received, [(0.0, 0.0), (2.0, 0.5), (4.0, 1.5)], window_s=2.0)
    [{'from_s': 0, 'records': 2, 'p50_ms': 4.0, 'p99_ms': 6.0, 'broker_cores': 0.25}, \
{'from_s': 2, 'records': 2, 'p50_ms': 10.0, 'p99_ms': 50.0, 'broker_cores': 0.5}]
    """
    if not latencies:
        return []
    windows = []
    end = max(at for at, _latency in latencies)
    while start <= end:
        stop = start + window_s
        ordered = sorted(latency for at, latency in latencies if start <= at < stop)
        if ordered:
            windows.append(
                {
                    "from_s": round(start),
                    "records": len(ordered),
                    "p50_ms": round(quantile(ordered, 0.5) * 1000, 1),
                    "p99_ms": round(quantile(ordered, 0.99) * 1000, 1),
                    "broker_cores": _cores_between(cpu, start, stop),
                }
            )
        start = stop
    return windows


def _cores_between(cpu: Sequence[tuple[float, float]], start: float, stop: float) -> float | None:
    if len(cpu) < 2:
        return None
    first = min(cpu, key=lambda sample: abs(sample[0] - start))
    last = min(cpu, key=lambda sample: abs(sample[0] - stop))
    if last[0] <= first[0]:
        return None
    return round((last[1] - first[1]) / (last[0] - first[0]), 2)


def bench_broker(
    workdir: Path,
    events_per_s: float,
    seconds: float,
    seed: int,
    batch_size: int,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Send ``seconds`` of generated messages at ``events_per_s`` to a fresh embedded broker (without linger, as
    ``bench score`` does) and receive them with a confluent-kafka consumer that fetches as a worker does (the
    settings' ``KAFKA_FETCH_WAIT_MS``)."""
    say = on_step or (lambda _text: None)
    budget = int(events_per_s * seconds)
    messages = spread_sample(list(pack_messages(generate_world(seed, budget).records(), batch_size)), budget)
    broker, bootstrap = start_broker(workdir)
    try:
        settings = Settings(kafka_bootstrap=bootstrap)
        ensure_topics(settings)
        received: list[tuple[float, float]] = []  # (receive time, latency) per record, epoch seconds
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "dealpulse-bench-broker",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": settings.kafka_fetch_wait_ms,
            }
        )
        # the topic is new: from offset 0, with no lookup of where each partition begins
        consumer.assign([TopicPartition(settings.events_topic, p, 0) for p in range(settings.topic_partitions)])
        _wait_until_fetching(consumer)
        stop = threading.Event()
        receiver = threading.Thread(target=_receive, args=(consumer, received, len(messages), stop), daemon=True)
        receiver.start()
        cpu: list[tuple[float, float]] = []
        started = time.time()
        sender = threading.Thread(
            target=produce, args=(settings, paced(messages, events_per_s)), kwargs={"linger_ms": 0}, daemon=True
        )
        sender.start()
        next_report = WINDOW_S
        while sender.is_alive() or (receiver.is_alive() and time.time() - started < seconds + DRAIN_TIMEOUT_S):
            used = process_cpu_seconds(broker.process.pid)
            if used is not None:
                cpu.append((time.time() - started, used))
            if time.time() - started >= next_report:
                say(f"{next_report:.0f} s of {seconds:.0f}: {len(received):,} of {len(messages):,} messages received")
                next_report += WINDOW_S
            time.sleep(0.5)
        stop.set()
        receiver.join(5)
        consumer.close()
    finally:
        broker.stop()
    # by append time: a window holds what was sent in it, however late it arrived
    latencies = [(at - latency - started, latency) for at, latency in received]
    counted = [(at, latency) for at, latency in latencies if WARMUP_S <= at < seconds]
    ordered = sorted(latency for _at, latency in counted)
    windows = window_figures(counted, cpu, start=WARMUP_S)
    return {
        "bench": "broker",
        "events_per_s_offered": round(events_per_s, 1),
        "messages_per_s_offered": round(len(messages) / seconds, 1),
        "events_per_message_mean": round(sum(items for _key, _value, items in messages) / len(messages), 1),
        "fetch_wait_ms": settings.kafka_fetch_wait_ms,
        "messages_sent": len(messages),
        "messages_received": len(received),
        "warmup_s": WARMUP_S,
        "messages_counted": len(counted),
        "p50_append_to_consumer_ms": round(quantile(ordered, 0.5) * 1000, 1) if ordered else None,
        "p99_append_to_consumer_ms": round(quantile(ordered, 0.99) * 1000, 1) if ordered else None,
        "broker_cores_first_window": windows[0]["broker_cores"] if windows else None,
        "broker_cores_last_window": windows[-1]["broker_cores"] if windows else None,
        "windows": windows,
    }


def _wait_until_fetching(consumer: Consumer, seconds: float = 1.0) -> None:
    """Poll for a moment before anything is sent: the consumer connects and starts its fetch loop, so the first
    messages measure the broker, not the consumer's start-up (~500 ms at p99 without this)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        consumer.poll(0.1)


def _receive(consumer: Consumer, received: list[tuple[float, float]], expected: int, stop: threading.Event) -> None:
    while len(received) < expected and not stop.is_set():
        message = consumer.poll(0.1)
        if message is None or message.error():
            continue
        now = time.time()
        received.append((now, now - message.timestamp()[1] / 1000))
