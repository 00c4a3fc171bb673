"""The features file and the feature engine: errors with positions, event-time windows, bounded state."""

from __future__ import annotations

import orjson
import pytest

from dealpulse.pipelines.config_errors import ConfigError
from dealpulse.pipelines.contract import ContractRules, Event, validate_event
from dealpulse.pipelines.features import (
    DAY_MS,
    FeatureSpec,
    evaluator,
    feature_value,
    new_state,
    snapshot_value,
    update_state,
)
from dealpulse.pipelines.generator import generate_world

MODELS = "models: {intent: {entity: lead}, churn: {entity: account}}\n"


def spec_of(features: str, models: str = MODELS) -> FeatureSpec:
    return FeatureSpec.parse(models + "features:\n" + features, "f.yaml")


ACCOUNT_ONLY = "models: {churn: {entity: account}}\n"
LEAD_ONLY = "models: {intent: {entity: lead}}\n"


@pytest.mark.parametrize(
    ("body", "at", "message"),
    [
        ("  - {name: x, entity: lead, kind: counts, match: {type: meeting}}\n", "kind", "'kind' must be one of"),
        ("  - {name: x, entity: lead, kind: count, window: 3 days, match: {type: meeting}}\n", "window", "duration"),
        ("  - {name: X, entity: lead, kind: count, match: {type: meeting}}\n", "name", "snake_case"),
        ("  - {name: x, entity: lead, kind: sum, match: {type: meeting}}\n", "{", "needs 'prop'"),
        ("  - {name: x, entity: lead, kind: count, match: {type: meeting}, colour: red}\n", "colour", "unknown key"),
        ("  - {name: x, entity: deal, kind: count, match: {type: meeting}}\n", "entity", "'entity' must be"),
        ("  - {name: x, entity: lead, kind: count, match: {props: {a: 1}}}\n", "match", "needs at least a 'type'"),
    ],
)
def test_bad_features_files_name_file_line_column(body: str, at: str, message: str) -> None:
    """The error points at the offending key (line 3: the feature's line after 'models' and 'features')."""
    with pytest.raises(ConfigError) as caught:
        spec_of(body)
    error = caught.value
    assert (error.filename, error.line, error.column) == ("f.yaml", 3, body.index(at) + 1), str(error)
    assert message in error.message


def test_broken_yaml_is_located() -> None:
    with pytest.raises(ConfigError, match=r"^f.yaml:4:1: invalid YAML"):
        spec_of("  - {name: x, entity: lead, kind: count, match: {type: meeting}\n")


def test_duplicate_names_and_models_without_features_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"f.yaml:4:\d+: feature 'a' is declared twice"):
        spec_of(
            "  - {name: a, entity: lead, kind: count, match: {type: meeting}}\n"
            "  - {name: a, entity: account, kind: count, match: {type: meeting}}\n"
        )
    with pytest.raises(ConfigError, match="model 'churn' has no account features"):
        spec_of("  - {name: a, entity: lead, kind: count, match: {type: meeting}}\n")


def fold(spec: FeatureSpec, state: dict, event_type: str, day: float, **props: object) -> None:
    update_state(spec, "account", state, event_type, int(day * DAY_MS), dict(props), tuple(props.pop("kw", ())))


def test_windows_follow_event_time_including_late_events() -> None:
    spec = spec_of(
        "  - {name: views_3d, entity: account, kind: count, window: 3d, match: {type: page_view}}\n"
        "  - {name: dwell_7d, entity: account, kind: sum, prop: dwell_ms, window: 7d, match: {type: page_view}}\n"
        "  - {name: top_dwell, entity: account, kind: max, prop: dwell_ms, match: {type: page_view}}\n",
        ACCOUNT_ONLY,
    )
    state = new_state()
    fold(spec, state, "page_view", 0.5, dwell_ms=100)
    fold(spec, state, "page_view", 5.5, dwell_ms=200)
    assert spec.vector("account", state) == [1.0, 300.0, 200.0]
    fold(spec, state, "page_view", 4.5, dwell_ms=50)  # late, but inside both windows
    assert spec.vector("account", state) == [2.0, 350.0, 200.0]
    fold(spec, state, "page_view", 9.5, dwell_ms=1)  # day 0 and days 4-5 leave the 3-day window
    assert spec.vector("account", state) == [1.0, 251.0, 200.0]


def test_open_items_week_over_week_and_days_until() -> None:
    spec = spec_of(
        "  - {name: open_high, entity: account, kind: open_items, prop: ticket_id, status_prop: status,\n"
        "     closed: [resolved], match: {type: support_ticket, props: {severity: [high, critical]}}}\n"
        "  - {name: usage_wow, entity: account, kind: wow_change, prop: count, match: {type: feature_use}}\n"
        "  - {name: renewal_in, entity: account, kind: days_until, prop: contract_end, match: {type: account_update}}\n",
        ACCOUNT_ONLY,
    )
    state = new_state()
    fold(spec, state, "support_ticket", 1, ticket_id="t1", severity="high", status="open")
    fold(spec, state, "support_ticket", 1, ticket_id="t2", severity="low", status="open")
    fold(spec, state, "support_ticket", 2, ticket_id="t3", severity="critical", status="open")
    fold(spec, state, "support_ticket", 3, ticket_id="t1", severity="high", status="resolved")
    fold(spec, state, "feature_use", 3, count=10)  # last week (days -3..3 relative to day 10)
    fold(spec, state, "feature_use", 9, count=4)  # this week
    fold(spec, state, "account_update", 10, contract_end="1970-02-09")  # day 39
    assert spec.vector("account", state) == [1.0, -0.6, 29.0]


