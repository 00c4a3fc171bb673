"""The pipeline on real parts: Tansu broker, Faust worker processes, chDB store."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from dealpulse.agents.bench import rebalance_scenario
from dealpulse.agents.dlq import replay_dead_letters
from dealpulse.agents.embedded import StoreCredentials, free_port, start_store
from dealpulse.agents.stack import EmbeddedStack, WorkerProcess, metrics_text, produce, worker_metric
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.settings import DEFAULT_STAGES, Settings
from dealpulse.pipelines.store.client import Store, connect
from dealpulse.pipelines.store.writer import accounting
from tests.conftest import make_settings, wait_accounted

pytestmark = pytest.mark.integration
StartWorker = Callable[..., WorkerProcess]


def expected_outcome(seed: int, n_events: int) -> tuple[list[bytes], set[str], int, int]:
    """What the generator meant: the records, the distinct valid event ids, #malformed, #duplicates."""
    records = list(generate_world(seed, n_events).records())
    kinds = Counter(r.kind for r in records)
    valid_ids = {orjson.loads(r.value)["event_id"] for r in records if r.kind == "valid"}
    return [r.value for r in records], valid_ids, kinds["malformed"], kinds["duplicate"]


def consume_all(settings: Settings, topic: str, expected: int, timeout: float = 60) -> list[object]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"check-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})  # fmt: skip
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])  # no group join: faster than subscribe
    found: list[object] = []
    deadline = time.monotonic() + timeout
    while len(found) < expected and time.monotonic() < deadline:
        found.extend(m for m in consumer.consume(500, 0.5) if not m.error())
    consumer.close()
    return found


def test_every_message_is_stored_dead_lettered_or_dropped(
    settings: Settings, store: Store, start_worker: StartWorker
) -> None:
    _, valid_ids, malformed, duplicates = expected_outcome(seed=21, n_events=4000)
    start_worker(settings)
    _, sent = produce(settings, pack_messages(generate_world(21, 4000).records(), 50))
    counts = wait_accounted(store, sent)
    assert counts == {"events_stored": len(valid_ids), "dlq": malformed, "duplicates_dropped": duplicates}
    stored = {row[0] for row in store.query_rows("SELECT event_id FROM events")}
    assert stored == valid_ids
    # chat text never reaches the store, its keyword tags do
    chats = store.query_rows("SELECT props, keywords FROM events WHERE type = 'chat_message'")
    assert chats and all('"text"' not in props for props, _ in chats)
    assert any(keywords for _, keywords in chats)

    # the DLQ topic carries the original bytes and a typed reason with the source position
    dead = consume_all(settings, settings.dlq_topic, malformed)
    assert len(dead) == malformed
    reasons = Counter(dict(m.headers())["dealpulse.dlq.reason"].decode() for m in dead)  # type: ignore[attr-defined]
    assert set(reasons) <= {"malformed_json", "schema_violation", "unknown_type", "timestamp_out_of_range"}
    stored_dlq = dict(store.query_rows("SELECT dlq_id, payload FROM dlq"))
    for message in dead:
        headers = dict(message.headers())  # type: ignore[attr-defined]
        assert headers["dealpulse.dlq.topic"].decode() == settings.events_topic
        assert stored_dlq[headers["dealpulse.dlq.id"].decode()].encode() == message.value()  # type: ignore[attr-defined]


def test_duplicates_are_dropped_across_restarts_and_dlq_replay_after_a_fix(
    settings: Settings, store: Store, start_worker: StartWorker
) -> None:
    event = {"event_id": "e-restart", "type": "feature_use", "ts": "2026-10-01T10:00:00+02:00",
             "account_id": "acme", "props": {"feature": "export"}}  # fmt: skip
    pilot = {"event_id": "e-pilot", "type": "stage_change", "ts": "2026-10-02T10:00:00+02:00",
             "account_id": "acme", "opportunity_id": "o1", "props": {"from_stage": "diagnosis", "to_stage": "pilot"}}  # fmt: skip
    first = start_worker(settings)
    produce(settings, [("acme", orjson.dumps(event), 1), ("acme", orjson.dumps(pilot), 1)])
    assert wait_accounted(store, 2) == {"events_stored": 1, "dlq": 1, "duplicates_dropped": 0}
    assert store.query_rows("SELECT reason, field FROM dlq") == [("schema_violation", "props.to_stage")]
    first.stop()

    # the fix: a new stage; the restarted worker knows it, and still remembers e-restart
    fixed = settings.model_copy(update={"stages": (*DEFAULT_STAGES, "pilot")})
    start_worker(fixed)
    produce(settings, [("acme", orjson.dumps(event), 1)])
    assert wait_accounted(store, 3) == {"events_stored": 1, "dlq": 1, "duplicates_dropped": 1}

    report = replay_dead_letters(fixed, store)
    assert (report.resubmitted, report.still_invalid) == (1, 0)
    deadline = time.monotonic() + 60
    while not store.query_rows("SELECT 1 FROM events WHERE event_id = 'e-pilot'") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.query_rows("SELECT count() FROM events WHERE event_id = 'e-pilot'") == [(1,)]
    again = replay_dead_letters(fixed, store)
    assert (again.resubmitted, again.already_stored) == (0, 0), "a replayed entry must not be sent twice"
    time.sleep(1)
    assert store.query_rows("SELECT count() FROM events") == [(2,)]


