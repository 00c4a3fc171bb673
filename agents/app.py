"""The Faust app: built by :func:`create_app` from one Settings object; all state lives in the services it makes.

Ingest agent: consumes ``dealpulse.events`` in batches (``batch_max_messages`` or ``batch_max_seconds``,
whichever first), validates and dedups every item, publishes dead letters to ``dealpulse.events.dlq`` and scores
to ``dealpulse.scores`` right away, and gathers the batches' rows into store groups (``store_flush_events`` or
``store_flush_seconds``, or when the writer is next free if it is busy then). A group is written to the store in
the background and its messages are acked only after the store accepted it — so offsets are committed only after
the store has the rows. If the store is down the writer retries with backoff, and processing stops once
``groups_in_flight`` groups wait.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT
from mode import CrashingSupervisor
from mode.utils.futures import maybe_async

from dealpulse.agents.gc_tuning import collections_deferred
from dealpulse.agents.lockstep import LockedSteps
from dealpulse.agents.metrics import IngestMetrics
from dealpulse.agents.output import Delivered, OutputProducer
from dealpulse.agents.scoring import HeldStates, ScoringService, make_tables
from dealpulse.agents.switching import SwitchIntervalPolicy, consumer_lag
from dealpulse.pipelines.contract import ContractRules
from dealpulse.pipelines.ingest import DLQ_COLUMNS, Batch, DedupState, SourceRef, process_message
from dealpulse.pipelines.keywords import KeywordTagger
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store, connect
from dealpulse.pipelines.store.writer import BatchWriter, RetryPolicy, StoreUnavailable, load_partition_state

log = logging.getLogger(__name__)

Acker = Callable[[EventT], Awaitable[Any]]  # marks a message done, so its offset may be committed
DLQ_KAFKA_PAYLOAD_LIMIT = 512 * 1024  # larger originals are truncated on the topic; the store keeps them whole


def contract_rules(settings: Settings) -> ContractRules:
    from datetime import datetime

    tagger = KeywordTagger.from_file(settings.keywords_file) if settings.keywords_file else KeywordTagger.default()
    min_ts = int(datetime.fromisoformat(settings.min_event_time).timestamp() * 1000)
    return ContractRules(min_ts, int(settings.max_future_skew_s * 1000), frozenset(settings.stages), tagger)


@dataclass
class StoreGroup:
    """Processed batches that go to the store in one insert per table, and are acked together after it."""

    ack: Acker
    batch: Batch = field(default_factory=Batch)  # the rows of all its batches
    parts: list[tuple[int, Sequence[EventT], HeldStates]] = field(default_factory=list)  # (seq, messages, states)
    deliveries: list[asyncio.Future[Any]] = field(default_factory=list)
    items: int = 0
    due: bool = False  # its time is up: it closes as soon as the writer is free

    def add(self, seq: int, events: Sequence[EventT], batch: Batch, held: HeldStates,
            deliveries: list[asyncio.Future[Any]]) -> None:  # fmt: skip
        self.batch.extend(batch)
        self.parts.append((seq, events, held))
        self.deliveries.extend(deliveries)
        self.items += len(batch)


@dataclass
class IngestService:
    """Everything the ingest agent keeps between batches, owned by one app instance."""

    settings: Settings
    store: Store
    metrics: IngestMetrics
    rules: ContractRules = field(init=False)
    dedup: DedupState = field(default_factory=DedupState)
    writer: BatchWriter = field(init=False)
    scoring: ScoringService | None = None
    output: OutputProducer | None = None  # scores, examples, dead letters (see start_output)
    stopping: bool = False
    _open: StoreGroup | None = None  # processed batches gathering for the next store write
    _in_flight: deque[asyncio.Future[None]] = field(default_factory=deque)  # closed groups being stored
    _seq: int = 0  # sequence number of the newest batch
    # (topic, partition) -> messages processed but not yet stored (open or in-flight groups)
    _unstored: Counter[tuple[str, int]] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rules = contract_rules(self.settings)
        self.writer = BatchWriter(
            self.store,
            RetryPolicy(self.settings.store_retry_initial_s, self.settings.store_retry_max_s),
            should_stop=lambda: self.stopping,
            on_retry=self._on_retry,
            on_insert=self._on_insert,
            on_read_retry=self._on_read_retry,
        )

    def start_output(self) -> None:
        """Create the output producer on the running event loop (once)."""
        if self.output is None:
            self.output = OutputProducer(self.settings, asyncio.get_running_loop())
            if self.scoring is not None:
                self.scoring.attach(self.output)

    def _on_retry(self, table: str, attempt: int, exc: Exception) -> None:
        if self.settings.metrics_enabled:
            self.metrics.insert_errors.labels(table).inc()
            self.metrics.insert_retries.labels(table).inc()
            self.metrics.store_backoff.set(1)

    def _on_read_retry(self, attempt: int, exc: Exception) -> None:
        if self.settings.metrics_enabled:
            self.metrics.store_backoff.set(1)

    def _on_insert(self, table: str, rows: int, seconds: float) -> None:
        if self.settings.metrics_enabled:
            self.metrics.insert_seconds.labels(table).observe(seconds)
            self.metrics.insert_rows.labels(table).inc(rows)
            self.metrics.store_backoff.set(0)

    async def ensure_partition_loaded(self, topic: str, partition: int, first_offset: int) -> None:
        """Load dedup state for a partition this worker just gained (from the store: the source of truth).

        Faust can deliver a message and then move the partition back (to its committed offset, after table
        recovery): positions from the earlier offset are then loaded too, so stored items are recognised as such.
        """
        loop = asyncio.get_running_loop()
        if self.dedup.needs_positions_from(topic, partition, first_offset):
            await self._store_partition(topic, partition)  # what this run wrote must be read back
            loaded_from = self.dedup.partitions[(topic, partition)].loaded_from
            _ids, accounted = await loop.run_in_executor(
                None,
                self.writer.read,
                "stored positions",
                partial(
                    load_partition_state, topic=topic, partition=partition, from_offset=first_offset, window_hours=0.0
                ),
            )
            self.dedup.add_positions(topic, partition, accounted, first_offset)
            log.info("partition %s[%d] moved back to offset %d (positions loaded from %d): %d stored positions",
                     topic, partition, first_offset, loaded_from, len(accounted))  # fmt: skip
            return
        if self.dedup.is_loaded(topic, partition):
            return
        await self._store_partition(topic, partition)  # only after a quick revoke and re-assign
        load = partial(load_partition_state, topic=topic, partition=partition, from_offset=first_offset,
                       window_hours=self.settings.dedup_window_hours)  # fmt: skip
        ids, accounted = await loop.run_in_executor(None, self.writer.read, "stored positions", load)
        self.dedup.load(topic, partition, ids, accounted, first_offset)
        log.info("partition %s[%d]: %d recent event ids, %d positions already stored from offset %d",
                 topic, partition, len(ids), len(accounted), first_offset)  # fmt: skip

    async def _store_partition(self, topic: str, partition: int) -> None:
        """Store everything processed so far if some of it came from this partition: its positions are about to
        be read back from the store. Draining for every partition a worker gains stalled processing at start-up
        (measured: 100-300 ms per partition, with nothing of that partition in flight)."""
        if self._unstored[(topic, partition)]:
            await self.drain()

    def forget(self, partitions: Sequence[TP]) -> None:
        for tp in partitions:
            self.dedup.forget(tp.topic, tp.partition)

    async def handle(self, events: Sequence[EventT], ack: Acker) -> None:
        """Process (validate, dedup, score, publish) a batch and add it to the open store group.

        Scores leave as soon as a batch is processed; the store gets the rows of many batches in one insert per
        table (a ClickHouse insert has a high fixed cost). A group closes after ``store_flush_events`` items, or
        ``store_flush_seconds`` after its first batch (later if the writer is still busy then: it closes as soon as
        the writer is free); then, in the background and in order, it waits until its DLQ records, scores and
        examples are in Kafka, writes the store, writes its entity states to the tables, and only then acks its
        messages — so offsets are committed only after the store accepted them. At most ``groups_in_flight``
        closed groups wait; past that, processing waits for the store.
        """
        self._reap()
        started = time.time()
        with collections_deferred():  # what the batch makes and drops is freed before a collection traverses it
            batch, scored, deliveries = await self._process(events)
            self._seq += 1
            held = self.scoring.hold(scored, self._seq) if self.scoring is not None and scored is not None else {}
            del scored
            batch.valid.clear()  # scored: only the rows go on to the store
        if self.settings.metrics_enabled:
            self.metrics.batch_process.observe(time.time() - started)
            for event in events[-16:]:  # the messages kafka_to_score samples
                self.metrics.kafka_to_batch.observe(max(0.0, started - event.message.timestamp))
        group = self._open
        if group is None:
            group = self._open = StoreGroup(ack)
            asyncio.get_running_loop().call_later(
                self.settings.store_flush_seconds, self._close_when_writer_free, group
            )
        group.add(self._seq, events, batch, held, deliveries)
        self._unstored.update((event.message.topic, event.message.partition) for event in events)
        if group.items >= self.settings.store_flush_events:
            self._close_group(group)
        if len(self._in_flight) > self.settings.groups_in_flight:
            waiting_since = time.monotonic()
            while len(self._in_flight) > self.settings.groups_in_flight:
                await self._in_flight.popleft()  # back-pressure; raises if that group failed
            if self.settings.metrics_enabled:
                self.metrics.store_waited.inc(time.monotonic() - waiting_since)
        self._reap()

    def _close_when_writer_free(self, group: StoreGroup) -> None:
        """The group's time is up: close it now if the writer is free, else as soon as the writer finishes.

        A store insert has a high fixed cost (~20 ms for one row into ``events`` and its views): while the writer
        is busy, the open group keeps growing instead of queueing behind it, so a slower store gets fewer, larger
        inserts rather than a queue of small ones that holds processing back.
        """
        if self._open is not group:
            return
        group.due = True
        if not any(not stored.done() for stored in self._in_flight):
            self._close_group(group)

    def _writer_finished(self, finished: asyncio.Future[None]) -> None:
        if finished.cancelled() or self.stopping:  # shutting down: drain() or the next owner takes the open group
            return
        if self._open is not None and self._open.due and all(stored.done() for stored in self._in_flight):
            self._close_group(self._open)

    def _close_group(self, group: StoreGroup) -> None:
        """Hand the group to the store (once; the timer may find it closed already)."""
        if self._open is not group:
            return
        self._open = None
        previous = self._in_flight[-1] if self._in_flight else None
        stored = asyncio.ensure_future(self._complete(previous, group))
        stored.add_done_callback(self._writer_finished)
        self._in_flight.append(stored)

    def _reap(self) -> None:
        """Drop completed groups; a group that failed fails the agent (nothing of it was acked)."""
        while self._in_flight and self._in_flight[0].done():
            self._in_flight.popleft().result()

    async def drain(self) -> None:
        """Store everything processed so far (and raise if a group failed)."""
        if self._open is not None:
            self._close_group(self._open)
        while self._in_flight:
            await self._in_flight.popleft()

    async def wait_idle(self, timeout: float) -> bool:
        """Store everything processed so far; False if it took longer than ``timeout``."""
        if self._open is not None:
            self._close_group(self._open)
        if not self._in_flight:
            return True
        _done, waiting = await asyncio.wait(list(self._in_flight), timeout=timeout)
        if not waiting:
            self._in_flight.clear()
            if self.scoring is not None:
                self.scoring.forget_pending()
        return not waiting

    async def _process(
        self, events: Sequence[EventT]
    ) -> tuple[Batch, dict[int, Any] | None, list[asyncio.Future[Any]]]:
        settings = self.settings
        now_ms = int(time.time() * 1000)
        batch = Batch()
        spans: list[tuple[int, int, int]] = []  # (partition, first, end) slices of batch.valid
        in_batch: set[tuple[int, int]] = set()
        for event in events:
            message = event.message
            if (message.partition, message.offset) in in_batch:
                # the consumer was moved back while this batch was being collected: the same message again
                if settings.metrics_enabled:
                    self.metrics.redelivered.inc()
                continue
            in_batch.add((message.partition, message.offset))
            await self.ensure_partition_loaded(message.topic, message.partition, message.offset)
            first = len(batch.valid)
            process_message(
                message.value or b"",
                SourceRef(message.topic, message.partition, message.offset),
                self.rules,
                self.dedup,
                batch,
                now_ms,
                settings.max_message_bytes,
                settings.max_events_per_message,
            )
            skipped = self.dedup.processed(message.topic, message.partition, message.offset)
            if skipped:
                self._on_offsets_skipped(message.topic, message.partition, message.offset, skipped)
            if len(batch.valid) > first:
                spans.append((message.partition, first, len(batch.valid)))
        output = self.output
        assert output is not None, "start_output() before the first batch"
        deliveries: list[asyncio.Future[Any]] = list(self._publish_dead_letters(batch, output))
        scored = None
        if self.scoring is not None:
            await self.scoring.wait_for_snapshots()
            scored = self.scoring.score_batch(events, batch, spans)
            sent: list[asyncio.Future[Any]] = list(self.scoring.publish(scored, output))
            if sent and settings.metrics_enabled:
                scores_delivered = asyncio.gather(*sent)
                scores_delivered.add_done_callback(lambda done: self._observe_scored(events, done))
                sent = [scores_delivered]
            deliveries.extend(sent)
        return batch, scored, deliveries

    def _on_offsets_skipped(self, topic: str, partition: int, offset: int, skipped: int) -> None:
        # always counted: this is the one sign of messages lost between the broker and this worker
        self.metrics.offsets_skipped.labels(topic, str(partition)).inc(skipped)
        log.error("%s[%d]: offsets %d-%d never reached this worker (next after %d was %d); they are not stored",
                  topic, partition, offset - skipped, offset - 1, offset - skipped - 1, offset)  # fmt: skip

    async def _complete(self, previous: asyncio.Future[None] | None, group: StoreGroup) -> None:
        if previous is not None:
            await previous  # groups complete in order; a failed one fails the ones after it
        await asyncio.gather(*group.deliveries)
        await asyncio.get_running_loop().run_in_executor(None, self.writer.write, group.batch)
        if self.scoring is not None:
            started = time.perf_counter()
            written = await self.scoring.commit_states(group.parts)
            if self.settings.metrics_enabled:
                self.metrics.states_commit.observe(time.perf_counter() - started)
                self.metrics.states_written.inc(written)
        for _seq, events, _held in group.parts:
            self._unstored.subtract((event.message.topic, event.message.partition) for event in events)
            for event in events:
                await group.ack(event)
        if self.settings.metrics_enabled:
            self._observe([event for _seq, events, _held in group.parts for event in events], group.batch)

    def _observe_scored(self, events: Sequence[EventT], done: asyncio.Future[list[Delivered]]) -> None:
        """Kafka append of the source message -> its scores delivered to Kafka (a sample keeps it cheap).

        Delivered is when the broker's acknowledgement of the batch's last output arrived (the producer's
        delivery report), not when the event loop got round to noticing it: a subscriber has the scores then.
        """
        if done.cancelled() or done.exception() is not None:
            return  # the group fails on it; nothing was delivered to time
        delivered = max(where.at for where in done.result())
        for event in events[-16:]:
            self.metrics.kafka_to_score.observe(max(0.0, delivered - event.message.timestamp))

    def _publish_dead_letters(self, batch: Batch, output: OutputProducer) -> list[asyncio.Future[Delivered]]:
        """Original bytes as the value, the reason and source position as headers (Kafka Connect style).

        Returns the delivery futures: the batch may be acked only after they resolved.
        """
        pending: list[asyncio.Future[Delivered]] = []
        if not batch.dlq:
            return pending
        at = {name: i for i, name in enumerate(DLQ_COLUMNS)}
        for row in batch.dlq:
            payload: bytes = row[at["payload"]]
            headers = [
                ("dealpulse.dlq.id", row[at["dlq_id"]].encode()),
                ("dealpulse.dlq.reason", row[at["reason"]].encode()),
                ("dealpulse.dlq.detail", row[at["detail"]].encode()[:1024]),
                ("dealpulse.dlq.field", row[at["field"]].encode()),
                ("dealpulse.dlq.topic", row[at["src_topic"]].encode()),
                ("dealpulse.dlq.partition", str(row[at["src_partition"]]).encode()),
                ("dealpulse.dlq.offset", str(row[at["src_offset"]]).encode()),
                ("dealpulse.dlq.index", str(row[at["src_index"]]).encode()),
            ]
            if len(payload) > DLQ_KAFKA_PAYLOAD_LIMIT:
                headers.append(("dealpulse.dlq.truncated", str(len(payload)).encode()))
                payload = payload[:DLQ_KAFKA_PAYLOAD_LIMIT]
            key = row[at["dlq_id"]].encode()
            pending.append(output.send(self.settings.dlq_topic, payload, key=key, headers=headers))
        return pending

    def _observe(self, events: Sequence[EventT], batch: Batch) -> None:
        m = self.metrics
        topic = self.settings.events_topic
        m.messages_consumed.labels(topic).inc(len(events))
        m.events_consumed.labels(topic).inc(len(batch) + batch.replay_skipped)
        validated = Counter(row[1] for row in batch.events)  # EVENT_COLUMNS: type, then ts (ms)
        for event_type, count in validated.items():
            m.events_validated.labels(event_type).inc(count)
            m.events_stored.labels(event_type).inc(count)
        for reason, count in Counter(row[1] for row in batch.dlq).items():
            m.dlq.labels(reason).inc(count)
        m.duplicates.inc(len(batch.duplicates))
        m.replay_skipped.inc(batch.replay_skipped)
        m.batch_items.observe(len(batch))
        now = time.time()
        m.last_stored.set(now)
        for event in events[-16:]:  # a sample keeps the hot path cheap
            m.kafka_to_stored.observe(max(0.0, now - event.message.timestamp))
        for row in batch.events[-64:]:
            m.event_to_stored.observe(max(0.0, now - row[2] / 1000))


def held_back(next_offset: int | None, offset: int, held_before: int | None) -> bool:
    """Whether a record must not be handed on yet: it lies past ``next_offset``, the offset Faust should see next
    (Faust would take the offsets in between for a gap, or miss one without noticing), unless the same record was
    held back before (then the gap is real).

    >>> held_back(10, 10, None), held_back(10, 11, None), held_back(10, 11, 11), held_back(None, 15, None)
    (False, True, False, False)
    """
    return next_offset is not None and offset > next_offset and held_before != offset


def next_offset_expected(read_offset: int | None, just_sought: bool) -> int | None:
    """The offset Faust should see next in a partition: the one after its read offset, or the read offset itself
    right after a seek (Faust sets its read offset to where it seeks, meaning "read from here").

    Faust's own gap check misses exactly one record after a seek: sought to 10, the first record 11 passes as if
    10 had been read (``11 - 10 == 1``) and 10's offset is committed unread.

    >>> next_offset_expected(10, just_sought=False), next_offset_expected(10, just_sought=True)
    (11, 10)
    >>> next_offset_expected(None, just_sought=True) is None  # nothing committed yet: anything goes
    True
    """
    if read_offset is None or read_offset <= 0:
        return None
    return read_offset if just_sought else read_offset + 1


class OnParentLoop:
    """Runs a mode ``ServiceThread`` (Faust's consumer "thread") as a task on its parent's event loop instead of
    in a thread of its own: it stands in for mode's ``WorkerThread``.

    Faust runs aiokafka in a thread with its own loop. Every fetch then crosses threads twice (the request to that
    loop, the records back), and that thread takes the GIL from the event loop at every switch interval while the
    worker scores. On one loop, a record reaches its batch without waiting for another thread's turn.
    """

    def __init__(self, service: Any) -> None:
        self.service = service
        self.serving: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.serving = self.service.parent_loop.create_task(self.service._serve())

    def stop(self) -> None:
        """Nothing to join: ``_serve`` ends when the service stops (mode's ``stop`` waits for its shutdown)."""

    def is_alive(self) -> bool:
        return self.serving is not None and not self.serving.done()


def _consumer_transport(wait_ms: int, gapless_topic: str, own_thread: bool) -> type[faust_aiokafka.Transport]:
    """Faust's aiokafka transport with these changes.

    - The consumer runs on the worker's event loop (:class:`OnParentLoop`), unless ``own_thread``.

    - Our fetch wait: Faust hard-codes 1500 ms, and a broker that always waits the full fetch wait when a partition
      has nothing new (Tansu, measured) adds that to every message's latency.
    - No silent gaps in ``gapless_topic`` (the events topic). After a rebalance Faust seeks each partition back to
      its committed offset, but records fetched before that seek can still arrive after it. Faust then takes the
      offsets between the seek and such a record for a gap (as in a compacted topic), counts them as acked and
      drops them when they arrive: those messages were lost and their offsets committed (measured: 4 of 11
      join-and-leave runs with scoring lost 0.9-7.9 % of their events). Here a record that lies past the next
      offset is not handed on; the partition is sought back to the offset Faust expects and read again from there.
      Offsets that are really missing (a transactional producer's control records) come back the same after that
      seek and pass.
    - Nothing of ``gapless_topic`` is handed on between an assignment and Faust's seek to the committed offsets
      that follows it. aiokafka starts fetching a newly assigned partition at once, and during table recovery
      Faust resumes the flow before its seek. Records handed on then moved Faust's read offset ahead; some of
      them were dropped when Faust suspended the flow again, and after the seek Faust took their second
      delivery for old news and dropped it too (measured: 3 of 7 join-and-leave runs lost 7-11 % of their
      events, with no warning). Not handing them on is safe: the seek reads them again, and a partition whose
      records were held back while the seek was under way is sought once more right after it.
    - Right after a seek to X the next record must be X itself (Faust's gap check lets X+1 pass as if X had been
      read), see :func:`next_offset_expected`.
    - Seeks never land inside a step of aiokafka's fetch on the consumer thread (see ``ConsumerThread.seek``);
      on the event loop they cannot.
    """

    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        # With the broker gone the thread dies on its way out (aiokafka raises NodeNotReadyError while it stops) and
        # never says it is done, so a stopping worker waited mode's default 60 s for it; a healthy one takes < 1 s
        shutdown_timeout = 5.0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._fetch_steps = threading.Lock()  # held by this thread during each step of a fetch (see seek)

        @property
        def on_parent_loop(self) -> bool:
            return self.thread_loop is self.parent_loop

        async def call_thread(self, fun: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
            if self.on_parent_loop:  # no thread to hand the call to (mode's queue would cost two loop wake-ups)
                return await maybe_async(fun(*args, **kwargs))  # some of Faust's calls are plain functions
            return await super().call_thread(fun, *args, **kwargs)

        async def _gather_remaining_tasks(self) -> None:
            # mode cancels every task left on the thread's loop when it stops: on the parent loop those are the app's
            if not self.on_parent_loop:
                await super()._gather_remaining_tasks()

        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = wait_ms  # read when the consumer starts, right after this
            return consumer

        async def _fetch_records(self, *args: Any, **kwargs: Any) -> Any:
            fetching = super()._fetch_records(*args, **kwargs)
            fetched: Mapping[Any, list[Any]] = await (
                fetching if self.on_parent_loop else LockedSteps(fetching, self._fetch_steps)
            )
            if fetched:
                now = time.time()
                newest = [
                    records[-1].timestamp for tp, records in fetched.items() if tp.topic == gapless_topic and records
                ]
                cast(DealpulseApp, self.consumer.app).records_fetched([now - ms / 1000 for ms in newest])
            return fetched

        def seek(self, partition: TP, offset: int) -> None:
            # Faust seeks from the event loop's thread while this thread drains fetched records. A seek that landed
            # inside that drain deleted the partition's records under it (KeyError: the worker exited, 2 in 10
            # join-and-leave runs) or was overwritten by the position of records fetched before it. Taking the lock
            # puts the seek between two steps of the fetch, where aiokafka expects one. Faust's own seek bookkeeping
            # is untouched: running the seek on this thread instead changed its timing and lost offsets.
            with self._fetch_steps:
                super().seek(partition, offset)

    class GaplessConsumer(faust_aiokafka.Consumer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._held_back: dict[TP, int] = {}  # partition -> the record that made us read it again
            self._sought_to: dict[TP, int] = {}  # partition -> where it was last sought back to
            self._seek_done: set[TP] = set()  # sought to the committed offset by Faust since the assignment
            self._dropped_before_seek: dict[TP, int] = {}  # partition -> lowest offset not handed on before it
            self._just_sought: set[TP] = set()  # sought, and nothing handed on since: the read offset is next

        def _new_consumer_thread(self) -> ConsumerThread:
            if own_thread:
                return ConsumerThread(self, loop=self.loop, beacon=self.beacon)
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon, thread_loop=self.loop, Worker=OnParentLoop)

        async def on_partitions_revoked(self, revoked: set[TP]) -> None:
            self._seek_done.clear()  # eager rebalancing: every partition is revoked, then assigned afresh
            self._dropped_before_seek.clear()
            self._just_sought.clear()
            await super().on_partitions_revoked(revoked)

        async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
            # positions from an earlier assignment say nothing about this one
            self._held_back.clear()
            self._sought_to.clear()
            self._seek_done.clear()
            self._dropped_before_seek.clear()
            self._just_sought.clear()
            await super().on_partitions_assigned(assigned, generation_id)

        async def perform_seek(self) -> None:
            await super().perform_seek()  # every assigned partition, to its committed offset
            # Faust's seek runs in the consumer thread, so records not handed on while it was under way may have
            # been fetched after it: nothing would fetch them again, and in a partition where nothing new arrives
            # they waited for the next restart (measured: 1 run in 5 of a restart test). Read those partitions
            # again from where Faust now expects; up to the end of this method nothing else runs on this loop.
            for tp, lowest in self._dropped_before_seek.items():
                expected = self._read_offset.get(tp)
                again_from = expected if expected is not None else lowest  # None: no committed offset yet
                log.info("%s: records arrived while seeking to the committed offsets; reading again from %d",
                         tp, again_from)  # fmt: skip
                await self.seek(tp, again_from)
            self._dropped_before_seek.clear()
            self._seek_done = set(self.assignment())
            self._just_sought.update(self._seek_done)  # Faust set their read offsets to the committed offsets

        async def getmany(self, timeout: float) -> Any:
            async for tp, message in super().getmany(timeout):
                if tp.topic == gapless_topic and tp not in self._seek_done:
                    # read again after the seek (see above and perform_seek)
                    self._dropped_before_seek[tp] = min(
                        message.offset, self._dropped_before_seek.get(tp, message.offset)
                    )
                    continue
                expected = self._read_offset[tp]  # Faust's last read offset, or where it last sought to
                offset = message.offset
                next_offset = next_offset_expected(expected, tp in self._just_sought)
                if tp.topic == gapless_topic and held_back(next_offset, offset, self._held_back.get(tp)):
                    assert next_offset is not None
                    if self._sought_to.get(tp) != next_offset:  # once per position: the rest of that fetch follows
                        self._sought_to[tp] = next_offset
                        # the first record past the gap, not the last one held: if the partition read again from
                        # next_offset starts with it, the gap is real (keeping the last one held stalled the
                        # partition for good then: every record after it was held back)
                        self._held_back[tp] = offset
                        # one offset missing is what a transaction's control record leaves: every transaction of a
                        # transactional source meets this once per partition, so it is no warning
                        log.log(logging.INFO if offset - next_offset == 1 else logging.WARNING,
                                "%s: record at offset %d arrived while offset %d was next; reading again from there",
                                tp, offset, next_offset)  # fmt: skip
                        await self.seek(tp, next_offset)
                    continue
                self._sought_to.pop(tp, None)
                if next_offset is not None and offset - next_offset == 1 and tp.topic == gapless_topic:
                    # it came first again after reading from next_offset: that offset holds no message, it is
                    # a transaction's control record, and not a message that never reached this worker
                    cast(DealpulseApp, self.app).offset_holds_no_record(tp, next_offset)
                if expected is None or offset >= expected:  # Faust drops what lies before its read offset
                    self._just_sought.discard(tp)
                yield tp, message

        async def seek(self, partition: TP, offset: int) -> None:
            await super().seek(partition, offset)
            self._just_sought.add(partition)

    class Transport(faust_aiokafka.Transport):
        Consumer = GaplessConsumer

    return Transport


class DealpulseApp(faust.App):
    """A Faust app with our consumer transport (see :func:`_consumer_transport`) and a bounded wait at shutdown."""

    def __init__(
        self,
        *args: Any,
        fetch_wait_ms: int,
        gapless_topic: str,
        shutdown_grace_s: float,
        consumer_thread: bool = False,
        **kwargs: Any,
    ) -> None:
        self.fetch_wait_ms = fetch_wait_ms
        self.consumer_thread = consumer_thread
        self.gapless_topic = gapless_topic
        self.shutdown_grace_s = shutdown_grace_s
        self.ingest_service: IngestService | None = None  # set by create_app
        super().__init__(*args, **kwargs)

    def records_fetched(self, ages_s: Sequence[float]) -> None:
        """On the consumer's loop: the newest record of each partition in a fetch it hands over, and how long ago
        Kafka appended it (the first stage of ``kafka_to_batch``)."""
        service = self.ingest_service
        if service is not None and service.settings.metrics_enabled:
            for age in ages_s:
                service.metrics.kafka_to_fetched.observe(max(0.0, age))

    def offset_holds_no_record(self, tp: TP, offset: int) -> None:
        """The consumer found that ``offset`` holds no message (a transaction's control record)."""
        if self.ingest_service is not None:
            self.ingest_service.dedup.holds_no_record(tp.topic, tp.partition, offset)

    def _new_transport(self) -> Any:
        transport = _consumer_transport(self.fetch_wait_ms, self.gapless_topic, own_thread=self.consumer_thread)
        return transport(self.conf.broker_consumer, self)

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:
        """Faust waits here, once the flow has stopped, until every message taken is acked: at a rebalance and when
        the worker stops.

        At a rebalance that wait keeps two owners from writing the same items, so it stays as it is. When stopping
        it is bounded by ``shutdown_grace_s``: a message is acked only once the store has its rows, so with the
        store down Faust's wait never ended and the worker ignored SIGTERM (measured: still running 1.5 h later).
        What is not stored by then is not acked, so it is read again after a restart: nothing is lost.
        """
        service = self.ingest_service
        if not self.should_stop or service is None:
            await super()._consumer_wait_empty(consumer, logger)
            return
        finishing = asyncio.ensure_future(self._store_and_ack_all(service, consumer, logger))
        done, _ = await asyncio.wait([finishing], timeout=self.shutdown_grace_s)
        if not done:
            finishing.cancel()
            log.warning("stopping with %d messages whose rows did not reach the store in %.0f s: they are not acked "
                        "and are read again after a restart", len(consumer._unacked_messages),
                        self.shutdown_grace_s)  # fmt: skip
        service.stopping = True  # the writer stops retrying

    async def _store_and_ack_all(self, service: IngestService, consumer: Any, logger: Any) -> None:
        try:
            await service.drain()
        except Exception as exc:  # a group that failed is not acked: its messages are read again after a restart
            log.warning("stopping after a failed store write: %s", exc)
            return
        await super()._consumer_wait_empty(consumer, logger)  # a batch that was being processed when flow stopped


def create_app(settings: Settings, metrics: IngestMetrics | None = None) -> faust.App:
    """Build the Faust app for these settings. Nothing global: two apps in one process do not share state."""
    app = DealpulseApp(
        settings.consumer_group,
        broker=f"kafka://{settings.kafka_bootstrap.replace(',', ';kafka://')}",
        store=settings.state_store,
        # raw bytes everywhere: table recovery decodes changelogs with the app defaults, not the table schema
        key_serializer="raw",
        value_serializer="raw",
        datadir=str(settings.data_dir),
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # the broker waits up to the rebalance timeout for members to join; short keeps start-up fast
        broker_session_timeout=settings.kafka_session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.kafka_session_timeout_s / 5),
        broker_rebalance_timeout=settings.kafka_session_timeout_s,
        producer_max_request_size=2 * 1024 * 1024,
        consumer_max_fetch_size=4 * 1024 * 1024,
        fetch_wait_ms=settings.kafka_fetch_wait_ms,
        consumer_thread=settings.kafka_consumer_thread,
        gapless_topic=settings.events_topic,
        shutdown_grace_s=settings.shutdown_grace_s,
        # a crashed agent stops the worker (exit code 1): Faust's default restarts the agent, but the messages the
        # crashed one had taken are never acked, so the committed offsets stop moving while the worker looks healthy
        agent_supervisor=CrashingSupervisor,
    )
    metrics = metrics or IngestMetrics()
    service = IngestService(settings, connect(settings), metrics)
    if settings.scoring_enabled:
        service.scoring = ScoringService(settings, make_tables(app, settings), metrics)
    events_topic = app.topic(
        settings.events_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
    )

    switching = SwitchIntervalPolicy(
        settings.gil_switch_interval_ms / 1000, settings.gil_switch_interval_backlog_ms / 1000, settings.backlog_after_s
    )
    next_offsets: dict[TP, int] = {}  # events-topic partition -> next offset to process (for the consumer lag)

    @app.agent(events_topic, name="ingest")
    async def ingest(stream: Any) -> None:
        service.start_output()
        adaptive = switching.backlog_s != switching.live_s
        interval = switching.live_s
        # noack_take leaves acking to us: a batch is acked once the store accepted it (see IngestService.handle)
        async for events in stream.noack_take(settings.batch_max_messages, within=settings.batch_max_seconds):
            started = time.perf_counter()
            try:
                await service.handle(events, stream.ack)
            except StoreUnavailable:
                if service.stopping:
                    return  # stopped while waiting for the store: the batch is not acked, a restart reads it again
                raise
            if adaptive:
                took = time.perf_counter() - started
                if interval == switching.backlog_s:
                    metrics.behind_seconds.inc(took)
                next_offsets.update((event.message.tp, event.message.offset + 1) for event in events)
                owned = app.consumer.assignment()  # a partition revoked meanwhile has no high watermark any more
                lag = consumer_lag(app.consumer.highwater, ((tp, o) for tp, o in next_offsets.items() if tp in owned))
                chosen = switching.after_batch(len(events), took, lag)
                if chosen != interval:
                    interval = chosen
                    sys.setswitchinterval(interval)
                    metrics.switch_interval.set(interval)
                    log.debug("GIL switch interval %.0f ms (%d messages behind)", interval * 1000, lag)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Let a batch in flight reach the store first: the next owner loads stored positions when it starts, and
        # a write landing after that load would make it process the same items again.
        if not await service.wait_idle(settings.kafka_session_timeout_s / 2):
            log.warning("a batch was still in flight when partitions were revoked; the next owner may redo it")
        service.forget(list(args[0]))  # args[0]: the revoked partitions
        for tp in args[0]:
            next_offsets.pop(tp, None)

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        service.forget(list(args[0]))  # reload from the store at the first message of each assigned partition
        owned = [tp for tp in app.consumer.assignment() if tp.topic == settings.events_topic]
        metrics.assigned_partitions.set(len(owned))
        for tp in owned:  # exported at 0 from the start: a dashboard shows "none skipped", not "no data"
            metrics.offsets_skipped.labels(tp.topic, str(tp.partition))

    @app.timer(interval=5.0)
    async def report_lag() -> None:
        consumer = app.consumer
        # the events topic only: an active worker writes its changelogs and never reads them, so their "lag" grows
        # with every state written (it fired the consumer-lag alert and filled the dashboard's lag panel)
        for tp in consumer.assignment():
            if tp.topic != settings.events_topic:
                continue
            highwater = consumer.highwater(tp)
            position = await consumer.position(tp)
            if highwater is not None and position is not None:
                metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - position))

    @app.on_before_shutdown.connect
    async def on_shutdown(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # usually done already (see DealpulseApp._consumer_wait_empty); not when the worker owned no partitions
        if not await service.wait_idle(settings.shutdown_grace_s):
            log.warning("stopping with batches still in flight: they are processed again on restart")
        service.stopping = True
        if service.output is not None:
            service.output.close()
        if service.scoring is not None:
            service.scoring.follower.stop()

    @app.task
    async def follow_model_snapshots() -> None:
        if service.scoring is not None:
            service.scoring.follower.start()

    app.ingest_service = service
    return app
