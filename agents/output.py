"""The worker's output producer: scores, training examples and dead letters, sent with confluent-kafka.

Faust's own producer (aiokafka, pure Python) carries the table changelogs. Outputs take a separate librdkafka
producer: its batching, compression and network I/O run in librdkafka's threads without the GIL, and a score is
never queued behind a burst of changelog records (one request in flight per broker in aiokafka) — measured on
the embedded broker, that queueing was most of the scoring latency tail.

Each send returns an asyncio future that resolves to the record's offset when the broker acknowledged it (or
fails with the delivery error), so a batch is acked only after its outputs are durable. The poller thread hands
the deliveries of each poll to the event loop at once: one wake-up per poll, not one per record (a store group
writes thousands of changelog records).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Producer

from dealpulse.pipelines.settings import Settings


class Delivered(NamedTuple):
    """Where a record landed, and when the broker's acknowledgement reached the producer (epoch seconds)."""

    offset: int
    at: float


class OutputProducer:
    """An idempotent confluent-kafka producer whose deliveries resolve asyncio futures on ``loop``."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._producer = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "enable.idempotence": True,  # retries never duplicate or reorder
                "linger.ms": settings.output_linger_ms,
                "message.max.bytes": 2 * 1024 * 1024,
            }
        )
        self._delivered: list[tuple[asyncio.Future[Delivered], KafkaError | None, Delivered]] = []  # this poll
        self._polling = threading.Lock()  # one poller at a time: callbacks append to the shared list
        self._stop = threading.Event()
        # delivery callbacks are served by poll(): a thread of our own polls, so the event loop never blocks
        self._poller = threading.Thread(target=self._poll, name="output-deliveries", daemon=True)
        self._poller.start()

    def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Delivered]:
        """Queue one record; the future resolves to where and when the broker acknowledged it."""
        future: asyncio.Future[Delivered] = self.loop.create_future()
        delivered_now = self._delivered

        def delivered(error: KafkaError | None, message: Any) -> None:  # in poll(), on whichever thread polls
            delivered_now.append((future, error, Delivered(-1 if error else message.offset(), time.time())))

        extra: dict[str, Any] = {}
        if partition is not None:
            extra["partition"] = partition
        if headers:
            extra["headers"] = headers
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=delivered, **extra)
                return future
            except BufferError:  # the local queue is full: let deliveries drain (rare; bounded by back-pressure)
                self._poll_once(0.01)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for everything queued; returns how many records are still undelivered."""
        with self._polling:
            remaining = int(self._producer.flush(timeout))
            self._hand_over()
        return remaining

    def close(self, timeout: float = 30.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._poller.join(timeout=2)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._poll_once(0.05)

    def _poll_once(self, timeout: float) -> None:
        with self._polling:
            self._producer.poll(timeout)
            self._hand_over()

    def _hand_over(self) -> None:
        if self._delivered:
            delivered, self._delivered[:] = list(self._delivered), []
            self.loop.call_soon_threadsafe(_resolve_all, delivered)


def _resolve_all(delivered: list[tuple[asyncio.Future[Delivered], KafkaError | None, Delivered]]) -> None:
    for future, error, where in delivered:
        if future.done():
            continue
        if error is None:
            future.set_result(where)
        else:
            future.set_exception(KafkaException(error))
