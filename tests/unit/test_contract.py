"""Event contract v1: every type accepted, every rejection reason produced, schema and validator agree."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from dealpulse.pipelines.contract import (
    TYPES,
    ContractRules,
    Event,
    Reason,
    Rejection,
    json_schema,
    parse_ts,
    validate_event,
)
from dealpulse.pipelines.generator import generate_world
from dealpulse.pipelines.ingest import decode_message

NOW_MS = 1_795_000_000_000  # 2026-11-19, so the examples below are in range
RULES = ContractRules.default()

# one valid example per v1 type: adding a type to the contract without an example fails test_every_type_has_an_example
EXAMPLES: dict[str, dict[str, Any]] = {
    "page_view": {"lead_id": "l1", "props": {"url": "/p/x/spec", "page_category": "product_spec", "dwell_ms": 5300}},
    "doc_open": {"lead_id": "l1", "props": {"doc_id": "d1", "doc_kind": "proposal"}},
    "doc_page_turn": {"lead_id": "l1", "props": {"doc_id": "d1", "page": 3, "dwell_ms": 1200}},
    "doc_annotation": {"lead_id": "l1", "props": {"doc_id": "d1", "page": 3}},
    "download": {"lead_id": "l1", "props": {"asset_id": "wp-1", "asset_kind": "whitepaper"}},
    "chat_message": {
        "lead_id": "l1",
        "props": {"channel": "web_chat", "direction": "inbound", "text": "what is the price?"},
    },
    "meeting": {"props": {"kind": "demo", "initiated_by": "customer", "duration_min": 30}},
    "quote": {"opportunity_id": "o1", "props": {"quote_id": "q1", "revision": 2, "amount": 1200.5, "currency": "EUR"}},
    "contract_upload": {"opportunity_id": "o1", "props": {"doc_id": "c1"}},
    "stage_change": {"opportunity_id": "o1", "props": {"from_stage": "lead", "to_stage": "outreach"}},
    "activity_note": {"opportunity_id": "o1", "props": {}},
    "feature_use": {"props": {"feature": "export", "count": 3}},
    "support_ticket": {"props": {"ticket_id": "t1", "severity": "high", "status": "open"}},
    "account_update": {"props": {"region": "EMEA", "contract_end": "2027-03-31", "arr": 120000}},
    "outcome": {"lead_id": "l1", "props": {"kind": "won"}},
    "feedback": {"props": {"ref_id": "alert-1", "verdict": "accepted"}},
}


def make(event_type: str, **changes: Any) -> dict[str, Any]:
    event = {"event_id": f"e-{event_type}", "type": event_type, "ts": "2026-11-18T09:15:02.120+08:00",
             "account_id": "acme", "source": "test", **copy.deepcopy(EXAMPLES[event_type])}  # fmt: skip
    event.update(changes)
    return event


def test_every_type_has_an_example() -> None:
    assert set(EXAMPLES) == set(TYPES)


@pytest.mark.parametrize("event_type", sorted(TYPES))
def test_every_type_validates(event_type: str) -> None:
    result = validate_event(make(event_type), RULES, NOW_MS)
    assert isinstance(result, Event), result
    assert result.type == event_type and result.account_id == "acme"
    expected_ms = int(datetime(2026, 11, 18, 1, 15, 2, 120000, tzinfo=UTC).timestamp() * 1000)
    assert result.ts_ms == expected_ms and result.tz_offset_min == 480


@pytest.mark.parametrize("event_type", sorted(TYPES))
def test_json_schema_accepts_every_example(event_type: str) -> None:
    jsonschema.validate(make(event_type), json_schema())


def test_unknown_extra_props_are_kept() -> None:
    event = make("feature_use")
    event["props"]["plan"] = "gold"
    result = validate_event(event, RULES, NOW_MS)
    assert isinstance(result, Event) and result.props["plan"] == "gold"


def test_chat_text_becomes_keyword_tags_and_is_not_kept() -> None:
    event = make("chat_message")
    event["props"]["text"] = "预算不够, and we compare you to a competitor; go-live is in May"
    result = validate_event(event, RULES, NOW_MS)
    assert isinstance(result, Event)
    assert result.keywords == ("competitor_comparison", "delivery_pressure", "price_objection")
    assert "text" not in result.props and result.props["keywords"] == list(result.keywords)
    assert "预算" not in orjson.dumps(result.props).decode()


def test_chat_explicit_keywords_are_merged() -> None:
    event = make("chat_message", props={"keywords": ["budget_review"], "text": "discount please"})
    result = validate_event(event, RULES, NOW_MS)
    assert isinstance(result, Event) and result.keywords == ("budget_review", "price_objection")


def rejection(obj: Any) -> Rejection:
    result = validate_event(obj, RULES, NOW_MS)
    assert isinstance(result, Rejection), f"expected a rejection, got {result}"
    return result


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"event_id": ""}, "event_id"),
        ({"event_id": "x" * 65}, "event_id"),
        ({"account_id": None}, "account_id"),
        ({"account_id": 42}, "account_id"),
        ({"lead_id": None}, "lead_id"),
        ({"ts": "2026-11-18T09:15:02"}, "ts"),
        ({"ts": "yesterday"}, "ts"),
        ({"props": []}, "props"),
        ({"props": {"url": "/x", "page_category": "gossip"}}, "props.page_category"),
        ({"props": {"page_category": "pricing"}}, "props.url"),
        ({"props": {"url": "/x", "page_category": "pricing", "dwell_ms": "long"}}, "props.dwell_ms"),
        ({"props": {"url": "/x", "page_category": "pricing", "dwell_ms": -5}}, "props.dwell_ms"),
        ({"props": {"url": "/x", "page_category": "pricing", "dwell_ms": True}}, "props.dwell_ms"),
        ({"source": 7}, "source"),
    ],
)
def test_schema_violations_name_the_field(changes: dict[str, Any], field: str) -> None:
    result = rejection(make("page_view", **changes))
    assert result.reason == Reason.SCHEMA_VIOLATION
    assert result.field == field
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(make("page_view", **changes), json_schema())


@pytest.mark.parametrize(
    ("event_type", "changes", "field"),
    [
        ("quote", {"opportunity_id": None}, "opportunity_id"),
        ("quote", {"props": {"quote_id": "q", "revision": 0, "amount": 1, "currency": "EUR"}}, "props.revision"),
        ("stage_change", {"props": {"to_stage": "limbo"}}, "props.to_stage"),
        ("meeting", {"props": {"kind": "demo", "initiated_by": "robot"}}, "props.initiated_by"),
        ("account_update", {"props": {"contract_end": "next spring"}}, "props.contract_end"),
        ("outcome", {"lead_id": None, "props": {"kind": "lost"}}, "lead_id"),
        ("chat_message", {"props": {"channel": "email"}}, "props"),
        ("feedback", {"props": {"ref_id": "a", "verdict": "maybe"}}, "props.verdict"),
        ("support_ticket", {"props": {"ticket_id": "t", "severity": "meh", "status": "open"}}, "props.severity"),
    ],
)
def test_type_specific_violations(event_type: str, changes: dict[str, Any], field: str) -> None:
    result = rejection(make(event_type, **changes))
    assert (result.reason, result.field) == (Reason.SCHEMA_VIOLATION, field)


def test_unknown_type() -> None:
    result = rejection(dict(make("feature_use"), type="fax_received"))
    assert (result.reason, result.field) == (Reason.UNKNOWN_TYPE, "type")


def test_not_an_object() -> None:
    assert rejection([1, 2]).reason == Reason.NOT_AN_OBJECT


@pytest.mark.parametrize("ts", ["1999-12-31T23:59:59Z", "2026-11-21T00:00:00Z"])
def test_timestamp_out_of_range(ts: str) -> None:
    assert rejection(make("feature_use", ts=ts)).reason == Reason.TIMESTAMP_OUT_OF_RANGE


@pytest.mark.parametrize(
    "ts",
    [
        "2026-11-20T09:15:02.123+08:00",
        "2026-03-29T01:59:59.999999-05:30",  # a negative offset with minutes; microseconds floor to the millisecond
        "1969-12-31T23:59:59.9995+00:00",  # before the epoch: floors, too
        "2026-11-20 09:15:02.123456+14:00",
        "2026-11-20T09:15:02-00:01",
        "2026-11-20T09:15:02Z",
        "2024-02-29T23:59:59.001+23:59",
    ],
)
def test_parse_ts_matches_datetime_arithmetic(ts: str) -> None:
    moment = datetime.fromisoformat(ts)
    offset = moment.utcoffset()
    assert offset is not None
    expected = ((moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1),
                int(offset.total_seconds() // 60))  # fmt: skip
    assert parse_ts(ts) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"event_id": "e1", "type": ', Reason.MALFORMED_JSON),
        (b"\xff\xfe{}", Reason.INVALID_UTF8),
        (b"[]", Reason.EMPTY_BATCH),
        (b"[" + b",".join([b"{}"] * 11) + b"]", Reason.TOO_MANY_EVENTS),
        (b"{" + b" " * 2000 + b"}", Reason.TOO_LARGE),
    ],
)
def test_message_level_rejections(raw: bytes, reason: Reason) -> None:
    result = decode_message(raw, max_bytes=1024, max_events=10)
    assert isinstance(result, Rejection) and result.reason == reason


def test_every_reason_is_exercised() -> None:
    """Each Reason member appears in one of the tests above (guards against a reason nobody can produce)."""
    source = Path(__file__).read_text(encoding="utf-8")
    for reason in Reason:
        assert f"Reason.{reason.name}" in source


def test_schema_and_validator_agree_on_generated_stream() -> None:
    schema = jsonschema.Draft202012Validator(json_schema())
    for record in generate_world(seed=5, target_events=3000).records():
        try:
            decoded = orjson.loads(record.value)
        except orjson.JSONDecodeError:
            continue
        ours = validate_event(decoded, RULES, NOW_MS)
        theirs = schema.is_valid(decoded)
        if isinstance(ours, Rejection) and ours.reason == Reason.TIMESTAMP_OUT_OF_RANGE:
            continue  # a time window is not expressible in JSON Schema
        assert isinstance(ours, Event) == theirs, (record, ours)
        assert (record.kind != "malformed") == isinstance(ours, Event)
