"""Alerts end to end on real parts: Tansu, the alerter and the notifier, chDB, and real HTTP receivers."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from dealpulse.agents.alerter import publish_rules
from dealpulse.agents.alerting_runtime import AlertingThreads, WebhookReceiver
from dealpulse.pipelines.contract import ContractRules, Event, validate_event
from dealpulse.pipelines.delivery import SubscriberConfig, signature_headers, verify_signature
from dealpulse.pipelines.rules import PartitionState, RuleEngine, RuleSet
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store
from tests.alert_scenarios import BASE, DRIFT_SIGNAL, EXPECTED_FIRING, EXPECTED_RESOLVED, rule_stories, score_stories

pytestmark = pytest.mark.integration


@pytest.fixture
def receivers() -> Iterator[tuple[WebhookReceiver, WebhookReceiver]]:
    good, broken = WebhookReceiver(fail=False), WebhookReceiver(fail=True)
    yield good, broken
    good.close()
    broken.close()


def send(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for value in values:
        producer.produce(topic, value=value, partition=0)
    assert producer.flush(30) == 0


def read_alerts(settings: Settings, until: Any, timeout: float = 90) -> list[dict[str, Any]]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "test-read-alerts"})
    partitions = consumer.list_topics(settings.alerts_topic, timeout=10).topics[settings.alerts_topic].partitions
    consumer.assign([TopicPartition(settings.alerts_topic, p, 0) for p in partitions])
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(seen):
        seen.extend(orjson.loads(m.value()) for m in consumer.consume(500, 0.3) if not m.error())
    consumer.close()
    return seen


def expected_alerts(events: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """What the pure engine raises on the same inputs: the alerter must agree exactly."""
    engine, state = RuleEngine(RuleSet.load(None), allowed_lateness_ms=0), PartitionState()
    rules = ContractRules.default()
    alerts = [a for s in score_stories() for a in engine.on_score(state, s)]
    for raw in events:
        event = validate_event(raw, rules, now_ms=1_900_000_000_000)
        assert isinstance(event, Event)
        alerts += engine.on_event(state, event)
    return {(a["alert_id"], a["status"]) for a in alerts}  # model_drift is on wall-clock time: checked apart


def test_every_default_rule_reaches_the_topic_the_store_and_webhooks_across_an_alerter_restart(
    settings: Settings, store: Store, receivers: tuple[WebhookReceiver, WebhookReceiver], tmp_path: Path
) -> None:
    good, broken = receivers
    settings = settings.model_copy(update={"alert_idle_advance_s": 0.0, "alerter_checkpoint_s": 0.3,
                                           "alert_allowed_lateness_s": 0.0})  # fmt: skip
    config = SubscriberConfig.parse(f"""
defaults: {{group_wait: 0s, group_interval: 1s, repeat_interval: 1h, group_by: [rule, entity_id]}}
subscribers:
  - {{name: sales, url: "{good.url}", secret: good-secret}}
  - {{name: flaky, url: "{broken.url}", secret: flaky-secret, retry_initial: 0.1s, retry_max: 0.3s,
      retry_window: 2s, match: {{severity: [critical, warning]}}}}
