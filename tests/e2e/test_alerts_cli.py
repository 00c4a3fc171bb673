"""The alerting commands as a user runs them: rules check, the alerter process, alerts tail, silences."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from dealpulse.agents.stack import settings_env
from dealpulse.pipelines.settings import Settings
from tests.alert_scenarios import rule_stories

pytestmark = pytest.mark.e2e


def dealpulse(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dealpulse.agents.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})  # fmt: skip


def test_rules_check_explains_errors_with_file_line_column(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: deal_cold\n    entity: deal\n    when: {stage: lead}\n")
    result = dealpulse("rules", "check", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3:5: rule 'deal_cold': 'entity' must be one of lead, account, opportunity, model" in result.stderr
    shipped = str(resources.files("dealpulse.pipelines").joinpath("rules.yaml"))
    good = dealpulse("rules", "check", shipped)
    assert good.returncode == 0 and "9 rules, version" in good.stdout and "contract_review_stalled" in good.stdout


def test_the_alerter_process_raises_alerts_that_tail_shows_and_silences_are_managed(settings: Settings) -> None:
    env = settings_env(settings.model_copy(update={"alerter_metrics_port": 0, "alert_idle_advance_s": 0.0}))
    rules = resources.files("dealpulse.pipelines").joinpath("rules.yaml")
    published = dealpulse("rules", "publish", str(rules), env=env)
    assert published.returncode == 0 and "published rules version" in published.stdout, published.stderr
    alerter = subprocess.Popen([sys.executable, "-m", "dealpulse.agents.cli", "alerter"],
                               env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        for event in rule_stories():
            producer.produce(settings.events_topic, key=event["account_id"].encode(), value=orjson.dumps(event))
        assert producer.flush(30) == 0
        tail = dealpulse("alerts", "tail", "--from-beginning", "--json", "--rule", "high_intent", "--limit", "1",
                         "--timeout", "90", env=env, timeout=150)  # fmt: skip
        assert tail.returncode == 0, tail.stderr
        alert = orjson.loads(tail.stdout.splitlines()[0])
        assert (alert["rule"], alert["entity_id"], alert["status"]) == ("high_intent", "lead-1", "firing")
        readable = dealpulse("alerts", "tail", "--from-beginning", "--limit", "3", "--timeout", "30", env=env)
        assert readable.returncode == 0 and readable.stdout.count("FIRING") + readable.stdout.count("RESOLVED") == 3
    finally:
        alerter.send_signal(signal.SIGTERM)
        output = alerter.communicate(timeout=60)[0].decode()
    assert alerter.returncode == 0, output[-3000:]

    added = dealpulse("alerts", "silence", "add", "rule=stage_stall", "team=team-3", "--for", "1d",
                      "--comment", "QBR week", env=env)  # fmt: skip
    assert added.returncode == 0, added.stderr
    silence_id = added.stdout.split()[1].rstrip(":")
    listed = orjson.loads(dealpulse("alerts", "silence", "list", "--json", env=env).stdout)
    assert [(s["silence_id"], s["matchers"], s["active"]) for s in listed] == [
        (silence_id, ["rule=stage_stall", "team=team-3"], True)
    ]
    assert dealpulse("alerts", "silence", "expire", silence_id, env=env).returncode == 0
    assert "no active silences" in dealpulse("alerts", "silence", "list", env=env).stdout
    assert "expired" in dealpulse("alerts", "silence", "list", "--all", env=env).stdout
    wrong = dealpulse("alerts", "silence", "add", "colour=blue", env=env)
    assert wrong.returncode == 2 and "not a matcher" in wrong.stderr
    missing = dealpulse("alerts", "silence", "expire", "nope", env=env)
    assert missing.returncode == 1 and "no silence 'nope'" in missing.stderr
