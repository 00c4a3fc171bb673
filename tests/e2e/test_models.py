"""`dealpulse evaluate` and `dealpulse features check` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import orjson
import pytest

from dealpulse.pipelines.generator import generate_world

pytestmark = pytest.mark.e2e
KEYS = ("intent_auc", "churn_auc", "baseline_intent_auc", "baseline_churn_auc", "grade_accuracy")


def dealpulse(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dealpulse.agents.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_evaluate_on_the_generated_world_beats_the_baseline() -> None:
    result = dealpulse("evaluate", "--world-events", "30000", "--seed", "5", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = orjson.loads(result.stdout)
    assert all(report[key] is not None for key in KEYS), report
    assert report["intent_examples"] > 300 and report["churn_examples"] > 30
    assert report["intent_auc"] > report["baseline_intent_auc"]
    assert report["churn_auc"] > report["baseline_churn_auc"]
    assert 0.5 < report["grade_accuracy"] <= 1.0
    assert report["latent_intent_spearman"] > 0.2  # the ranking follows the hidden intent


def test_evaluate_replays_any_jsonl_file_with_its_own_features(tmp_path: Path) -> None:
    events = tmp_path / "export.jsonl"
    world = generate_world(seed=9, target_events=20_000)
    events.write_bytes(b"\n".join(orjson.dumps(e) for _, _, e in sorted(world.events, key=lambda e: e[:2])) + b"\n")
    shipped = resources.files("dealpulse.pipelines").joinpath("features.yaml").read_text(encoding="utf-8")
    features = tmp_path / "features.yaml"
    features.write_text(shipped.replace("min_labels: 200", "min_labels: 50"))
    reports = []
    for _ in range(2):
        result = dealpulse("evaluate", "--events", str(events), "--features", str(features), "--json")
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(orjson.loads(result.stdout))
    report = reports[0]
    assert report["events_stored"] == len(world.events)
    assert report["intent_auc"] is not None and report["intent_auc"] > 0.6
    assert "latent_intent_spearman" not in report  # no hidden truth for a file
    # the same events teach the same model: what it learned is reproducible, so feature files can be compared
    learned = ("intent_auc", "intent_log_loss", "intent_examples", "churn_auc", "churn_examples", "intent_auc_curve")
    differ = {key: (reports[0][key], reports[1][key]) for key in learned if reports[0][key] != reports[1][key]}
    assert not differ, differ


def test_features_check_reports_file_line_column(tmp_path: Path) -> None:
    bad = tmp_path / "features.yaml"
    bad.write_text("features:\n  - {name: visits, entity: lead, kind: tally, match: {type: page_view}}\n")
    result = dealpulse("features", "check", str(bad))
    assert result.returncode != 0
    assert f"{bad}:2:34: feature 'visits': 'kind' must be one of" in result.stderr
    good = dealpulse("features", "check", str(resources.files("dealpulse.pipelines").joinpath("features.yaml")))
    assert good.returncode == 0 and "intent: lead, 14 features" in good.stdout