""", "subscribers.yaml")  # fmt: skip
    now = datetime.now(UTC)
    store.insert("silences", [("s-usage", ["rule=usage_declining"], now, now + timedelta(hours=1), "test", "", now)],
                 ("silence_id", "matchers", "starts_at", "ends_at", "created_by", "comment", "updated_at"))  # fmt: skip
    events = rule_stories()
    expected = expected_alerts(events)
    assert set(EXPECTED_FIRING) - {"model_drift"} <= _rules_of(expected)
    running = AlertingThreads(settings, config).start()
    try:
        send(settings, settings.scores_topic, [orjson.dumps([s]) for s in score_stories()])
        send(settings, settings.signals_topic, [orjson.dumps(DRIFT_SIGNAL)])
        half = len(events) // 2
        send(settings, settings.events_topic, [orjson.dumps(e) for e in events[:half]])
        read_alerts(settings, lambda seen: any(a["rule"] == "high_intent" for a in seen))
        running.restart_alerter()  # resumes from its checkpoint: nothing lost, nothing new
        send(settings, settings.events_topic, [orjson.dumps(e) for e in events[half:]])
        alerts = read_alerts(settings, lambda seen: {(a["alert_id"], a["status"]) for a in seen} >= expected)
        drift = [a for a in alerts if a["rule"] == "model_drift"]
        assert [(a["status"], a["entity_id"], a["recipients"]) for a in drift] == [
            ("firing", "intent", [{"role": "ops"}])
        ]
        got = {(a["alert_id"], a["status"]) for a in alerts if a["rule"] != "model_drift"}
        assert got == expected
        expected |= {(a["alert_id"], a["status"]) for a in drift}
        for rule, entity in EXPECTED_FIRING.items():
            assert any(a["rule"] == rule and a["entity_id"] == entity for a in alerts), rule
        for rule, entity in EXPECTED_RESOLVED.items():
            assert any(a["rule"] == rule and a["entity_id"] == entity and a["status"] == "resolved" for a in alerts)
        assert all(a["silenced_by"] == ["s-usage"] for a in alerts if a["rule"] == "usage_declining")

        # webhooks: the healthy subscriber hears the newest state of every unsilenced alert (grouping sends the
        # latest state of each alert in a group, as Alertmanager does), signed, while the other one fails
        newest = {a["fingerprint"]: (a["alert_id"], a["status"]) for a in alerts if not a.get("silenced_by")}

        def heard() -> dict[str, tuple[str, str]]:
            return {a["fingerprint"]: (a["alert_id"], a["status"]) for a in good.alerts()}

        deadline = time.monotonic() + 60
        while heard() != newest and time.monotonic() < deadline:
            time.sleep(0.2)
        assert heard() == newest
        assert all(a["rule"] != "usage_declining" for a in good.alerts())
        for _, headers, body in good.requests:
            assert verify_signature("good-secret", headers, body, int(time.time()))
        assert broken.requests, "the failing subscriber was tried"
        rows = _wait_rows(store, "SELECT subscriber, outcome, count() FROM alert_deliveries GROUP BY ALL",
                          lambda r: ("flaky", "dead") in {(s, o) for s, o, _ in r}
                          and ("sales", "delivered", len(good.requests)) in r)  # fmt: skip
        outcomes = {(s, o): n for s, o, n in rows}
        assert outcomes.get(("sales", "delivered"), 0) == len(good.requests)
        assert ("sales", "retry") not in outcomes and ("sales", "dead") not in outcomes
        assert outcomes[("flaky", "retry")] >= outcomes[("flaky", "dead")] >= 1
        first_good = min(t for t, _, _ in good.requests)
        first_bad = min(t for t, _, _ in broken.requests)
        assert first_good - first_bad < 2.0, "the healthy subscriber is not held up by the failing one"

        # the store has every alert change, once: the alerter stores them at its next checkpoint, after they reached
        # the topic (and so the notifier and the webhooks), so the store may still be behind here
        stored = _wait_rows(store, "SELECT alert_id, status FROM alerts FINAL", lambda rows: set(rows) >= expected)
        assert set(stored) == expected and len(stored) == len(expected)

        # feedback: a signed verdict becomes a feedback event on the events topic
        assert running.notifier is not None
        target = next(a for a in alerts if a["rule"] == "high_intent")
        body = orjson.dumps({"alert_id": target["alert_id"], "account_id": target["account_id"],
                             "lead_id": target["lead_id"], "entity": "lead", "entity_id": target["entity_id"],
                             "verdict": "accepted"})  # fmt: skip
        request = urllib.request.Request(
            f"http://127.0.0.1:{running.notifier.port}/feedback", data=body, method="POST",
            headers={"X-Dealpulse-Subscriber": "sales", **signature_headers("good-secret", body, int(time.time()))},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
        feedback = _last_events(settings)
        expected_props = {"ref_id": target["alert_id"], "verdict": "accepted", "entity_ref": "lead:lead-1",
                          "at_ms": target["ts_ms"]}  # fmt: skip
        assert any(e["type"] == "feedback" and e["props"] == expected_props for e in feedback), feedback[-1]
    finally:
        running.stop()


def test_a_published_rules_version_reaches_the_running_alerter(settings: Settings, store: Store) -> None:
    settings = settings.model_copy(update={"alert_idle_advance_s": 0.0, "alerter_checkpoint_s": 0.3})
    running = AlertingThreads(settings, SubscriberConfig(())).start()
    try:
        time.sleep(2)
        rules = RuleSet.parse("rules: [{name: any_download, entity: lead, message: 'got {entity_id}', "
                              "when: {count: {match: {type: download}, within: 1d}}}]", "hot.yaml")  # fmt: skip
        publish_rules(settings, rules)
        event = {"event_id": "d-1", "type": "download", "ts": BASE.isoformat(), "account_id": "acme",
                 "lead_id": "lead-9", "props": {"asset_id": "a", "asset_kind": "whitepaper"}}  # fmt: skip
        deadline = time.monotonic() + 30
        alerts: list[dict[str, Any]] = []
        while not alerts and time.monotonic() < deadline:  # the swap is asynchronous: send until it shows
            send(settings, settings.events_topic, [orjson.dumps({**event, "event_id": f"d-{time.time_ns()}"})])
            alerts = read_alerts(settings, lambda seen: any(a["rule"] == "any_download" for a in seen), timeout=3)
        hot = [a for a in alerts if a["rule"] == "any_download"]
        assert hot and hot[0]["rule_version"] == rules.version and hot[0]["message"] == "got lead-9"
    finally:
        running.stop()


def _rules_of(expected: set[tuple[str, str]]) -> set[str]:
    from dealpulse.pipelines.rules import fingerprint

    names = {}
    for rule, entity in EXPECTED_FIRING.items():
        kind = {"lead-1": "lead", "lead-6": "lead", "acme": "account", "beta": "account", "intent": "model"}.get(
            entity, "opportunity"
        )
        names[fingerprint(rule, kind, entity)] = rule
    return {names[a.split("-")[0]] for a, _ in expected if a.split("-")[0] in names}


def _fingerprint_of(alerts: list[dict[str, Any]], rule: str) -> str:
    return next(a["fingerprint"] for a in alerts if a["rule"] == rule)


def _wait_rows(store: Store, sql: str, done: Any, timeout: float = 60) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = store.query_rows(sql)
        if done(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def _last_events(settings: Settings) -> list[dict[str, Any]]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "test-read-events"})
    partitions = consumer.list_topics(settings.events_topic, timeout=10).topics[settings.events_topic].partitions
    consumer.assign([TopicPartition(settings.events_topic, p, 0) for p in partitions])
    out: list[dict[str, Any]] = []
    idle = 0
    while idle < 4:
        batch = [m for m in consumer.consume(500, 0.5) if not m.error()]
        idle = 0 if batch else idle + 1
        out.extend(orjson.loads(m.value()) for m in batch)
    consumer.close()
    return out


def test_an_idle_partition_moves_on_with_wall_clock_so_a_quiet_deal_stalls_live(settings: Settings) -> None:
    settings = settings.model_copy(update={"alert_idle_advance_s": 1.0, "alerter_checkpoint_s": 0.5})
    running = AlertingThreads(settings, SubscriberConfig(())).start()
    try:
        entered = datetime.now(UTC) - timedelta(days=12)  # more than 5 working days ago, whatever today is
        event = {"event_id": "sc-1", "type": "stage_change", "ts": entered.isoformat(), "account_id": "acme",
                 "lead_id": "lead-7", "opportunity_id": "opp-7",
                 "props": {"from_stage": "negotiation", "to_stage": "contract_review"}}  # fmt: skip
        send(settings, settings.events_topic, [orjson.dumps(event)])
        # no later event arrives: only wall-clock can move this partition's watermark past the deadline
        alerts = read_alerts(settings, lambda seen: any(a["rule"] == "contract_review_stalled" for a in seen), 60)
        stalled = [a for a in alerts if a["rule"] == "contract_review_stalled"]
        assert [(a["status"], a["entity_id"]) for a in stalled] == [("firing", "opp-7")]
    finally:
        running.stop()
