"""Rules, stalls, calendars and delivery policy: the pure core, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dealpulse.pipelines.calendar import BusinessCalendar, Duration, iso_ms, ms_iso
from dealpulse.pipelines.config_errors import ConfigError
from dealpulse.pipelines.contract import ContractRules, Event, validate_event
from dealpulse.pipelines.delivery import Matcher, Silence, SubscriberConfig, silenced_by
from dealpulse.pipelines.rules import PartitionState, RuleEngine, RuleSet
from tests.alert_scenarios import BASE, DRIFT_SIGNAL, EXPECTED_FIRING, EXPECTED_RESOLVED, rule_stories, score_stories


def story_events() -> list[Event]:
    rules = ContractRules.default()
    events = [validate_event(e, rules, now_ms=1_900_000_000_000) for e in rule_stories()]
    assert all(isinstance(e, Event) for e in events)
    return events  # type: ignore[return-value]


def run_stories(engine: RuleEngine, state: PartitionState, events: list[Event]) -> list[dict[str, object]]:
    alerts = []
    for score in score_stories():
        alerts += engine.on_score(state, score)
    for event in events:
        alerts += engine.on_event(state, event)
    alerts += engine.on_signal(state, DRIFT_SIGNAL, int(BASE.timestamp() * 1000))
    return alerts


def test_every_default_rule_fires_on_its_story_and_stalls_resolve_when_activity_resumes() -> None:
    alerts = run_stories(RuleEngine(RuleSet.load(None)), PartitionState(), story_events())
    firing = {(a["rule"], a["entity_id"]) for a in alerts if a["status"] == "firing"}
    resolved = {(a["rule"], a["entity_id"]) for a in alerts if a["status"] == "resolved"}
    assert set(EXPECTED_FIRING.items()) <= firing
    assert {rule for rule, _ in firing} == set(EXPECTED_FIRING)  # nothing else fires on these stories
    assert set(EXPECTED_RESOLVED.items()) <= resolved
    stall = next(a for a in alerts if a["rule"] == "contract_review_stalled")
    # 5 working days on the EMEA calendar from Monday 10:00 Berlin: the next Monday 10:00 Berlin
    assert stall["starts_at"] == "2026-09-14T08:00:00+00:00"
    assert {r["role"] for r in stall["recipients"]} == {"owner", "manager", "legal"}
    assert {"role": "owner", "id": "rep-01"} in stall["recipients"]
    intent = next(a for a in alerts if a["rule"] == "high_intent")
    assert {e["type"] for e in intent["evidence"]["events"]} == {"page_view", "download", "meeting"}
    assert all(a["rule_version"] == RuleSet.load(None).version for a in alerts)


def test_a_checkpoint_restored_mid_stream_raises_exactly_the_same_alerts() -> None:
    events = story_events()
    engine = RuleEngine(RuleSet.load(None))

    def run(state: PartitionState, part: list[Event], scores: bool) -> list[dict[str, object]]:
        alerts = [a for s in score_stories() for a in engine.on_score(state, s)] if scores else []
        return alerts + [a for e in part for a in engine.on_event(state, e)]

    straight = run(PartitionState(), events, True)
    state = PartitionState()
    first = run(state, events[:12], True)
    rest = run(PartitionState.from_json(state.to_json()), events[12:], False)
    key = lambda a: (a["alert_id"], a["status"])  # noqa: E731
    assert len(straight) > 10
    assert sorted(map(key, first + rest)) == sorted(map(key, straight))


def test_a_duplicate_event_counts_once() -> None:
    rules = RuleSet.parse(
        "rules: [{name: twice, entity: lead, when: {count: {match: {type: download}, within: 1d, at_least: 2}}}]",
        "r.yaml",
    )
    engine, state = RuleEngine(rules), PartitionState()
    event = Event("e1", "download", 0, 0, "a", "l", "", "web", {"asset_kind": "whitepaper"}, ())
    assert engine.on_event(state, event) == [] and engine.on_event(state, event) == []


def test_cooldown_suppresses_a_refire_of_the_same_fingerprint() -> None:
    text = """
rules:
  - {name: hot, entity: lead, cooldown: 2d, when: {count: {match: {type: download}, within: 1h}}}
