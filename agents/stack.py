"""The embedded stack: broker + store + workers on this machine, for `dealpulse demo`, benches and tests."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import Producer

from dealpulse.agents.embedded import (
    ManagedProcess,
    StoreCredentials,
    free_port,
    start_broker,
    start_store,
)
from dealpulse.agents.kafka_admin import ensure_topics
from dealpulse.pipelines.analytics import prepare_store
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store, connect
from dealpulse.pipelines.store.writer import accounting


def settings_env(settings: Settings) -> dict[str, str]:
    """The DEALPULSE_* variables that recreate ``settings`` in a child process."""
    env = {}
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, tuple | list | dict):
            import orjson

            text = orjson.dumps(list(value) if isinstance(value, tuple) else value).decode()
        else:
            text = str(value)
        env[f"DEALPULSE_{name.upper()}"] = text
    return env


@dataclass
class WorkerProcess(ManagedProcess):
    metrics_port: int = 0


def start_worker_process(settings: Settings, workdir: Path, index: int = 0) -> WorkerProcess:
    """Start `dealpulse worker` with these settings (its metrics on a free port)."""
    port = free_port()
    proc = ManagedProcess.start(
        f"worker-{index}",
        [sys.executable, "-m", "dealpulse.agents.cli", "worker"],
        workdir / f"worker-{index}.log",
        env=settings_env(settings.model_copy(update={"metrics_port": port})),
    )
    return WorkerProcess(proc.name, proc.process, proc.log_path, port)


def start_trainer_process(settings: Settings, workdir: Path, index: int = 0) -> WorkerProcess:
    """Start `dealpulse trainer` with these settings (its metrics on a free port)."""
    port = free_port()
    proc = ManagedProcess.start(
        f"trainer-{index}",
        [sys.executable, "-m", "dealpulse.agents.cli", "trainer"],
        workdir / f"trainer-{index}.log",
        env=settings_env(settings.model_copy(update={"trainer_metrics_port": port, "log_level": "info"})),
    )
    return WorkerProcess(proc.name, proc.process, proc.log_path, port)


def start_alerting_process(kind: str, settings: Settings, workdir: Path, index: int = 0) -> WorkerProcess:
    """Start `dealpulse alerter` or `dealpulse notifier` with these settings (metrics on a free port)."""
    port = free_port()
    field = "alerter_metrics_port" if kind == "alerter" else "notifier_port"
    proc = ManagedProcess.start(
        f"{kind}-{index}",
        [sys.executable, "-m", "dealpulse.agents.cli", kind],
        workdir / f"{kind}-{index}.log",
        env=settings_env(settings.model_copy(update={field: port})),
    )
    return WorkerProcess(proc.name, proc.process, proc.log_path, port)


def metrics_text(process: WorkerProcess) -> str:
    """The process's /metrics page ('' while it cannot be read)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def worker_metric(worker: WorkerProcess, name: str) -> float | None:
    """The value of an unlabelled sample on the worker's /metrics, or None if it cannot be read (yet)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def wait_worker_ready(worker: WorkerProcess, timeout: float = 120) -> None:
    """Wait until the worker has joined its group and owns partitions (read from its /metrics)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"{worker.name} exited ({worker.process.returncode}):\n{worker.log_tail()}")
        if (worker_metric(worker, "dealpulse_assigned_partitions") or 0) > 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{worker.name} did not join its group in {timeout:.0f}s:\n{worker.log_tail()}")


class EmbeddedStack:
    """Start with ``with EmbeddedStack(workdir) as stack:``; everything stops on exit, also on Ctrl-C."""

    def __init__(self, workdir: Path, **overrides: Any) -> None:
        self.workdir = workdir
        self.overrides = overrides
        self.credentials = StoreCredentials()
        self.processes: list[ManagedProcess] = []
        self.workers: list[WorkerProcess] = []
        self.trainers: list[WorkerProcess] = []
        self.settings: Settings
        self._store: Store | None = None

    def __enter__(self) -> EmbeddedStack:
        try:
            broker, bootstrap = start_broker(self.workdir)
            self.processes.append(broker)
            store, port = start_store(self.workdir, self.workdir / "store", self.credentials)
            self.processes.append(store)
            self.settings = Settings(
                **{
                    "kafka_bootstrap": bootstrap,
                    "clickhouse_port": port,
                    "clickhouse_user": self.credentials.writer,
                    "clickhouse_password": self.credentials.writer_password,
                    "data_dir": self.workdir / "worker",
                    "state_store": "memory://",
                    "changelog_end_markers": True,  # Tansu's high watermark, see ScoringService.commit_states
                    **self.overrides,
                }
            )
            prepare_store(self.store, self.settings)
            ensure_topics(self.settings)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = connect(self.settings)
        return self._store

    def start_worker(self, **overrides: Any) -> WorkerProcess:
        """Start a `dealpulse worker` process against this stack."""
        worker = start_worker_process(self.settings.model_copy(update=overrides), self.workdir, len(self.workers))
        self.workers.append(worker)
        return worker

    def start_trainer(self, **overrides: Any) -> WorkerProcess:
        """Start the `dealpulse trainer` process against this stack."""
        trainer = start_trainer_process(self.settings.model_copy(update=overrides), self.workdir, len(self.trainers))
        self.trainers.append(trainer)
        return trainer

    def wait_worker_ready(self, worker: WorkerProcess, timeout: float = 120) -> None:
        wait_worker_ready(worker, timeout)

    def accounting(self) -> dict[str, int]:
        return accounting(self.store)

    def wait_accounted(
        self, expected: int, timeout: float, on_progress: Callable[[int], None] | None = None
    ) -> dict[str, int]:
        """Poll the store until every sent item is stored, dead-lettered or dropped as a duplicate."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.accounting()
            total = sum(counts.values())
            if on_progress:
                on_progress(total)
            if total >= expected:
                return counts
            for worker in self.workers:
                if not worker.alive():
                    raise RuntimeError(f"{worker.name} exited ({worker.process.returncode}):\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {total} of {expected} items accounted for after {timeout:.0f}s: {counts}")
            time.sleep(0.2)

    def stop(self) -> None:
        for worker in [*reversed(self.workers), *self.trainers]:
            worker.stop()
        if self._store is not None:
            self._store.close()
            self._store = None
        for process in reversed(self.processes):
            process.stop()


def produce(
    settings: Settings,
    messages: Iterable[tuple[str, bytes, int]],
    on_progress: Callable[[int], None] | None = None,
    linger_ms: float = 5,
) -> tuple[int, int]:
    """Send (key, value, items) messages to the events topic; return (messages, items) delivered.

    ``on_progress`` is called now and then with the number of items sent so far.
    """
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "linger.ms": linger_ms,
            "compression.type": "none",
            "message.max.bytes": max(settings.max_message_bytes * 2, 1_000_000),
        }
    )
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    sent_messages = sent_items = 0
    for key, value, items in messages:
        while True:
            try:
                producer.produce(settings.events_topic, value=value, key=key.encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)  # local queue full: let deliveries drain
        sent_messages += 1
        sent_items += items
        if sent_messages % 200 == 0:
            producer.poll(0)
            if on_progress:
                on_progress(sent_items)
    remaining = producer.flush(60)
    if remaining or failures:
        raise RuntimeError(f"{remaining} messages undelivered, {len(failures)} failed: {failures[:3]}")
    return sent_messages, sent_items