def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(
    settings: Settings, store: Store, start_worker: StartWorker
) -> None:
    """Kill -9 the worker while it writes; a new worker must finish with every valid event exactly once."""
    n_events = 40_000
    _, valid_ids, malformed, duplicates = expected_outcome(seed=33, n_events=n_events)
    # small batches: many store writes and commits, so the kill lands between them; scoring on (tables, changelogs)
    crashy = settings.model_copy(update={"batch_max_messages": 10, "batch_max_seconds": 0.2})
    victim = start_worker(crashy)
    _, sent = produce(settings, pack_messages(generate_world(33, n_events).records(), 20))
    deadline = time.monotonic() + 120
    while sum(accounting(store).values()) < sent * 0.2 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.kill()
    at_kill = sum(accounting(store).values())
    assert 0 < at_kill < sent, f"the kill did not land mid-stream ({at_kill} of {sent})"

    start_worker(crashy)
    counts = wait_accounted(store, sent, timeout=300)
    time.sleep(1.5)  # anything written twice would show up now
    counts = accounting(store)
    assert counts == {"events_stored": len(valid_ids), "dlq": malformed, "duplicates_dropped": duplicates}
    assert store.query_rows("SELECT count(), uniqExact(event_id) FROM events") == [(len(valid_ids), len(valid_ids))]
    assert {row[0] for row in store.query_rows("SELECT event_id FROM events")} == valid_ids
    assert store.query_rows("SELECT count(), uniqExact(dlq_id) FROM dlq") == [(malformed, malformed)]


def test_a_worker_joining_and_one_leaving_mid_stream_loses_and_doubles_nothing(
    settings: Settings, store: Store, start_worker: StartWorker
) -> None:
    """Scale out then in under a steady stream: every valid event stored exactly once, every bad one dead-lettered."""
    # INFO: assignments, table recovery and seeks in the worker logs, to tell a rare failure's cause from its logs
    settings = settings.model_copy(update={"log_level": "info"})
    n_events = 90_000
    _, valid_ids, malformed, duplicates = expected_outcome(seed=44, n_events=n_events)
    messages = list(pack_messages(generate_world(44, n_events).records(), 50))
    # with scoring (tables): records fetched before the seek to the committed offset used to arrive after it, and
    # Faust dropped the messages in between as a gap (lost in 2-3 of 6 runs); records handed on before that seek
    # were dropped twice (lost in 3 of 7 runs). See agents.app._consumer_transport.
    # The stream takes ~36 s: a shorter timeout than the test's reports how many events are missing.
    result = rebalance_scenario(settings, store, lambda: start_worker(settings, wait=False), messages, 2_500, 240)
    assert result["stream_flowing_at_leave"], "the leave must happen while events still arrive"
    time.sleep(1.5)  # anything written twice would show up now
    assert accounting(store) == {"events_stored": len(valid_ids), "dlq": malformed, "duplicates_dropped": duplicates}
    assert store.query_rows("SELECT count(), uniqExact(event_id) FROM events") == [(len(valid_ids), len(valid_ids))]
    assert store.query_rows("SELECT count(), uniqExact(dlq_id) FROM dlq") == [(malformed, malformed)]


