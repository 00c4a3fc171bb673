"""Scores, training and snapshots on real parts: Tansu, a Faust worker, the trainer process, chDB."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from dealpulse.agents.embedded import start_broker
from dealpulse.agents.evaluate import wait_trainer_caught_up
from dealpulse.agents.kafka_admin import ensure_topics
from dealpulse.agents.scoring import SnapshotFollower
from dealpulse.agents.stack import WorkerProcess, produce, start_trainer_process, worker_metric
from dealpulse.agents.trainer import Trainer, TrainerMetrics, newest_snapshots, run_trainer
from dealpulse.models.online import dump_snapshot
from dealpulse.pipelines.contract import ContractRules
from dealpulse.pipelines.features import FeatureSpec
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.ingest import Batch, DedupState, SourceRef, process_message
from dealpulse.pipelines.scoring import EntityStates, Scorer
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store
from tests.conftest import make_settings, wait_accounted

pytestmark = pytest.mark.integration
StartWorker = Callable[..., WorkerProcess]


def read_all(settings: Settings, topic: str) -> list[dict[str, object]]:
    """Every item of every message on ``topic`` (each message holds a JSON array)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "test-read-all"})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    items: list[dict[str, object]] = []
    idle = 0
    while idle < 3:
        batch = [m for m in consumer.consume(500, 0.5) if not m.error()]
        idle = 0 if batch else idle + 1
        for message in batch:
            items.extend(orjson.loads(message.value()))
    consumer.close()
    return items


def features_file(tmp_path: Path) -> Path:
    """The shipped features with small label minimums, so a small world warms the models up."""
    shipped = resources.files("dealpulse.pipelines").joinpath("features.yaml").read_text(encoding="utf-8")
    path = tmp_path / "features.yaml"
    path.write_text(shipped.replace("min_labels: 200", "min_labels: 30").replace("min_labels: 100", "min_labels: 10"))
    return path


def reference_scores(messages: list[tuple[str, bytes, int]]) -> dict[str, float]:
    """Every prior score the pipeline should emit, computed by the pure core over the messages in sent order."""
    spec = FeatureSpec.default()
    scorer = Scorer(spec)
    rules = ContractRules.default()
    dedup = DedupState()
    states = EntityStates(lambda entity, key: None, spec.fingerprint)
    scores: dict[str, float] = {}
    for offset, (_key, value, _items) in enumerate(messages):
        batch = Batch()
        process_message(value, SourceRef("t", 0, offset), rules, dedup, batch, now_ms=1_900_000_000_000)
        for event in batch.valid:
            scores.update((s.score_id, s.score) for s in scorer.process(event, states, {}).scores)
    return scores


