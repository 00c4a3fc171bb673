"""The CLI as a user runs it: `dealpulse demo`, `schema`, `generate`, `replay`, `migrate`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import orjson
import pytest

from dealpulse.agents.bench import LATENCY_SECONDS, spread_sample
from dealpulse.agents.embedded import free_port
from dealpulse.agents.stack import settings_env
from dealpulse.pipelines.generator import generate_world, pack_messages
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store
from tests.conftest import wait_accounted

pytestmark = pytest.mark.e2e


def dealpulse(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dealpulse.agents.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_demo_json_accounts_for_every_event(tmp_path: Path) -> None:
    result = dealpulse("demo", "--events", "3000", "--seed", "5", "--json", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert summary["events_sent"] == 3000
    assert summary["events_stored"] + summary["dlq"] + summary["duplicates_dropped"] == summary["events_sent"]
    assert summary["dlq"] > 0 and summary["duplicates_dropped"] > 0 and summary["seconds"] > 0
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False)
    assert leftovers.stdout.strip() == "", "demo left processes running"


def test_demo_human_summary(tmp_path: Path) -> None:
    result = dealpulse("demo", "--events", "1000", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "every event accounted for" in result.stdout
    assert "metrics http://127.0.0.1:" in result.stderr


def test_schema_is_valid_json_schema() -> None:
    result = dealpulse("schema")
    assert result.returncode == 0
    schema = orjson.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["$defs"]["event"]["properties"]["type"]["enum"]) >= {"page_view", "quote", "outcome"}


def test_generate_to_file_then_replay_into_a_running_worker(
    tmp_path: Path, settings: Settings, store: Store, start_worker: object
) -> None:
    events, truth = tmp_path / "world.jsonl", tmp_path / "truth.json"
    result = dealpulse("generate", "--events", "1500", "--seed", "9", "--out", str(events), "--truth", str(truth))
    assert result.returncode == 0, result.stderr
    assert len(events.read_bytes().splitlines()) == 1500
    assert orjson.loads(truth.read_bytes())["leads"]
    start_worker(settings)  # type: ignore[operator]
    result = dealpulse("replay", str(events), env=settings_env(settings))
    assert result.returncode == 0, result.stderr
    counts = wait_accounted(store, 1500)
    assert sum(counts.values()) == 1500 and counts["dlq"] > 0


def test_helpful_errors() -> None:
    result = dealpulse("demo", "--events", "0")
    assert result.returncode == 2 and "--events" in result.stderr
    result = dealpulse("replay", "/nonexistent.jsonl")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert "demo" in dealpulse("--help").stdout


def test_bench_score_reports_every_figure_it_documents_and_warns_when_too_short() -> None:
    # figures are not asserted (they belong to the bench, not to a test); what a user reads from it is
    result = dealpulse("bench", "score", "--events", "100000", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert report["events"] == 100000 and report["accounted"] is True
    assert report["events_per_s"] > 0 and report["framework_free_events_per_s"] > 0
    assert report["ratio_to_framework_free"] == round(report["events_per_s"] / report["framework_free_events_per_s"], 3)
    # the framework-free loop runs before and after the worker; the ratio uses their mean
    before, after = report["framework_free_events_per_s_before"], report["framework_free_events_per_s_after"]
    assert before > 0 and after > 0 and abs(report["framework_free_events_per_s"] - (before + after) / 2) <= 0.1
    # ... and in bursts during the worker's measuring window, with a ratio of its own
    during = report["framework_free_events_per_s_during"]
    assert during > 0 and report["ratio_to_framework_free_during"] == round(report["events_per_s"] / during, 3)
    assert 0 <= report["store_wait_share"] <= 1
    # the unstored share is three store groups of the mean size measured in the window, as a share of the run
    group = report["store_group_events"]
    assert group > 0 and abs(report["unstored_share"] - min(1.0, 3 * group / 100_000)) < 0.002
    # every process of the stack used some CPU in the window, at most both cores' worth
    assert set(report["cpu_cores"]) == {"worker", "store", "broker"}
    assert all(0 < cores <= os.cpu_count() for cores in report["cpu_cores"].values())
    worker_us = report["cpu_us_per_event"]["worker"]
    assert abs(worker_us - report["cpu_cores"]["worker"] / report["events_per_s"] * 1e6) <= 0.1
    assert abs(report["framework_free_to_worker_cpu"] - report["framework_free_us_per_event"] / worker_us) < 0.005
    # the store's kernel time is part of its CPU; the workdir's filesystem and its cost per file are named
    assert 0 <= report["store_system_cores"] <= report["cpu_cores"]["store"] + 0.01
    assert report["workdir_fs"] and report["workdir_file_create_us"] > 0
    assert report["latency_workdir_file_create_us"] > 0
    assert set(report["latency_cpu_cores"]) == {"worker", "store", "broker", "store_system"}
    assert report["latency_samples"] > 0 and report["latency_behind_s"] >= 0
    for stage in ("kafka_to_score", "kafka_to_fetched", "kafka_to_batch", "batch_process"):
        assert 0 < report[f"p50_{stage}_ms"] <= report[f"p99_{stage}_ms"]
    # 100k events are too few for a steady state: the bench says so, and how many events to use instead
    assert report["steady_state"] is False
    assert "read high; use --events" in result.stderr


def test_bench_score_too_short_for_a_rate_says_how_many_events_to_use() -> None:
    result = dealpulse("bench", "score", "--events", "2000", timeout=300)
    assert result.returncode == 1
    assert "Error: 2,000 events are too few to measure a rate" in result.stderr
    assert "use --events" in result.stderr and "Traceback" not in result.stderr


def test_bench_score_latency_only_at_a_given_rate() -> None:
    result = dealpulse("bench", "score", "--latency-at", "1000", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert report["bench"] == "score-latency" and report["latency_events_per_s_offered"] == 1000
    assert report["latency_events"] > 0 and report["latency_samples"] > 0
    assert 0 < report["p50_kafka_to_score_ms"] <= report["p99_kafka_to_score_ms"]
    assert "events_per_s" not in report  # no throughput run
    assert all(cores is not None and cores >= 0 for cores in report["latency_cpu_cores"].values())


def test_bench_score_latency_only_samples_the_world_of_the_events_given() -> None:
    result = dealpulse("bench", "score", "--latency-at", "1000", "--events", "100000", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert report["latency_samples"] > 0
    # the 20 s sent are picked across the 100k-event world's messages, as the full bench picks them
    world = list(pack_messages(generate_world(11, 100_000).records(), 100))
    picked = spread_sample(world, int(1000 * LATENCY_SECONDS))
    assert report["latency_events_per_message_mean"] == round(sum(m[2] for m in picked) / len(picked), 1)


def test_bench_broker_receives_every_message_and_reports_each_window() -> None:
    # figures are not asserted; that every message sent came back, and the windows a user reads, are
    result = dealpulse("bench", "broker", "--rate", "2000", "--seconds", "5", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert report["bench"] == "broker" and report["events_per_s_offered"] == 2000
    assert report["messages_received"] == report["messages_sent"] > 0
    assert 0 < report["messages_counted"] < report["messages_sent"]  # the warm-up is not counted
    assert 0 < report["p50_append_to_consumer_ms"] <= report["p99_append_to_consumer_ms"]
    assert [window["from_s"] for window in report["windows"]] == [2]  # 2-5 s: one window after the warm-up
    assert report["windows"][0]["records"] == report["messages_counted"]
    assert report["broker_cores_first_window"] is not None and report["broker_cores_first_window"] >= 0


def test_a_command_that_cannot_reach_the_store_says_where_and_what_to_do() -> None:
    port = free_port()  # nothing listens there
    result = dealpulse("migrate", env={"DEALPULSE_CLICKHOUSE_PORT": str(port)}, timeout=60)
    assert result.returncode == 1
    assert f"cannot reach the store at 127.0.0.1:{port} (ConnectionRefusedError" in result.stderr
    assert "dealpulse demo --keep-running" in result.stderr
    assert "Traceback" not in result.stderr
