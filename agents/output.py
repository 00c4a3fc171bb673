"""The worker's output producer: scores, training examples, dead letters and the tables' changelog records, sent
with confluent-kafka.

Outputs take a librdkafka producer, not Faust's own (aiokafka, pure Python): its batching, compression and network
I/O run in librdkafka's threads without the GIL, and a score is never queued behind a burst of changelog records
(one request in flight per broker in aiokafka) — measured on the embedded broker, that queueing was most of the
scoring latency tail. The tables send their changelog records here too (``agents.scoring.StateTable``).

Each send returns an asyncio future that resolves to the record's offset when the broker acknowledged it (or
fails with the delivery error), so a batch is acked only after its outputs are durable. Changelog records are
counted by a :class:`DeliveryTally` instead: one wait for a store group's thousands of them. The poller thread
hands the deliveries of each poll to the event loop at once: one wake-up per poll, not one per record.
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


class DeliveryTally:
    """The deliveries of many records, counted together: one wait for all of them, and the highest offset each
    partition acknowledged.

    A store group writes thousands of changelog records; a future per record, its callbacks and a gather over
    all of them cost the event loop several µs per record, in one burst when the acknowledgements arrive.
    Everything here runs on the event loop's thread (the poller hands deliveries over with the others).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sent = 0
        self.acknowledged = 0
        self.offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> highest acknowledged offset
        self.error: KafkaError | None = None
        self._waiting: asyncio.Future[None] | None = None

    def acknowledge(self, error: KafkaError | None, topic: str, partition: int, offset: int) -> None:
        self.acknowledged += 1
        if error is not None:
            self.error = self.error or error
        elif offset > self.offsets.get((topic, partition), -1):
            self.offsets[(topic, partition)] = offset
        self._wake()

    async def wait(self) -> dict[tuple[str, int], int]:
        """Until every record sent so far is acknowledged; raises the first delivery error. Returns the highest
        acknowledged offset per (topic, partition)."""
        while self.error is None and self.acknowledged < self.sent:
            self._waiting = self.loop.create_future()
            await self._waiting
        if self.error is not None:
            raise KafkaException(self.error)
        return self.offsets

    def _wake(self) -> None:
        waiting = self._waiting
        if waiting is not None and not waiting.done() and (self.error is not None or self.acknowledged >= self.sent):
            waiting.set_result(None)


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
        self._delivered: list[tuple[Any, KafkaError | None, Any]] = []  # this poll: (future or tally, error, where)
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
        self._produce(topic, value, key, delivered, extra)
        return future

    def send_counted(self, topic: str, value: bytes, tally: DeliveryTally, *, key: bytes, partition: int) -> None:
        """Queue one record whose delivery only ``tally`` counts (no future of its own)."""
        delivered_now = self._delivered

        def delivered(error: KafkaError | None, message: Any) -> None:  # in poll(), on whichever thread polls
            delivered_now.append((tally, error, (topic, partition, -1 if error else message.offset())))

        tally.sent += 1
        self._produce(topic, value, key, delivered, {"partition": partition})

    def _produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any, extra: dict[str, Any]) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=on_delivery, **extra)
                return
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


def _resolve_all(delivered: list[tuple[Any, KafkaError | None, Any]]) -> None:
    for future, error, where in delivered:
        if type(future) is DeliveryTally:
            future.acknowledge(error, *where)
            continue
        if future.done():
            continue
        if error is None:
            future.set_result(where)
        else:
            future.set_exception(KafkaException(error))