"""
    engine, state = RuleEngine(RuleSet.parse(text, "r.yaml")), PartitionState()

    def download(i: int, ts: int) -> list[dict[str, object]]:
        return engine.on_event(state, Event(f"e{i}", "download", ts, 0, "a", "l", "", "web", {}, ()))

    hour = 3_600_000
    assert [a["status"] for a in download(1, 0)] == ["firing"]
    assert [a["status"] for a in download(2, 2 * hour)] == ["resolved"]  # the window slid first
    assert download(3, 3 * hour) == []  # within the cooldown
    assert [a["status"] for a in download(4, 60 * hour)] == ["firing"]  # the cooldown (2 days from 1h) is over


@pytest.mark.parametrize(
    ("text", "where", "fragment"),
    [
        ("rules: [{name: x, entity: lead, when: {count: {match: {type: a}, within: 3q}}}]", (1, 66), "duration"),
        ("rules:\n  - name: x\n    entity: planet\n    when: {stage: a}\n", (3, 5), "entity"),
        ("rules:\n  - name: x\n    entity: lead\n    when: {sometimes: {}}\n", (4, 12), "unknown condition"),
        ("rules:\n  - name: x\n    entity: lead\n    message: 'hi {name'\n    when: {stage: a}\n", (4, 5), "template"),
        (
            "rules:\n  - {name: x, entity: lead, when: {stage: a}}\n  - {name: x, entity: lead, when: {stage: b}}\n",
            (3, 6),
            "declared twice",
        ),
        (
            "calendars: {EMEA: {timezone: Mars/Olympus}}\nrules: [{name: x, entity: lead, when: {stage: a}}]",
            (1, 13),
            "time zone",
        ),
        ("stalls: {stages: {lead: soon}}\nrules: []", (1, 19), "stage 'lead'"),
        ("rules: [{name: x, entity: lead, when: {grade: {model: intent, becomes: Z}}}]", (1, 63), "becomes"),
        ("rules: [{name: x, entity: lead, when: {all: [{stage: a}, {count: {match: {}}}]}}]", (1, 67), "filter"),
    ],
)
def test_bad_rules_files_fail_with_file_line_column(text: str, where: tuple[int, int], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RuleSet.parse(text, "rules.yaml")
    assert (caught.value.filename, caught.value.line, caught.value.column) == ("rules.yaml", *where), str(caught.value)
    assert fragment in caught.value.message


def test_working_days_skip_weekends_holidays_and_follow_the_time_zone() -> None:
    cal = BusinessCalendar.parse_spec({"timezone": "Asia/Singapore", "holidays": ["2026-12-25"]}, "APAC")
    friday_evening = iso_ms("2026-12-18T18:00:00+08:00")
    assert ms_iso(cal.deadline(friday_evening, Duration.parse("1wd")), "Asia/Singapore") == "2026-12-21T18:00:00+08:00"
    thursday = iso_ms("2026-12-24T09:00:00+08:00")  # the 25th is a holiday, then a weekend
    assert ms_iso(cal.deadline(thursday, Duration.parse("1wd")), "Asia/Singapore") == "2026-12-28T09:00:00+08:00"
    saturday = iso_ms("2026-12-19T12:00:00+08:00")  # outside working days: counting starts Monday 00:00
    assert ms_iso(cal.deadline(saturday, Duration.parse("2wd")), "Asia/Singapore") == "2026-12-23T00:00:00+08:00"


def test_rules_directory_is_one_rule_set_and_its_version_follows_the_content(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "a.yaml").write_text("rules: [{name: one, entity: lead, when: {stage: a}}]")
    (folder / "b.yaml").write_text("rules: [{name: two, entity: account, when: {stage: b}}]")
    first = RuleSet.load(folder)
    assert [r.name for r in first.rules] == ["one", "two"]
    (folder / "b.yaml").write_text("rules: [{name: two, entity: account, when: {stage: c}}]")
    assert RuleSet.load(folder).version != first.version
    (folder / "c.yaml").write_text("rules: [{name: one, entity: lead, when: {stage: a}}]")
    with pytest.raises(ConfigError, match="also declared"):
        RuleSet.load(folder)


def test_silences_match_like_alertmanager_and_end_on_time() -> None:
    alert = {"rule": "stage_stall", "team": "team-3", "recipients": [{"role": "owner", "id": "rep-07"}]}
    now = int(datetime(2026, 9, 1, tzinfo=UTC).timestamp() * 1000)
    silence = Silence("s1", (Matcher.parse("rule=~stage_.*"), Matcher.parse("recipient=rep-07")), now, now + 1000)
    other = Silence("s2", (Matcher.parse("team!=team-3"),), now, now + 1000)
    assert silenced_by(alert, [silence, other], now) == ["s1"]
    assert silenced_by(alert, [silence], now + 1000) == []
    with pytest.raises(ValueError, match="not a matcher"):
        Matcher.parse("colour=blue")


def test_subscribers_file_errors_name_the_place_and_secrets_come_from_the_environment() -> None:
    text = "subscribers:\n  - {name: crm, url: 'http://x/hook', secret_env: CRM_SECRET, match: {severity: critical}}\n"
    with pytest.raises(ConfigError) as caught:
        SubscriberConfig.parse(text, "subs.yaml", environ={})
    assert (caught.value.line, caught.value.column) == (2, 39) and "CRM_SECRET" in caught.value.message
    config = SubscriberConfig.parse(text, "subs.yaml", environ={"CRM_SECRET": "k"})
    assert [s.name for s in config.route({"severity": "critical"})] == ["crm"]
    assert config.route({"severity": "info"}) == []
    with pytest.raises(ConfigError, match="group_wait"):
        SubscriberConfig.parse("subscribers: [{name: a, url: 'http://x', secret: k, group_wait: 5wd}]", "s.yaml")


def test_a_grade_jump_resolves_once_its_scores_leave_the_window() -> None:
    rules = RuleSet.parse("rules: [{name: up, entity: account, when: {grade: {model: churn, rises_by: 2, within: 1d}}}]",
                          "r.yaml")  # fmt: skip
    engine, state = RuleEngine(rules), PartitionState()
    day = 86_400_000

    def score(ts: int, grade: str) -> dict[str, object]:
        return {"model": "churn", "entity": "account", "entity_id": "a", "account_id": "a", "ts_ms": ts,
                "score": 0.5, "grade": grade}  # fmt: skip

    assert engine.on_score(state, score(0, "D")) == []
    assert [a["status"] for a in engine.on_score(state, score(1000, "B"))] == ["firing"]
    assert [a["status"] for a in engine.advance(state, 3 * day)] == ["resolved"]
