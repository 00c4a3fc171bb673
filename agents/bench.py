"""Benchmarks that measure the real pipeline on the embedded stack, with the raw limit in the same run."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from dealpulse.agents.bench_fs import workdir_report
from dealpulse.agents.gc_tuning import collections_deferred, worker_gc
from dealpulse.agents.stack import EmbeddedStack, WorkerProcess, produce, wait_worker_ready, worker_metric
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store
from dealpulse.pipelines.store.writer import accounting


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
    workdir: Path,
    n_events: int,
    seed: int,
    batch_size: int,
    metrics: bool = True,
    timeout: float = 900,
    framework_free_sample: list[tuple[str, bytes, int]] | None = None,
) -> dict[str, Any]:
    """Ingest (and score) a generated world on one worker; with ``framework_free_sample``, also measure the
    framework-free loop on those messages while the worker runs (:class:`FrameworkFreeSampler`)."""
    world = generate_world(seed, n_events)
    messages = list(pack_messages(world.records(), batch_size))
    with EmbeddedStack(workdir) as stack, ExitStack() as sampling:
        settings = stack.settings
        sent_messages, sent = produce(settings, messages)
        raw_rate, raw_items = raw_consume_rate(settings, sent_messages)
        free: list[WindowProbe] = []  # events and CPU seconds, in the window and over the whole accounted run
        if framework_free_sample:
            sampler = sampling.enter_context(FrameworkFreeSampler(framework_free_sample, workdir))
            free = [WindowProbe(read, at=span) for span in (MEASURED_SPAN, WHOLE_RUN)
                    for read in (sampler.events, sampler.cpu_seconds)]  # fmt: skip
        worker_started = time.monotonic()
        worker = stack.start_worker(metrics_enabled=metrics)
        # the share of the window the worker's processing stood still waiting for the store (metrics on only)
        store_wait = WindowProbe(lambda: worker_metric(worker, "dealpulse_store_wait_seconds_total"))
        # CPU each process used in the window: on two cores the store and the broker share the worker's CPU
        cpu = {
            name: WindowProbe(partial(process_cpu_seconds, pid))
            for name, pid in [("worker", worker.pid), *((p.name, p.pid) for p in stack.processes)]
        }
        # the store's CPU in the kernel: mostly creating its parts' files, which costs 100x more on some filesystems
        store_pid = next(p.pid for p in stack.processes if p.name == "store")
        store_system = WindowProbe(partial(process_cpu_seconds, store_pid, system_only=True))
        # rows per `events` insert in the window: a group grows while the writer is busy, up to its item cap
        stored_rows, inserts = (
            WindowProbe(partial(worker_metric, worker, f'dealpulse_store_insert_{name}{{table="events"}}'))
            for name in ("rows_total", "seconds_count")
        )
        probes = [*cpu.values(), store_system, *([store_wait, stored_rows, inserts] if metrics else []), *free]
        samples = accounting_samples(stack, sent, timeout, probes)
        rate, elapsed = steady_rate(samples, sent)
        counts = stack.accounting()
        rows, groups = stored_rows.growth(), inserts.growth()
        group = rows / groups if rows is not None and groups else None
        share = unstored_share(rate, settings, sent, group)
    return {
        "bench": "ingest",
        "events": sent,
        "messages": sent_messages,
        "events_per_message": batch_size,
        "metrics": metrics,
        "events_per_s": round(rate, 1),
        "raw_events_per_s": round(raw_rate, 1),
        "ratio_to_raw": round(rate / raw_rate, 3) if raw_rate else None,
        "worker_startup_s": round(samples[0][0] - worker_started, 2),
        "seconds": round(elapsed, 3),
        **counts,
        "accounted": sum(counts.values()) == sent,
        "raw_items_checked": raw_items,
        "unstored_share": share,
        "steady_state": share <= STEADY_STATE_MAX_UNSTORED_SHARE,
        "store_wait_share": store_wait.share() if metrics else None,
        "store_group_events": round(group) if group is not None else None,
        "cpu_cores": {name: probe.share() for name, probe in cpu.items()},
        "store_system_cores": store_system.share(),
        **workdir_report(workdir),
        # a run too short for a burst in its window (not a steady state anyway) falls back to its whole span
        **({"framework_free_events_per_s_during": rate_from(*free[:2]) or rate_from(*free[2:])} if free else {}),
    }


STEADY_STATE_MAX_UNSTORED_SHARE = 0.1  # the window leaves out the last 20 %; the drain must fit well inside it


def unstored_share(events_per_s: float, settings: Settings, events: int, group: float | None = None) -> float:
    """The largest share of a run that a worker holds processed but not yet stored (its open store group and the
    groups in flight) at ``events_per_s``, with store groups of ``group`` events (the mean measured in the window;
    without it, what ``store_flush_seconds`` gathers at that rate).

    The accounted count lags processing by up to this much, and once the worker has consumed everything that lag
    drains faster than the steady state (the store then has the CPU to itself). A 200k-event run at ~30k events/s
    holds up to ~22 % of it in flight: its 20-80 % window then ends in the drain and read ~15 % high (measured: 27-31k
    events/s mid-run, 65k in the last fifth). While the store writer is busy a group keeps growing (up to
    ``store_flush_events``), so a worker at its limit holds larger groups than the timer alone would make.
    :func:`bench_ingest` reports it; keep it at or below ``STEADY_STATE_MAX_UNSTORED_SHARE``.

    >>> unstored_share(30_000, Settings(), 1_000_000)
    0.045
    >>> unstored_share(30_000, Settings(), 200_000)
    0.225
    >>> unstored_share(30_000, Settings(), 1_000_000, group=50_000)  # groups grew while the writer was busy
    0.15
    >>> unstored_share(float("nan"), Settings(), 30_000)  # no rate: the whole run may be in flight
    1.0
    """
    if not math.isfinite(events_per_s):  # too short to measure a rate: a group may hold up to its item cap
        events_per_s = float(settings.store_flush_events) / settings.store_flush_seconds
    if group is None:
        group = min(settings.store_flush_events, events_per_s * settings.store_flush_seconds)
    return round(min(1.0, (settings.groups_in_flight + 1) * group / events), 3)


# Each poll is a query the store answers on the cores the worker runs on: at 20 polls a second they took a third of
# the embedded store's CPU in a 600k-event run (1.7 s of 4.7 s). The count changes once per store group (~0.5 s),
# so 5 polls a second still see every change, and late by the same 0.1 s on average at both ends of the window.
ACCOUNTING_POLL_S = 0.2
MEASURED_SPAN = (0.2, 0.8)  # throughput is measured while the accounted count goes between these fractions of a run
WHOLE_RUN = (0.0, 1.0)  # a WindowProbe span: from the first accounted item to the last


@dataclass
class WindowProbe:
    """Reads a counter of seconds (e.g. a worker's ``dealpulse_store_wait_seconds_total``) where the measuring
    window starts and ends, and gives the share of the window it grew by.

    >>> waited = iter([2.0, 5.0])
    >>> probe = WindowProbe(lambda: next(waited))
    >>> for now, total in [(0.0, 10), (1.0, 30), (4.0, 50), (11.0, 85)]:
    ...     probe.offer(now, total, sent=100)
    >>> probe.share()
    0.3
    """

    read: Callable[[], float | None]
    at: tuple[float, float] = MEASURED_SPAN
    readings: dict[float, tuple[float, float | None]] = field(default_factory=dict)

    def offer(self, now: float, total: int, sent: int) -> None:
        for fraction in self.at:
            if fraction not in self.readings and total >= fraction * sent:
                self.readings[fraction] = (now, self.read())

    def growth(self) -> float | None:
        """How much the counter grew in the window; None if a reading is missing."""
        (_, first), (_, last) = (self.readings.get(f, (0.0, None)) for f in self.at)
        return None if first is None or last is None else last - first

    def share(self) -> float | None:
        """None if a reading is missing (the counter is not exported, or the run ended first)."""
        (start, first), (end, last) = (self.readings.get(f, (0.0, None)) for f in self.at)
        if first is None or last is None or end <= start:
            return None
        return round((last - first) / (end - start), 3)


def process_cpu_seconds(pid: int, system_only: bool = False) -> float | None:
    """CPU seconds (user + system, or only system with ``system_only``) a process has used so far; None where
    ``/proc`` does not tell (not Linux, or the process is gone).

    >>> import os
    >>> (process_cpu_seconds(os.getpid()) or 0.0) > 0, process_cpu_seconds(-1)
    (True, None)
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name in parentheses may hold spaces
    ticks = int(fields[12]) if system_only else int(fields[11]) + int(fields[12])  # utime, stime: fields 14, 15
    return ticks / os.sysconf("SC_CLK_TCK")


def accounting_samples(
    stack: EmbeddedStack, sent: int, timeout: float, probes: Sequence[WindowProbe] = ()
) -> list[tuple[float, int]]:
    """(monotonic time, items accounted for) at every change, until all ``sent`` items are accounted for; each
    change is offered to the ``probes``."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while True:
        total = sum(stack.accounting().values())
        now = time.monotonic()
        if total and (not samples or samples[-1][1] != total):
            samples.append((now, total))
            for probe in probes:
                probe.offer(now, total, sent)
        if total >= sent:
            return samples
        if now > deadline:
            raise TimeoutError(f"{total} of {sent} accounted for after {timeout}s")
        time.sleep(ACCOUNTING_POLL_S)


def steady_rate(
    samples: list[tuple[float, int]], total: int, low: float = MEASURED_SPAN[0], high: float = MEASURED_SPAN[1]
) -> tuple[float, float]:
    """Items per second while the accounted count went from ``low`` to ``high`` of ``total``, and that span.

    ``samples`` are (time, items accounted for) in time order. A worker processes ahead of what the store has
    accounted for (the groups in flight), so counting from the first stored group credits the window with work
    done before it; between two points in the steady state the lead is the same at both ends. The first and
    last fifth (start-up, partition loads, the last partial group) are left out.

    >>> steady_rate([(0.0, 10), (1.0, 30), (2.0, 50), (3.0, 80), (4.0, 100)], 100)
    (25.0, 2.0)
    """
    start = next(sample for sample in samples if sample[1] >= low * total)
    end = next(sample for sample in samples if sample[1] >= high * total)
    if end[0] <= start[0]:
        return float("nan"), 0.0
    return (end[1] - start[1]) / (end[0] - start[0]), end[0] - start[0]


def _longest_stall(samples: list[tuple[float, int, int]], start: float, end: float) -> float:
    """Longest stretch in [start, end] in which nothing new was accounted for although sent events were waiting.

    ``samples`` are (monotonic time, items sent, items accounted for), in time order.
    """
    longest = 0.0
    stalled_since: float | None = None
    last_accounted = -1
    for at, sent, accounted in samples:
        if at < start or at > end:
            continue
        if accounted != last_accounted or sent <= accounted:
            if stalled_since is not None:
                longest = max(longest, at - stalled_since)
            stalled_since = at if sent > accounted else None
            last_accounted = accounted
    return longest


def paced(messages: list[tuple[str, bytes, int]], events_per_s: float) -> Iterator[tuple[str, bytes, int]]:
    """``messages`` at ``events_per_s`` (counting each message's items), from now on."""
    started = time.monotonic()
    sent = 0
    for message in messages:
        delay = started + sent / events_per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent += message[2]
        yield message


def rebalance_scenario(
    settings: Settings,
    store: Store,
    start_worker: Callable[[], WorkerProcess],
    messages: list[tuple[str, bytes, int]],
    events_per_s: float,
    timeout: float = 600,
) -> dict[str, Any]:
    """A steady stream; worker B joins the group of worker A mid-stream, then A leaves mid-stream.

    Returns the timings and the final accounting; the caller checks exactness (nothing lost or doubled).
    """
    total = sum(items for _, _, items in messages)
    sent_so_far = [0]
    samples: list[tuple[float, int, int]] = []
    finished = threading.Event()
    failures: list[BaseException] = []

    def producing() -> None:
        try:
            produce(settings, paced(messages, events_per_s), on_progress=lambda n: sent_so_far.__setitem__(0, n))
            sent_so_far[0] = total
        except BaseException as error:  # surfaced in the main thread
            failures.append(error)

    def sampling() -> None:
        while not finished.is_set():
            samples.append((time.monotonic(), sent_so_far[0], sum(accounting(store).values())))
            time.sleep(0.05)

    def wait_for(condition: Callable[[], bool], what: str) -> float:
        deadline = time.monotonic() + timeout
        while not condition():
            if failures:
                raise failures[0]
            if time.monotonic() > deadline:
                sent, accounted = sent_so_far[0], (samples[-1][2] if samples else 0)
                raise TimeoutError(f"timed out waiting for {what}: {accounted} of {total} events accounted for, "
                                   f"{sent} sent")  # fmt: skip
            time.sleep(0.05)
        return time.monotonic()

    def owned(worker: WorkerProcess) -> float:
        return worker_metric(worker, "dealpulse_assigned_partitions") or 0

    first = start_worker()
    wait_worker_ready(first)
    producer = threading.Thread(target=producing, name="paced-producer", daemon=True)
    sampler = threading.Thread(target=sampling, name="progress-sampler", daemon=True)
    producer.start()
    sampler.start()
    try:
        wait_for(lambda: bool(samples) and samples[-1][2] >= total * 0.1, "the first worker to make progress")
        join_started = time.monotonic()
        second = start_worker()
        join_done = wait_for(
            lambda: owned(second) > 0 and owned(first) + owned(second) == settings.topic_partitions,
            "both workers to own partitions",
        )
        time.sleep(2.0)  # both working for a while
        leave_started = time.monotonic()
        sent_at_leave = sent_so_far[0]
        first.process.terminate()  # graceful: Faust commits and leaves the group
        leave_done = wait_for(lambda: owned(second) == settings.topic_partitions, "the second worker to own all")
        first.process.wait(60)
        producer.join(timeout)
        wait_for(lambda: sum(accounting(store).values()) >= total, "every event to be accounted for")
    finally:
        finished.set()
        sampler.join()
    if failures:
        raise failures[0]
    after = 3.0  # a pause shows as a gap in progress shortly after the group settled
    return {
        "events": total,
        "events_per_s_offered": events_per_s,
        "join_s": round(join_done - join_started, 2),
        "join_longest_stall_s": round(_longest_stall(samples, join_started, join_done + after), 2),
        "leave_s": round(leave_done - leave_started, 2),
        "leave_longest_stall_s": round(_longest_stall(samples, leave_started, leave_done + after), 2),
        "stream_flowing_at_leave": sent_at_leave < total,
        **accounting(store),
    }


def bench_scale(
    workdir: Path,
    n_events: int,
    seed: int,
    batch_size: int,
    partitions: int = 4,
    rebalance_events: int = 90_000,
    rebalance_rate: float = 3_000,
    timeout: float = 900,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Throughput of 1 vs 2 workers on the same stream, and join/leave rebalance times under a steady stream."""
    say = on_step or (lambda _text: None)
    messages = list(pack_messages(generate_world(seed, n_events).records(), batch_size))
    result: dict[str, Any] = {"bench": "scale", "events": sum(m[2] for m in messages), "partitions": partitions}
    for n_workers in (1, 2):
        say(f"throughput with {n_workers} worker(s)")
        with EmbeddedStack(workdir / f"workers-{n_workers}", topic_partitions=partitions) as stack:
            workers = [stack.start_worker() for _ in range(n_workers)]
            for worker in workers:
                stack.wait_worker_ready(worker)
            deadline = time.monotonic() + 120
            while sum(worker_metric(w, "dealpulse_assigned_partitions") or 0 for w in workers) != partitions:
                if time.monotonic() > deadline:
                    raise TimeoutError("the workers did not settle on an assignment")
                time.sleep(0.1)
            _, sent = produce(stack.settings, messages)
            rate, _elapsed = steady_rate(accounting_samples(stack, sent, timeout), sent)
            result[f"events_per_s_{n_workers}_worker{'s' if n_workers > 1 else ''}"] = round(rate, 1)
            result[f"accounted_{n_workers}"] = sum(stack.accounting().values()) == sent
            # each worker holds its own groups: together, the same share of the stream as one worker at that rate
            result["unstored_share"] = max(
                result.get("unstored_share", 0.0), unstored_share(rate, stack.settings, sent)
            )
    result["steady_state"] = result["unstored_share"] <= STEADY_STATE_MAX_UNSTORED_SHARE
    result["speedup_2_vs_1"] = round(result["events_per_s_2_workers"] / result["events_per_s_1_worker"], 2)

    say("rebalance: a worker joins, then one leaves, under a steady stream")
    world = generate_world(seed + 1, rebalance_events)
    valid = len({orjson.loads(r.value)["event_id"] for r in world.records() if r.kind == "valid"})
    with EmbeddedStack(workdir / "rebalance", topic_partitions=partitions) as stack:
        scenario = rebalance_scenario(
            stack.settings,
            stack.store,
            stack.start_worker,
            list(pack_messages(world.records(), batch_size)),
            rebalance_rate,
            timeout,
        )
        unique = stack.store.query_rows("SELECT uniqExact(event_id) FROM events")[0][0]
    result["rebalance"] = {**scenario, "valid_events_sent": valid, "unique_events_stored": unique}
    return result


QUERY_BENCH = {  # the BI views; the CLI's report queries are added in bench_query
    "funnel": "SELECT * FROM funnel",
    "stage_dwell": "SELECT * FROM stage_dwell",
    "stalled_opportunities": "SELECT * FROM stalled_opportunities",
    "sales_health": "SELECT * FROM sales_health",
    "customer_health_warnings": "SELECT count() FROM customer_health WHERE status = 'warn'",
}


def bench_query(
    workdir: Path,
    n_events: int,
    seed: int,
    chunk_events: int = 500_000,
    repeats: int = 3,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Load ``n_events`` generated events, then time every BI view / report query on the embedded store.

    One world of ``chunk_events`` goes through the ingest core (validation, dedup, writer); the rest are copies of
    it with fresh ids made by ``INSERT … SELECT`` inside the store, so the materialized views see every insert.
    """
    from datetime import UTC, datetime

    from dealpulse.agents.loader import load_direct
    from dealpulse.pipelines.analytics import report_query

    say = on_step or (lambda _text: None)
    result: dict[str, Any] = {"bench": "query"}
    with EmbeddedStack(workdir) as stack:
        store = stack.store
        say(f"generating and ingesting {min(chunk_events, n_events):,} events")
        world = generate_world(seed, min(chunk_events, n_events))
        started = time.perf_counter()
        load_direct(store, stack.settings, pack_messages(world.records(), 100), messages_per_batch=2000)
        ingest_s = time.perf_counter() - started
        base = store.query_rows("SELECT count() FROM events")[0][0]
        result["ingest_core_events_per_s"] = round(base / ingest_s, 1)
        copies = max(0, -(-n_events // base) - 1)
        columns = ", ".join(EVENT_COPY_COLUMNS)
        started = time.perf_counter()
        for copy in range(1, copies + 1):
            say(f"copy {copy}/{copies}")
            store.command(f"INSERT INTO events SELECT {columns.format(prefix=f'c{copy}-')} FROM events "
                          f"WHERE src_topic = 'direct-load'")  # fmt: skip
        copy_s = time.perf_counter() - started
        total = store.query_rows("SELECT count() FROM events")[0][0]
        result["events"] = total
        result["copy_events_per_s"] = round((total - base) / copy_s, 1) if copies else None
        result["stage_events"] = store.query_rows("SELECT count() FROM stage_events")[0][0]
        queries: dict[str, tuple[str, dict[str, Any] | None]] = {k: (v, None) for k, v in QUERY_BENCH.items()}
        queries["funnel_by_region"] = report_query("funnel", by="region")
        queries["funnel_as_of_window_14d"] = report_query(
            "funnel", since=datetime(2026, 7, 1, tzinfo=UTC), until=datetime(2026, 9, 1, tzinfo=UTC), window_days=14
        )
        queries["dwell_by_product_line"] = report_query("dwell", by="product_line")
        timings: dict[str, dict[str, float]] = {}
        for name, query in queries.items():
            say(f"query {name}")
            sql, params = query
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                store.query_rows(sql, params)
                seconds.append(time.perf_counter() - started)
            timings[name] = {"median_s": round(sorted(seconds)[len(seconds) // 2], 3), "max_s": round(max(seconds), 3)}
        result["queries"] = timings
        result["slowest_s"] = max(t["max_s"] for t in timings.values())
    return result


# a copy of an event with fresh ids (its own account, lead, opportunity and event id) and a distinct source topic
EVENT_COPY_COLUMNS = (
    "concat('{prefix}', event_id)",
    "type",
    "ts",
    "tz_offset_min",
    "concat('{prefix}', account_id)",
    "if(lead_id = '', '', concat('{prefix}', lead_id))",
    "if(opportunity_id = '', '', concat('{prefix}', opportunity_id))",
    "source",
    "props",
    "keywords",
    "'bench-copy'",
    "src_partition",
    "src_offset",
    "src_index",
    "ingested_at",
)


class FrameworkFreeLoop:
    """The per-event work of the worker (decode, validate, dedup, features, both models' prior) in a plain loop:
    no Kafka, no Faust, no store. Run it under :func:`worker_gc`, as the worker runs."""

    def __init__(self) -> None:
        from dealpulse.pipelines.contract import ContractRules
        from dealpulse.pipelines.features import FeatureSpec
        from dealpulse.pipelines.ingest import DedupState
        from dealpulse.pipelines.scoring import EntityStates, Scorer

        spec = FeatureSpec.default()
        self.scorer = Scorer.from_settings(spec, Settings())  # as a worker with the default settings runs it
        self.rules = ContractRules.default()
        self.dedup = DedupState()
        self.states = EntityStates(lambda entity, key: None, spec.fingerprint)
        self.offset = 0
        self.now_ms = int(time.time() * 1000)

    def run(self, messages: Sequence[tuple[str, bytes, int]]) -> int:
        """Process ``messages`` (as the next offsets of one partition); returns the items they held."""
        from dealpulse.pipelines.ingest import Batch, SourceRef, process_message
        from dealpulse.pipelines.scoring import Output

        scorer, rules, dedup, states, now_ms = self.scorer, self.rules, self.dedup, self.states, self.now_ms
        events = 0
        for _key, value, _items in messages:
            with collections_deferred():  # as the worker defers them per batch
                batch = Batch()
                process_message(value, SourceRef("bench", 0, self.offset), rules, dedup, batch, now_ms)
                out = Output()
                for event in batch.valid:
                    scorer.process_into(event, states, {}, out)
                events += len(batch)
                self.offset += 1
                del batch, out
        return events


def framework_free_score_rate(messages: list[tuple[str, bytes, int]]) -> tuple[float, int]:
    """Events per second of :class:`FrameworkFreeLoop` over ``messages``, under the worker's garbage-collector
    settings."""
    loop = FrameworkFreeLoop()
    with worker_gc():  # the worker's collector settings: both sides of the ratio collect alike
        started = time.perf_counter()
        events = loop.run(messages)
        elapsed = time.perf_counter() - started
    return events / elapsed, events


SAMPLER_EVENTS = 400_000  # messages enough for ~4 min of bursts (then it starts again)
SAMPLER_BURST_MESSAGES = 20  # ~900 events, ~20 ms ...
SAMPLER_PAUSE_S = 0.5  # ... then a pause: ~4 % of a core, mostly the share the worker leaves idle on two cores


def _sample_framework_free(sample_file: str, events: Any, cpu_seconds: Any, stop: Any) -> None:
    """The sampler process: bursts of the framework-free loop with pauses, adding each burst's events and CPU time
    (this thread's only: time waiting for a core is not counted) to the shared counters."""
    import pickle

    messages = pickle.loads(Path(sample_file).read_bytes())
    with worker_gc():
        loop = FrameworkFreeLoop()
        loop.run(messages[:SAMPLER_BURST_MESSAGES])  # warm-up, not counted
        at = SAMPLER_BURST_MESSAGES
        while not stop.wait(SAMPLER_PAUSE_S):
            if at + SAMPLER_BURST_MESSAGES > len(messages):  # used up: start again with fresh state (no duplicates)
                loop, at = FrameworkFreeLoop(), 0
            started = time.thread_time()
            done = loop.run(messages[at : at + SAMPLER_BURST_MESSAGES])
            used = time.thread_time() - started
            at += SAMPLER_BURST_MESSAGES
            with events.get_lock(), cpu_seconds.get_lock():
                events.value += done
                cpu_seconds.value += used


class FrameworkFreeSampler:
    """The framework-free loop measured *while* the worker runs, in a process of its own.

    The loop's speed before and after a worker's run can differ by 20 % on a shared machine (the cores' speed
    drifts within minutes). Short bursts with pauses, spread over the worker's run, measure it at the same time
    and under the same contention; each burst counts its own CPU time, so the rate is the loop's compute limit at
    that moment. Read the counters with :class:`WindowProbe`: ``events`` and ``cpu_seconds``.
    """

    def __init__(self, messages: list[tuple[str, bytes, int]], workdir: Path) -> None:
        import multiprocessing
        import pickle

        context = multiprocessing.get_context("spawn")  # the bench process runs librdkafka threads: no fork
        self._file = workdir / "framework-free-sample.pickle"
        self._file.write_bytes(pickle.dumps(messages))
        self._events = context.Value("q", 0)
        self._cpu = context.Value("d", 0.0)
        self._stop = context.Event()
        self._process = context.Process(
            target=_sample_framework_free,
            args=(str(self._file), self._events, self._cpu, self._stop),
            name="framework-free-sampler",
            daemon=True,
        )

    def events(self) -> float:
        return float(self._events.value)

    def cpu_seconds(self) -> float:
        return float(self._cpu.value)

    def __enter__(self) -> FrameworkFreeSampler:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
        self._file.unlink(missing_ok=True)


def rate_from(events: WindowProbe, cpu_seconds: WindowProbe) -> float | None:
    """Events per CPU second in the window, from two probes of cumulative counters; None without readings.

    >>> events, cpu = WindowProbe(lambda: 0.0), WindowProbe(lambda: 0.0)
    >>> events.readings, cpu.readings = {0.2: (1.0, 100.0), 0.8: (9.0, 4100.0)}, {0.2: (1.0, 0.5), 0.8: (9.0, 0.6)}
    >>> rate_from(events, cpu)
    40000.0
    """
    done, used = events.growth(), cpu_seconds.growth()
    return round(done / used, 1) if done and used else None


def histogram_quantile(text: str, name: str, q: float) -> float | None:
    r"""``histogram_quantile`` as Prometheus computes it (linear within the bucket), from /metrics text.

    >>> text = 'x_bucket{le="0.01"} 50.0\nx_bucket{le="0.05"} 90.0\nx_bucket{le="+Inf"} 100.0'
    >>> round(histogram_quantile(text, "x", 0.7), 3)
    0.03
    """
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return None


def score_latency_at(
    workdir: Path, messages: list[tuple[str, bytes, int]], events_per_s: float, warmup_s: float = 2.0, **overrides: Any
) -> dict[str, Any]:
    """p50/p99 Kafka append -> scores delivered to Kafka, in steady state, with events offered at ``events_per_s``.

    The worker runs with its default settings (``overrides`` change them). The first ``warmup_s`` seconds of
    messages are a warm-up: the quantiles count only what the worker observed after they were all accounted for,
    so they describe a running worker, not its start (group join, partition loads, snapshot catch-up). The stream
    does not pause at that point: a pause let the worker go idle, and the first ~250 ms after it (70-100 ms each,
    measured) were then most of the p99. Sources send without linger, so a message's timestamp is when it was
    appended, as the metric says. The stages say where the time went: Kafka append -> its batch starts processing
    (fetch, hand-off, queueing behind earlier batches), and the batch's processing; the rest is delivery.
    """
    from dealpulse.agents.stack import metrics_text

    name = "dealpulse_kafka_to_score_seconds"
    cut, items = 0, 0
    while cut < len(messages) // 4 and items < warmup_s * events_per_s:
        items += messages[cut][2]
        cut += 1
    warmed = sum(message[2] for message in messages[:cut])
    with EmbeddedStack(workdir, **overrides) as stack:
        worker = stack.start_worker()
        wait_worker_ready(worker)
        before: list[str] = []

        pids = {"worker": worker.pid, **{p.name: p.pid for p in stack.processes}}
        cpu_before: list[tuple[float, dict[str, float | None]]] = []

        def scrape_after_warmup() -> None:  # the only user of the store client until it is done
            stack.wait_accounted(warmed, 600)
            before.append(metrics_text(worker))
            cpu_before.append(cpu_reading(pids))

        watcher = threading.Thread(target=scrape_after_warmup, name="warm-up-watcher", daemon=True)
        watcher.start()
        _, total = produce(stack.settings, paced(messages, events_per_s), linger_ms=0)
        watcher.join(600)
        if not before:
            raise TimeoutError(f"the warm-up ({warmed} items) was not accounted for in 600 s")
        stack.wait_accounted(total, 600)
        after = metrics_text(worker)
        cores = cores_between(cpu_before[0], cpu_reading(pids))
        text = _histogram_delta(before[0], after, name)
    p50 = histogram_quantile(text, name, 0.5)
    p99 = histogram_quantile(text, name, 0.99)
    fs = workdir_report(workdir)  # after the run: the probe's own files stay out of its way
    stages = {}  # where the latency went: waiting for processing, and processing (per batch)
    for stage, metric in (("kafka_to_fetched", "dealpulse_kafka_to_fetched_seconds"),
                          ("kafka_to_batch", "dealpulse_kafka_to_batch_seconds"),
                          ("batch_process", "dealpulse_batch_process_seconds")):  # fmt: skip
        stage_text = _histogram_delta(before[0], after, metric)
        for q in (0.5, 0.99):
            value = histogram_quantile(stage_text, metric, q)
            stages[f"p{round(q * 100)}_{stage}_ms"] = round(value * 1000, 1) if value is not None else None
    behind = "dealpulse_behind_seconds_total"  # > 0: part of the window ran with the backlog switch interval
    return {
        "latency_events_per_s_offered": round(events_per_s, 1),
        "latency_behind_s": round(_sample(after, behind) - _sample(before[0], behind), 3),
        "latency_events": total - warmed,
        "latency_warmup_events": warmed,
        "latency_samples": int(_histogram_count(text, name)),
        "p50_kafka_to_score_ms": round(p50 * 1000, 1) if p50 is not None else None,
        "p99_kafka_to_score_ms": round(p99 * 1000, 1) if p99 is not None else None,
        **stages,
        "latency_cpu_cores": cores,  # after the warm-up: on two cores, what the worker had to share
        "workdir_fs": fs["workdir_fs"],
        "latency_workdir_file_create_us": fs["workdir_file_create_us"],
    }


def cpu_reading(pids: dict[str, int]) -> tuple[float, dict[str, float | None]]:
    """(now, CPU seconds of each named process, and of the store in the kernel as ``store_system``)."""
    seconds = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    if "store" in pids:
        seconds["store_system"] = process_cpu_seconds(pids["store"], system_only=True)
    return time.monotonic(), seconds


def cores_between(
    start: tuple[float, dict[str, float | None]], end: tuple[float, dict[str, float | None]]
) -> dict[str, float | None]:
    """Cores each process used between two :func:`cpu_reading` s (None where a reading is missing).

    >>> cores_between((0.0, {"worker": 1.0, "store": None}), (2.0, {"worker": 2.5, "store": 3.0}))
    {'worker': 0.75, 'store': None}
    """
    elapsed = end[0] - start[0]
    cores: dict[str, float | None] = {}
    for name, first in start[1].items():
        last = end[1].get(name)
        cores[name] = round((last - first) / elapsed, 3) if first is not None and last is not None and elapsed else None
    return cores


def _histogram_count(text: str, name: str) -> float:
    r"""Observations in a histogram's /metrics text (its +Inf bucket).

    >>> _histogram_count('x_bucket{le="0.1"} 3.0\nx_bucket{le="+Inf"} 5.0', "x")
    5.0
    """
    for line in text.splitlines():
        if line.startswith(name + '_bucket{le="+Inf"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def spread_sample(messages: list[tuple[str, bytes, int]], events: int) -> list[tuple[str, bytes, int]]:
    """About ``events`` events of ``messages``: every k-th message, in order, so that the sample has the whole
    list's mix of message sizes.

    The head of a generated list is not like the rest: a malformed record is sent alone at once, while an account's
    100-event message fills later (the first 2,450 messages of a 1M-event world carry 8.8 events each, the whole
    list 44), and a worker pays per message as well as per event.

    >>> messages = [("bad", b"{", 1)] * 50 + [("acc", b"[]", 100)] * 50
    >>> picked = spread_sample(messages, 1000)
    >>> len(picked), sum(m[2] for m in picked) / len(picked)  # the list's mean is 50.5; its head's would be 16.8
    (20, 50.5)
    """
    stride = max(1, sum(message[2] for message in messages) // max(1, events))
    picked, total = [], 0
    for message in messages[::stride]:
        if total >= events:
            break
        picked.append(message)
        total += message[2]
    return picked


class TooShortToMeasure(Exception):
    """The store accounted for the whole measuring window (20-80 % of the run) in one write: there is no rate."""

    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result
        super().__init__(
            f"{result['events']:,} events are too few to measure a rate: the store accounted for the middle 60 % of "
            "the run in one write"
        )


LATENCY_SECONDS = 20.0  # of traffic, without a pause ...
LATENCY_WARMUP_S = 5.0  # ... the first of which are warm-up


def bench_latency(
    workdir: Path, events_per_s: float, seed: int, batch_size: int, messages: list[tuple[str, bytes, int]] | None = None
) -> dict[str, Any]:
    """Kafka append -> score latency at ``events_per_s`` offered (the second half of :func:`bench_score`), on
    ``LATENCY_SECONDS`` of events picked across ``messages`` (or a generated world's) so that they have its mix of
    message sizes."""
    budget = int(events_per_s * LATENCY_SECONDS)
    if messages is None or budget > sum(items for _key, _value, items in messages):
        messages = list(pack_messages(generate_world(seed, budget).records(), batch_size))
    picked = spread_sample(messages, budget)
    return {
        "latency_events_per_message_mean": round(sum(items for _key, _value, items in picked) / len(picked), 1),
        **score_latency_at(workdir, picked, events_per_s, warmup_s=LATENCY_WARMUP_S),
    }


def cpu_per_event(cores: dict[str, float | None], events_per_s: float, free_events_per_s: float) -> dict[str, Any]:
    """CPU microseconds per event of each process in the measuring window, and the worker's CPU against the
    framework-free loop's (a ratio of CPU, not of rates: what a worker that never waited and had its core to
    itself would reach).

    >>> cpu_per_event({"worker": 0.9, "store": 0.4, "broker": None}, 20_000, 40_000)
    {'cpu_us_per_event': {'worker': 45.0, 'store': 20.0, 'broker': None}, 'framework_free_us_per_event': 25.0, 'framework_free_to_worker_cpu': 0.556}
    """
    per_event = {name: None if used is None else round(used / events_per_s * 1e6, 1) for name, used in cores.items()}
    free_us = 1e6 / free_events_per_s
    worker_us = per_event.get("worker")
    return {
        "cpu_us_per_event": per_event,
        "framework_free_us_per_event": round(free_us, 1),
        "framework_free_to_worker_cpu": round(free_us / worker_us, 3) if worker_us else None,
    }


def bench_score(workdir: Path, n_events: int, seed: int, batch_size: int) -> dict[str, Any]:
    """The full path (ingest + state + both models + store) on one worker, the framework-free limit (measured
    before and after the worker's run), and the p99 latency at half of the measured rate."""
    world = generate_world(seed, n_events)
    messages = list(pack_messages(world.records(), batch_size))
    free_before, _ = framework_free_score_rate(messages)
    for part in ("throughput", "latency"):
        (workdir / part).mkdir(parents=True, exist_ok=True)
    full = bench_ingest(
        workdir / "throughput", n_events, seed, batch_size, metrics=True,
        framework_free_sample=spread_sample(messages, SAMPLER_EVENTS),
    )  # fmt: skip
    # Measured again once the worker is done: on a shared machine the speed of the cores drifts within minutes
    # (the loop read 29-41k events/s in runs an hour apart), and the mean of both sides of the worker's run is
    # the better estimate of the speed it ran at. Both are reported, so a drift shows.
    free_after, _ = framework_free_score_rate(messages)
    free_rate = (free_before + free_after) / 2
    during = full["framework_free_events_per_s_during"]
    rate = full["events_per_s"]
    if not math.isfinite(rate):  # the latency half needs a rate to offer half of
        raise TooShortToMeasure(full)
    latency = bench_latency(workdir / "latency", rate / 2, seed, batch_size, messages)
    return {
        "bench": "score",
        "events": full["events"],
        "events_per_message": batch_size,
        "events_per_message_mean": round(full["events"] / full["messages"], 1),
        "events_per_s": rate,
        "framework_free_events_per_s": round(free_rate, 1),
        "framework_free_events_per_s_before": round(free_before, 1),
        "framework_free_events_per_s_after": round(free_after, 1),
        "ratio_to_framework_free": round(rate / free_rate, 3) if free_rate else None,
        "framework_free_events_per_s_during": during,
        "ratio_to_framework_free_during": round(rate / during, 3) if during else None,
        "accounted": full["accounted"],
        "unstored_share": full["unstored_share"],
        "steady_state": full["steady_state"],
        "store_wait_share": full["store_wait_share"],
        "store_group_events": full["store_group_events"],
        "cpu_cores": full["cpu_cores"],
        "store_system_cores": full["store_system_cores"],
        "workdir_fs": full["workdir_fs"],
        "workdir_file_create_us": full["workdir_file_create_us"],
        **cpu_per_event(full["cpu_cores"], rate, free_rate),
        **latency,
    }


def bench_alerts(n_events: int, seed: int) -> dict[str, Any]:
    """The rule engine over the generator's world, in one partition, event time only (no broker, no store).

    Reports the engine's rate, alert changes per rule, notifications with the default grouping against one
    per change (the grouping clock is the alerts' event time, as if the world ran live), and the stage-stall
    alerts' precision / false-alarm rate against the world's hidden truth.
    """
    from collections import Counter

    from dealpulse.pipelines.contract import ContractRules, Event, validate_event
    from dealpulse.pipelines.delivery import Grouper, GroupPolicy
    from dealpulse.pipelines.rules import PartitionState, RuleEngine, RuleSet

    world = generate_world(seed=seed, target_events=n_events)
    contract = ContractRules.default()
    seen: set[str] = set()
    events: list[Event] = []
    for record in world.records():
        event = (
            validate_event(orjson.loads(record.value), contract, now_ms=4_000_000_000_000)
            if record.kind == "valid"
            else None
        )
        if isinstance(event, Event) and event.event_id not in seen:
            seen.add(event.event_id)
            events.append(event)
    engine, state = RuleEngine(RuleSet.load(None), allowed_lateness_ms=60_000), PartitionState()
    started = time.perf_counter()
    alerts = [alert for event in events for alert in engine.on_event(state, event)]
    alerts += engine.advance(state, max(e.ts_ms for e in events))
    seconds = time.perf_counter() - started
    grouper = Grouper(GroupPolicy(repeat_interval_ms=1 << 50))  # repeats of still-firing alerts not counted
    notifications = 0
    for alert in alerts:
        grouper.add(alert, alert["ts_ms"])
        notifications += len(grouper.due(alert["ts_ms"]))
    notifications += len(grouper.due(1 << 60))
    truth = {o for o, v in world.truth.opportunities.items() if v["stalls"]}
    flagged = {a["entity_id"] for a in alerts if a["rule"] == "stage_stall" and a["status"] == "firing"}
    calm = set(world.truth.opportunities) - truth
    return {
        "events": len(events),
        "engine_events_per_s": round(len(events) / seconds),
        "alert_changes": len(alerts),
        "alert_changes_by_rule": dict(Counter(f"{a['rule']}:{a['status']}" for a in alerts)),
        "notifications_without_grouping": len(alerts),
        "notifications_with_grouping": notifications,
        "grouping": "group_by [rule, team], group_wait 30s, group_interval 5m, no repeats (event time)",
        "stall_precision": round(len(flagged & truth) / max(1, len(flagged)), 4),
        "stall_recall": round(len(flagged & truth) / max(1, len(truth)), 4),
        "stall_false_alarm_rate": round(len(flagged & calm) / max(1, len(calm)), 4),
        "opportunities": len(world.truth.opportunities),
    }


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _histogram_delta(before: str, after: str, name: str) -> str:
    """The buckets of ``name`` observed between two scrapes, as /metrics text (summed over label sets)."""

    def buckets(text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(name + "_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    start, end = buckets(before), buckets(after)
    order = sorted(end, key=lambda le: float("inf") if le == "+Inf" else float(le))
    return "\n".join(f'{name}_bucket{{le="{le}"}} {end[le] - start.get(le, 0.0)}' for le in order)


def _alerting_run(workdir: Path, messages: list[tuple[str, bytes, int]], events_per_s: float | None) -> dict[str, Any]:
    """`dealpulse alerter` and `dealpulse notifier` processes (one local webhook receiver, group_wait 0) over
    ``messages`` offered at ``events_per_s`` (None: as fast as they go). Latency quantiles leave out the first
    two seconds (warm-up: connections, first fetches)."""
    from dealpulse.agents.alerting_runtime import WebhookReceiver
    from dealpulse.agents.stack import metrics_text, start_alerting_process

    receiver = WebhookReceiver()
    subscribers = workdir / "subscribers.yaml"
    subscribers.write_text(
        "defaults: {group_wait: 0s, group_interval: 0s, group_by: [rule, entity_id]}\n"
        f'subscribers: [{{name: bench, url: "{receiver.url}", secret: bench}}]\n'
    )
    try:
        with EmbeddedStack(workdir, subscribers_file=subscribers) as stack:
            alerter = start_alerting_process("alerter", stack.settings, workdir)
            notifier = start_alerting_process("notifier", stack.settings, workdir)
            stack.workers.extend([alerter, notifier])  # stopped with the stack
            wanted = stack.settings.topic_partitions * 2 + 1  # events + scores + signals partitions
            deadline = time.monotonic() + 120
            while _sample(metrics_text(alerter), "dealpulse_alerter_assigned_partitions") < wanted:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the alerter did not get its partitions:\n{alerter.log_tail()}")
                time.sleep(0.1)
            while not metrics_text(notifier):
                time.sleep(0.1)
            time.sleep(2)  # the notifier joins its group too
            topic = stack.settings.events_topic
            warm = int((events_per_s or 0) * 2)
            head = [] if events_per_s is None else messages[:warm]
            rest = messages[len(head) :]
            started = time.perf_counter()
            sent_messages = sent = 0
            if head:
                sent_messages, sent = produce(stack.settings, paced(head, events_per_s or 1))
            before_a, before_n = metrics_text(alerter), metrics_text(notifier)
            more_messages, more = produce(stack.settings, rest if events_per_s is None else paced(rest, events_per_s))
            sent_messages, sent = sent_messages + more_messages, sent + more
            deadline = time.monotonic() + 900
            while _sample(metrics_text(alerter), "dealpulse_alerter_messages_total", topic=topic) < sent_messages:
                if time.monotonic() > deadline:
                    raise TimeoutError("the alerter did not consume everything in 15 minutes")
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            time.sleep(3)  # the last webhooks go out
            after_a, after_n = metrics_text(alerter), metrics_text(notifier)
    finally:
        receiver.close()

    def ms(text: str, name: str, q: float) -> float | None:
        value = histogram_quantile(text, name, q)
        return round(value * 1000, 1) if value is not None else None

    alert_hist = _histogram_delta(before_a, after_a, "dealpulse_alert_latency_seconds")
    hook_hist = _histogram_delta(before_n, after_n, "dealpulse_event_to_webhook_seconds")
    return {
        "events": sent,
        "events_per_s": round(sent / elapsed, 1),
        "alerts_published": int(_sample(after_a, "dealpulse_alerts_total")),
        "webhook_requests": len(receiver.requests),
        "p50_event_to_alert_ms": ms(alert_hist, "dealpulse_alert_latency_seconds", 0.5),
        "p99_event_to_alert_ms": ms(alert_hist, "dealpulse_alert_latency_seconds", 0.99),
        "p50_event_to_webhook_ms": ms(hook_hist, "dealpulse_event_to_webhook_seconds", 0.5),
        "p99_event_to_webhook_ms": ms(hook_hist, "dealpulse_event_to_webhook_seconds", 0.99),
    }


def bench_alerts_live(workdir: Path, n_events: int, seed: int, batch_size: int) -> dict[str, Any]:
    """Alerter throughput on the embedded broker + store, then p50/p99 event -> alert and event -> webhook at half
    of it (20 s of events, packed alike; webhooks with group_wait 0 so grouping adds no wait)."""
    world = generate_world(seed, n_events)
    messages = list(pack_messages(world.records(), batch_size))
    (workdir / "throughput").mkdir(parents=True, exist_ok=True)
    (workdir / "latency").mkdir(parents=True, exist_ok=True)
    full = _alerting_run(workdir / "throughput", messages, None)
    rate = full["events_per_s"]
    budget, picked, total = int(rate / 2 * 20), [], 0
    for message in messages:
        if total >= budget:
            break
        picked.append(message)
        total += message[2]
    half = _alerting_run(workdir / "latency", picked, rate / 2)
    return {
        "alerter_events_per_s": rate,
        "alerter_events": full["events"],
        "alerts_published": full["alerts_published"],
        "latency_events_per_s_offered": round(rate / 2, 1),
        **{key: value for key, value in half.items() if key.startswith(("p50", "p99"))},
        "latency_alerts_published": half["alerts_published"],
        "latency_webhook_requests": half["webhook_requests"],
    }