def test_keywords_match_any_tag() -> None:
    spec = spec_of(
        "  - {name: pricing_talk, entity: lead, kind: count, match: {type: chat_message, keywords: [price_objection]}}\n"
        "  - {name: usage, entity: account, kind: count, match: {type: feature_use}}\n"
    )
    state = new_state()
    update_state(spec, "lead", state, "chat_message", 0, {}, ("competitor_comparison",))
    update_state(spec, "lead", state, "chat_message", 1, {}, ("price_objection", "delivery_pressure"))
    assert spec.vector("lead", state) == [1.0]


def test_shipped_features_keep_a_busy_leads_state_under_one_kilobyte() -> None:
    """The state (with its labelling snapshots) of the busiest lead of a generated world stays small."""
    from dealpulse.pipelines.scoring import EntityStates, Scorer

    spec = FeatureSpec.default()
    scorer = Scorer(spec)
    rules = ContractRules.default()
    states = EntityStates(load=lambda entity, key: None, fingerprint=spec.fingerprint)
    world = generate_world(seed=11, target_events=20_000)
    per_lead: dict[str, int] = {}
    for _, _, raw in sorted(world.events, key=lambda e: (e[0], e[1])):
        event = validate_event(raw, rules, now_ms=1_900_000_000_000)
        assert isinstance(event, Event)
        if event.type == "outcome":
            continue  # measure open leads: an outcome clears the snapshots
        scorer.process(event, states, {})
        if event.lead_id:
            per_lead[event.lead_id] = per_lead.get(event.lead_id, 0) + 1
    busiest = max(per_lead, key=per_lead.__getitem__)
    sizes = sorted(len(orjson.dumps(state)) for (entity, _), state in states.cache.items() if entity == "lead")
    assert per_lead[busiest] > 100
    assert len(orjson.dumps(states.cache[("lead", busiest)])) <= 1024
    assert sizes[int(len(sizes) * 0.99)] <= 1024, sizes[-5:]


def test_specialised_evaluators_agree_with_feature_value_on_the_generators_world() -> None:
    spec = FeatureSpec.default()
    rules = ContractRules.default()
    states: dict[tuple[str, str], dict[str, object]] = {}
    compared = 0
    for record in generate_world(5, 3000).records():
        if record.kind != "valid":
            continue
        event = validate_event(orjson.loads(record.value), rules, 2**62)
        if not isinstance(event, Event):
            continue
        for entity, key in (("lead", event.lead_id), ("account", event.account_id)):
            if not key:
                continue
            state = states.setdefault((entity, key), new_state())
            update_state(spec, entity, state, event.type, event.ts_ms, event.props, event.keywords)
            for feature in spec.of(entity):
                current = state["s"].get(feature.key)  # type: ignore[attr-defined]
                if current is not None:
                    # also later than the newest event, and far enough for every cap (90 days since, a year until)
                    now = state["t"] + DAY_MS * (0, 1, 4, 100, 400)[compared % 5]
                    assert evaluator(feature)(current, now) == feature_value(feature, current, now), feature.name
                    compared += 1
    assert compared > 1000


def test_snapshot_is_the_vector_compacted_on_the_generators_world() -> None:
    """The one-pass snapshot equals the vector, value by value, as a snapshot keeps it (empty features included)."""
    spec = FeatureSpec.default()
    rules = ContractRules.default()
    states: dict[tuple[str, str], dict[str, object]] = {}
    compared = fractional = 0
    for record in generate_world(5, 3000).records():
        event = validate_event(orjson.loads(record.value), rules, 2**62) if record.kind == "valid" else None
        if not isinstance(event, Event):
            continue
        for entity, key in (("lead", event.lead_id), ("account", event.account_id)):
            if key:
                state = states.setdefault((entity, key), new_state())
                update_state(spec, entity, state, event.type, event.ts_ms, event.props, event.keywords)
                vector, snapshot = spec.vector_and_snapshot(entity, state)
                assert vector == spec.vector(entity, state)
                assert snapshot == [snapshot_value(v) for v in vector]
                assert [type(v) for v in snapshot] == [type(snapshot_value(v)) for v in vector]  # 3, not 3.0
                compared += 1
                fractional += sum(isinstance(v, float) and v != round(v) for v in snapshot)
    assert compared > 1000 and fractional > 100


@pytest.mark.parametrize("kind", ["count", "sum", "max"])
def test_all_time_totals_are_capped_like_feature_value(kind: str) -> None:
    prop = "" if kind == "count" else ", prop: amount"
    spec = spec_of(f"  - {{name: x, entity: lead, kind: {kind}, cap: 2{prop}, match: {{type: quote}}}}\n", LEAD_ONLY)
    (feature,) = spec.of("lead")
    for total in (0.0, 1.0, 2.0, 2.5, 40.0):
        assert evaluator(feature)(total, 0) == feature_value(feature, total, 0)
    assert evaluator(feature)(40.0, 0) == 2.0
