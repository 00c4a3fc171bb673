"""Shared fixtures. Integration tests get a real Tansu broker and a real chDB store, started on free ports."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dealpulse.agents.embedded import StoreCredentials, start_broker, start_store
from dealpulse.agents.kafka_admin import ensure_topics
from dealpulse.agents.stack import WorkerProcess, start_worker_process, wait_worker_ready
from dealpulse.pipelines.analytics import prepare_store
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store, connect
from dealpulse.pipelines.store.writer import accounting


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One broker and one store process for the whole session; tests isolate by topic and database names."""
    workdir = tmp_path_factory.mktemp("services")
    credentials = StoreCredentials()
    broker, bootstrap = start_broker(workdir)
    try:
        store, port = start_store(workdir, workdir / "store", credentials)
    except BaseException:
        broker.stop()
        raise
    yield {"bootstrap": bootstrap, "store_port": port, "credentials": credentials, "workdir": workdir,
           "store_process": store, "broker_process": broker}  # fmt: skip
    store.stop()
    broker.stop()


def make_settings(services: dict[str, object], workdir: Path) -> Settings:
    """Settings with a fresh database, topics and consumer group, migrated and created."""
    suffix = uuid.uuid4().hex[:10]
    credentials = services["credentials"]
    assert isinstance(credentials, StoreCredentials)
    result = Settings(
        kafka_bootstrap=str(services["bootstrap"]),
        events_topic=f"events-{suffix}",
        dlq_topic=f"events-{suffix}.dlq",
        scores_topic=f"scores-{suffix}",
        training_topic=f"training-{suffix}",
        models_topic=f"models-{suffix}",
        signals_topic=f"signals-{suffix}",
        rules_topic=f"rules-{suffix}",
        alerts_topic=f"alerts-{suffix}",
        alerts_dead_topic=f"alerts-{suffix}.dead",
        alerter_group=f"alerter-{suffix}",
        notifier_group=f"notifier-{suffix}",
        consumer_group=f"dealpulse-{suffix}",
        clickhouse_port=int(str(services["store_port"])),
        clickhouse_user=credentials.writer,
        clickhouse_password=credentials.writer_password,
        clickhouse_database=f"test_{suffix}",
        data_dir=workdir / "worker",
        # the embedded default: Tansu reports a high watermark one short after multi-record batches, which
        # Faust's RocksDB recovery takes for lost data (ConsistencyError); see README, Models
        state_store="memory://",
        changelog_end_markers=True,
        topic_partitions=2,
    )
    store = connect(result)
    prepare_store(store, result)
    store.close()
    ensure_topics(result)
    return result


@pytest.fixture
def settings(services: dict[str, object], tmp_path: Path) -> Settings:
    """Settings with a fresh database, topics and consumer group for this test."""
    return make_settings(services, tmp_path)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    client = connect(settings)
    yield client
    client.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `dealpulse worker` processes (waiting until they own partitions); all are stopped afterwards."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, wait: bool = True) -> WorkerProcess:
        worker = start_worker_process(settings, tmp_path, len(started))
        started.append(worker)
        if wait:
            wait_worker_ready(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_accounted(store: Store, expected: int, timeout: float = 120) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = accounting(store)
        if sum(counts.values()) >= expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)
