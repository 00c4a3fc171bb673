"""A real Prometheus server scrapes a running worker; its HTTP API shows the key series exist and move."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import yaml

from dealpulse.agents.embedded import ManagedProcess, free_port, wait_for_port
from dealpulse.agents.stack import WorkerProcess, produce
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store
from tests.conftest import wait_accounted

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def query(port: int, expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = orjson.loads(response.read())
    assert body["status"] == "success"
    return body["data"]["result"]  # type: ignore[no-any-return]


def value(port: int, expr: str) -> float:
    result = query(port, expr)
    return float(result[0]["value"][1]) if result else float("nan")  # type: ignore[index]


def is_ready(port: int) -> bool:
    """Prometheus answers 503 until its TSDB and rules are loaded; the API is only usable after /-/ready says 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_prometheus_scrapes_a_worker(
    settings: Settings, store: Store, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    assert shutil.which("prometheus"), "prometheus is installed by `make tools` (Debian package prometheus)"
    worker = start_worker(settings)
    port = free_port()
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(ROOT / "deploy/prometheus/alerts.yml")]  # the shipped rules must load
    config["scrape_configs"] = [{"job_name": "dealpulse-worker",
                                 "static_configs": [{"targets": [f"127.0.0.1:{worker.metrics_port}"]}]}]  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = ManagedProcess.start(
        "prometheus",
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        tmp_path / "prometheus.log",
    )  # fmt: skip
    try:
        wait_for_port(port, 30, prometheus.process)
        wait_until(lambda: is_ready(port), 30, "Prometheus to be ready")
        wait_until(lambda: value(port, 'up{job="dealpulse-worker"}') == 1, 30, "the first scrape")
        assert value(port, "dealpulse_assigned_partitions") == settings.topic_partitions
        _, sent = produce(settings, pack_messages(generate_world(8, 3000).records(), 50))
        wait_accounted(store, sent)
        wait_until(lambda: value(port, "sum(dealpulse_events_consumed_total)") == sent, 30, "consumed == sent")
        stored = value(port, "sum(dealpulse_events_stored_total)")
        dlq = value(port, "sum(dealpulse_dlq_total)")
        duplicates = value(port, "sum(dealpulse_duplicates_dropped_total)")
        assert stored + dlq + duplicates == sent
        assert {r["metric"]["type"] for r in query(port, "dealpulse_events_stored_total")} >= {"page_view", "quote"}  # type: ignore[index]
        rows = 'sum(dealpulse_store_insert_rows_total{table=~"events|dlq|duplicates"})'
        assert value(port, rows) == stored + dlq + duplicates
        scores = value(port, "sum(dealpulse_scores_total)")
        assert scores > 0 and value(port, 'sum(dealpulse_store_insert_rows_total{table="scores"})') == scores
        assert value(port, "histogram_quantile(0.99, sum by (le) (dealpulse_kafka_to_stored_seconds_bucket))") > 0
        # the scoring latency and its stages: a message waits for its batch, which starts before its scores leave
        assert value(port, "sum(dealpulse_batch_process_seconds_count)") > 0
        assert value(port, "sum(dealpulse_states_commit_seconds_count)") > 0
        assert value(port, "sum(dealpulse_store_wait_seconds_total)") >= 0  # exported; at this rate rarely > 0
        skipped = query(port, "dealpulse_source_offsets_skipped_total")
        assert {r["metric"]["partition"] for r in skipped} == {str(p) for p in range(settings.topic_partitions)}  # type: ignore[index]
        assert value(port, "sum(dealpulse_source_offsets_skipped_total)") == 0  # every message reached the worker
        mean = "sum(dealpulse_{0}_seconds_sum) / sum(dealpulse_{0}_seconds_count)"
        assert 0 < value(port, mean.format("kafka_to_batch")) < value(port, mean.format("kafka_to_score"))
        assert value(port, mean.format("kafka_to_fetched")) > 0  # the consumer's fetch stage, fetches sampled
        assert value(port, "sum(dealpulse_consumer_lag_messages)") >= 0
        lag_topics = {r["metric"]["topic"] for r in query(port, "dealpulse_consumer_lag_messages")}  # type: ignore[index]
        assert lag_topics <= {settings.events_topic}  # not the changelogs, which this worker writes, never reads
        assert value(port, "process_resident_memory_bytes") > 0
        # the series move: more events, higher counters
        produce(settings, pack_messages(generate_world(9, 500).records(), 50))
        wait_until(lambda: value(port, "sum(dealpulse_events_consumed_total)") == sent + 500, 30, "counters to move")
        rules = orjson.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).read())
        loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert "DealpulseSinkFailing" in loaded
        assert not [a for a in query(port, "ALERTS") if a["metric"]["alertstate"] == "firing"]  # type: ignore[index]
    finally:
        prometheus.stop()