@pytest.mark.parametrize("restart", [False, True])
def test_entity_state_survives_a_worker_restart_exactly(
    settings: Settings, store: Store, start_worker: StartWorker, restart: bool
) -> None:
    """Cold scores are a pure function of the features: after a restart they must continue exactly."""
    messages = list(pack_messages(generate_world(seed=12, target_events=8_000).records(), 50))
    first, second = messages[: len(messages) // 2], messages[len(messages) // 2 :]
    worker = start_worker(settings)
    _, sent_first = produce(settings, first)
    assert sum(wait_accounted(store, sent_first).values()) == sent_first
    if restart:
        worker.stop()
        start_worker(settings)  # recovers the tables from their changelogs
    _, sent_second = produce(settings, second)
    assert sum(wait_accounted(store, sent_first + sent_second).values()) == sent_first + sent_second
    expected = reference_scores(messages)
    stored = dict(store.query_rows("SELECT score_id, score FROM scores"))
    assert len(stored) == len(expected)
    wrong = [k for k, v in expected.items() if abs(stored.get(k, -1.0) - v) > 1e-6]
    entities = sorted({k.rsplit(":", 1)[0] for k in wrong})
    assert not wrong, f"{len(wrong)} of {len(expected)} scores differ, entities {entities[:20]}"


def test_scores_flow_the_trainer_learns_and_a_restarted_trainer_resumes_from_the_newest_snapshot(
    settings: Settings, store: Store, start_worker: StartWorker, tmp_path: Path
) -> None:
    settings = settings.model_copy(
        update={"features_file": features_file(tmp_path), "snapshot_every_examples": 50, "snapshot_interval_s": 0.5}
    )
    messages = list(pack_messages(generate_world(seed=8, target_events=16_000).records(), 50))
    first, second = messages[: len(messages) // 2], messages[len(messages) // 2 :]

    worker = start_worker(settings)
    trainer = start_trainer_process(settings, tmp_path, 0)
    try:
        _, sent_first = produce(settings, first)
        wait_accounted(store, sent_first)
        before = wait_trainer_caught_up(settings, timeout=120)
    finally:
        trainer.stop()
    assert set(before) == {"intent", "churn"}
    assert before["intent"].learned >= 30 and before["intent"].version >= 1

    # every score is in the store and on the scores topic, with grades from the thresholds
    stored = store.query_rows("SELECT model, count(), min(score), max(score) FROM scores GROUP BY model ORDER BY model")
    assert [row[0] for row in stored] == ["churn", "intent"]
    assert all(0.0 <= row[2] <= row[3] <= 1.0 for row in stored)
    total = sum(int(row[1]) for row in stored)
    published = read_all(settings, settings.scores_topic)
    assert len({s["score_id"] for s in published}) == total
    assert {s["grade"] for s in published} <= {"A", "B", "C", "D"}
    lead_view = store.query_rows("SELECT count(), countIf(region != '') FROM lead_intent")[0]
    assert lead_view[0] == store.query_rows("SELECT uniqExact(entity_id) FROM scores WHERE model = 'intent'")[0][0]
    assert lead_view[1] == lead_view[0]  # joined with the account dimensions

    # restart the trainer: it continues from the newest snapshot; the running worker hot-swaps new ones
    trainer = start_trainer_process(settings, tmp_path, 1)
    try:
        resumed_at = time.time() * 1000
        _, sent_second = produce(settings, second)
        wait_accounted(store, sent_first + sent_second)
        after = wait_trainer_caught_up(settings, timeout=120)
        trainer_log = trainer.log_path.read_text()
    finally:
        trainer.stop()
    version = before["intent"].version
    assert f"model intent: resumed from snapshot v{version}" in trainer_log
    assert after["intent"].version > version and after["intent"].learned > before["intent"].learned
    first_warm = store.query_rows(
        "SELECT cold, model_version FROM scores WHERE model = 'intent' AND scored_at >= fromUnixTimestamp64Milli("
        "{at:Int64}) ORDER BY scored_at, ts LIMIT 1",
        {"at": int(resumed_at)},
    )[0]
    assert first_warm[0] is False or first_warm[0] == 0
    assert first_warm[1] >= version
    assert (worker_metric(worker, 'dealpulse_model_snapshot_version{model="intent"}') or 0) >= version

    # nothing learned twice: the trainer's example count is the number of examples on the training topic
    examples = read_all(settings, settings.training_topic)
    learned = after["intent"].learned + after["churn"].learned
    assert learned == len(examples)
    assert newest_snapshots(settings)["intent"].version == after["intent"].version


def test_the_snapshot_follower_and_the_trainer_ride_out_a_broker_outage(
    services: dict[str, object], tmp_path: Path
) -> None:
    """Both asked the broker for a high watermark on every idle poll; with the broker down that raised, and the
    follower's thread ended (no hot swap until the worker restarted) and the trainer exited."""
    broker, bootstrap = start_broker(tmp_path)
    port = int(bootstrap.rsplit(":", 1)[1])
    try:
        settings = make_settings({**services, "bootstrap": bootstrap}, tmp_path)
        follower = SnapshotFollower(settings, FeatureSpec.default())
        stop_trainer = threading.Event()
        trainer = threading.Thread(target=run_trainer, args=(settings, stop_trainer), daemon=True)
        follower.start()
        trainer.start()
        assert follower.caught_up.wait(30), "the follower never read the (empty) models topic"

        broker.stop()
        time.sleep(4)  # several idle polls of both with nothing to ask
        broker, _ = start_broker(tmp_path, port)  # memory storage: the topics are gone; made again below
        ensure_topics(settings)
        assert follower._thread.is_alive() and trainer.is_alive(), "an outage of 4 s ended a thread"

        fresh = Trainer(settings, FeatureSpec.default(), TrainerMetrics()).snapshots()[0]
        publish = Producer({"bootstrap.servers": bootstrap})
        publish.produce(settings.models_topic, key=fresh.name.encode(), value=dump_snapshot(fresh))
        assert publish.flush(30) == 0
        deadline = time.monotonic() + 30
        while fresh.name not in follower.snapshots and time.monotonic() < deadline:
            time.sleep(0.1)
        assert follower.snapshots[fresh.name].version == fresh.version, "the follower missed the new snapshot"
        stop_trainer.set()
        follower.stop()
        trainer.join(30)
        assert not trainer.is_alive()
    finally:
        broker.stop()