def produce_in_transactions(settings: Settings, messages: list[tuple[str, bytes, int]], per_transaction: int) -> None:
    """Each committed transaction ends with a control record: an offset in the partition that no consumer sees."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "transactional.id": f"tx-{time.time_ns()}"})
    producer.init_transactions(30)
    for start in range(0, len(messages), per_transaction):
        producer.begin_transaction()
        for key, value, _items in messages[start : start + per_transaction]:
            producer.produce(settings.events_topic, value=value, key=key.encode())
        producer.commit_transaction(30)


def test_a_transactional_source_is_read_to_the_end_across_a_restart(
    settings: Settings, store: Store, start_worker: StartWorker
) -> None:
    """A transactional producer's control records are real gaps in the offsets: none may stall a partition.

    After a clean stop the committed offset is the one after the last record processed, which is the control record
    of its transaction: the restarted worker's first record lies one past where it sought to. It is held back once,
    the partition is read again from the committed offset, and the same record comes first again, so it passes.
    """
    settings = settings.model_copy(update={"log_level": "info"})
    messages = list(pack_messages(generate_world(45, 3000).records(), 50))
    half = len(messages) // 2
    valid = {orjson.loads(r.value)["event_id"] for r in generate_world(45, 3000).records() if r.kind == "valid"}
    first = start_worker(settings)
    produce_in_transactions(settings, messages[:half], per_transaction=5)
    sent_first = sum(items for _key, _value, items in messages[:half])
    assert sum(wait_accounted(store, sent_first).values()) == sent_first
    first.stop()

    restarted = start_worker(settings)
    produce_in_transactions(settings, messages[half:], per_transaction=5)
    sent = sum(items for _key, _value, items in messages)
    counts = wait_accounted(store, sent, timeout=60)
    assert sum(counts.values()) == sent, f"{sent - sum(counts.values())} items never arrived: a partition stalled"
    assert store.query_rows("SELECT count(), uniqExact(event_id) FROM events") == [(len(valid), len(valid))]
    log = restarted.log_path.read_text()
    assert "was next; reading again from there" in log, "the control records should have been met as gaps"
    # control records are not messages that never reached the worker: no error, no page
    skipped = [line for line in metrics_text(restarted).splitlines()
               if line.startswith("dealpulse_source_offsets_skipped_total{")]  # fmt: skip
    assert skipped and all(float(line.split()[-1]) == 0 for line in skipped), skipped
    assert "never reached" not in first.log_path.read_text() + log


def test_a_worker_behind_favours_throughput_until_it_caught_up(
    settings: Settings, store: Store, start_worker: StartWorker
) -> None:

    def sample(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    # a backlog before the worker starts: any lag counts as behind with so small a threshold
    behind = settings.model_copy(update={"backlog_after_s": 0.001, "gil_switch_interval_backlog_ms": 20.0})
    _, sent = produce(behind, pack_messages(generate_world(21, 6000).records(), 50))
    worker = start_worker(behind)
    wait_accounted(store, sent)
    _, live = produce(behind, pack_messages(generate_world(22, 100).records(), 50))  # nothing waits behind it
    wait_accounted(store, sent + live)
    text = metrics_text(worker)
    assert sample(text, "dealpulse_behind_seconds_total") > 0  # some batches ran with the long interval
    assert sample(text, "dealpulse_gil_switch_interval_seconds") == behind.gil_switch_interval_ms / 1000  # caught up


@pytest.mark.parametrize("store_down", ["before_first_message", "mid_stream"])
def test_sigterm_while_the_store_is_down_stops_the_worker_in_its_grace_and_loses_nothing(
    services: dict[str, object], tmp_path: Path, start_worker: StartWorker, store_down: str
) -> None:
    """The worker cannot store (so it must not ack) what it took; SIGTERM must still stop it, and the batches it
    held are processed after a restart. Faust waited for their acks forever (a worker ignored SIGTERM for 1.5 h);
    a store down when a partition's first message came crashed the agent, and those messages then waited for a
    restart while the worker looked healthy."""
    credentials, port = StoreCredentials(), free_port()
    store_process, _ = start_store(tmp_path, tmp_path / "own-store", credentials, port)
    try:
        settings = make_settings({**services, "store_port": port, "credentials": credentials}, tmp_path)
        grace = 3.0
        _, valid_ids, malformed, duplicates = expected_outcome(seed=55, n_events=3000)
        messages = list(pack_messages(generate_world(55, 3000).records(), 50))
        first, second = messages[: len(messages) // 2], messages[len(messages) // 2 :]
        worker = start_worker(settings.model_copy(update={"shutdown_grace_s": grace}))
        if store_down == "mid_stream":  # partitions loaded, groups written: the next one is in flight when it dies
            _, sent_first = produce(settings, first)
            with closing(connect(settings)) as store:
                assert sum(wait_accounted(store, sent_first).values()) == sent_first
        store_process.stop()
        produce(settings, first if store_down == "before_first_message" else second)
        deadline = time.monotonic() + 60
        while worker_metric(worker, "dealpulse_store_backing_off") != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker_metric(worker, "dealpulse_store_backing_off") == 1, "the worker never tried the store"

        signalled = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        returncode = worker.process.wait(timeout=grace + 30)
        took = time.monotonic() - signalled
        assert returncode == 0, worker.log_tail()
        assert took < grace + 10, f"stopped {took:.1f} s after SIGTERM with a {grace} s grace"
        assert "are not acked and are read again after a restart" in worker.log_path.read_text()

        store_process, _ = start_store(tmp_path, tmp_path / "own-store", credentials, port)
        start_worker(settings)
        if store_down == "before_first_message":
            produce(settings, second)
        with closing(connect(settings)) as store:
            wait_accounted(store, sum(items for _, _, items in messages))
            time.sleep(1.5)  # anything written twice would show up now
            counts = accounting(store)
            assert counts == {"events_stored": len(valid_ids), "dlq": malformed, "duplicates_dropped": duplicates}
            assert {row[0] for row in store.query_rows("SELECT event_id FROM events")} == valid_ids
            assert store.query_rows("SELECT count(), uniqExact(event_id) FROM events") == [(len(valid_ids),) * 2]
    finally:
        store_process.stop()


@pytest.mark.parametrize("change", ["a_worker_joins", "a_worker_leaves"])
def test_a_rebalance_while_the_store_is_down_loses_and_doubles_nothing(
    services: dict[str, object], tmp_path: Path, start_worker: StartWorker, change: str
) -> None:
    """The store goes down while workers hold batches they cannot store (so have not acked); then the group changes.
    A worker started then waits for the store before it joins (it exited with a traceback before); a worker that
    leaves stops within its grace and the one that stays takes its partitions over. After the store is back every
    event is stored exactly once and the remaining workers are running."""
    credentials, port = StoreCredentials(), free_port()
    store_process, _ = start_store(tmp_path, tmp_path / "own-store", credentials, port)
    try:
        settings = make_settings({**services, "store_port": port, "credentials": credentials}, tmp_path)
        settings = settings.model_copy(update={"shutdown_grace_s": 3.0})
        _, valid_ids, malformed, duplicates = expected_outcome(seed=56, n_events=3000)
        messages = list(pack_messages(generate_world(56, 3000).records(), 50))
        first, second = messages[: len(messages) // 2], messages[len(messages) // 2 :]
        workers = [start_worker(settings)]
        if change == "a_worker_leaves":
            workers.append(start_worker(settings))
            deadline = time.monotonic() + 60
            while any(worker_metric(w, "dealpulse_assigned_partitions") != 1 for w in workers):
                assert time.monotonic() < deadline, "the two workers never shared the partitions"
                time.sleep(0.2)
        _, sent_first = produce(settings, first)
        with closing(connect(settings)) as store:
            assert sum(wait_accounted(store, sent_first).values()) == sent_first
        store_process.stop()
        produce(settings, second)
        deadline = time.monotonic() + 60
        while any(worker_metric(w, "dealpulse_store_backing_off") != 1 for w in workers):
            assert time.monotonic() < deadline, "a worker never tried the store"
            time.sleep(0.1)

        if change == "a_worker_joins":
            joiner = start_worker(settings, wait=False)
            remaining = [*workers, joiner]
        else:
            leaver = workers.pop()
            assert leaver.stop(timeout=30) == 0, leaver.log_tail()
            remaining = workers
        time.sleep(2 * settings.kafka_session_timeout_s)  # past the rebalance timeout, with the store still down
        store_process, _ = start_store(tmp_path, tmp_path / "own-store", credentials, port)
        with closing(connect(settings)) as store:
            wait_accounted(store, sum(items for _, _, items in messages))
            time.sleep(1.5)  # anything written twice would show up now
            counts = accounting(store)
            assert counts == {"events_stored": len(valid_ids), "dlq": malformed, "duplicates_dropped": duplicates}
            assert {row[0] for row in store.query_rows("SELECT event_id FROM events")} == valid_ids
            assert store.query_rows("SELECT count(), uniqExact(event_id) FROM events") == [(len(valid_ids),) * 2]
        for worker in remaining:
            assert worker.alive(), worker.log_tail()
        if change == "a_worker_joins":
            assert "cannot be reached" in joiner.log_path.read_text()  # it said why it waited
    finally:
        store_process.stop()


def test_sigterm_with_the_broker_and_the_store_gone_stops_the_worker_promptly(tmp_path: Path) -> None:
    """With Kafka down, Faust's consumer thread died on its way out and the worker waited 60 s for it."""
    with EmbeddedStack(tmp_path) as stack:
        worker = stack.start_worker()
        stack.wait_worker_ready(worker)
        for process in stack.processes:  # the broker and the store
            process.stop()
        signalled = time.monotonic()
        returncode = worker.stop(timeout=90)  # SIGTERM, then SIGKILL after 90 s
        took = time.monotonic() - signalled
        assert returncode == 0, worker.log_tail()
        assert took < 20, f"stopped {took:.1f} s after SIGTERM"
