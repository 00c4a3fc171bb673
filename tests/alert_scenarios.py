"""Hand-built event stories, one per default rule, with the alerts they must raise (used by unit and integration
tests alike: the pure engine and the alerter process must agree)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

BASE = datetime(2026, 9, 7, 8, 0, tzinfo=UTC)  # a Monday, 10:00 in Berlin (the EMEA calendar)


def _event(n: int, kind: str, at: timedelta, account: str, props: dict[str, Any], lead: str = "",
           opportunity: str = "") -> dict[str, Any]:  # fmt: skip
    event: dict[str, Any] = {"event_id": f"s-{n:04d}", "type": kind, "ts": (BASE + at).isoformat(),
                             "account_id": account, "source": "test", "props": props}  # fmt: skip
    if lead:
        event["lead_id"] = lead
    if opportunity:
        event["opportunity_id"] = opportunity
    return event


def rule_stories() -> list[dict[str, Any]]:
    """Events in time order covering every default event rule, stalls and their resolution."""
    h, d = timedelta(hours=1), timedelta(days=1)
    contract_end = (BASE + 40 * d).date().isoformat()
    items: list[tuple[timedelta, str, str, dict[str, Any], str, str]] = [
        (
            0 * h,
            "account_update",
            "acme",
            {"region": "EMEA", "owner": "rep-01", "team": "team-1", "contract_end": contract_end},
            "",
            "",
        ),
        (
            0 * h,
            "account_update",
            "beta",
            {"region": "NA", "owner": "rep-02", "team": "team-2", "contract_end": (BASE + 300 * d).date().isoformat()},
            "",
            "",
        ),
        # high_intent: spec twice in 3 days, a whitepaper and a customer-booked meeting
        (1 * h, "page_view", "acme", {"url": "/spec/1", "page_category": "product_spec"}, "lead-1", ""),
        (2 * h, "page_view", "acme", {"url": "/spec/2", "page_category": "product_spec"}, "lead-1", ""),
        (3 * h, "download", "acme", {"asset_id": "wp-1", "asset_kind": "whitepaper"}, "lead-1", ""),
        (4 * h, "meeting", "acme", {"kind": "demo", "initiated_by": "customer", "duration_min": 30}, "lead-1", ""),
        # competitor_risk: three competitor pages, contract ends in 40 days
        (5 * h, "page_view", "acme", {"url": "/vs/1", "page_category": "competitor"}, "lead-2", ""),
        (6 * h, "page_view", "acme", {"url": "/vs/2", "page_category": "competitor"}, "lead-2", ""),
        (7 * h, "page_view", "acme", {"url": "/vs/3", "page_category": "competitor"}, "lead-2", ""),
        # contract_review_stalled + stage_stall: into contract review, then silence
        (
            0 * h,
            "stage_change",
            "acme",
            {"from_stage": "negotiation", "to_stage": "contract_review"},
            "lead-3",
            "opp-3",
        ),
        # quote_revision_overdue: a quote, the customer pushes back on price, no second quote
        (
            1 * h,
            "quote",
            "acme",
            {"quote_id": "q-4", "revision": 1, "amount": 1000.0, "currency": "EUR"},
            "lead-4",
            "opp-4",
        ),
        (
            2 * h,
            "chat_message",
            "acme",
            {"channel": "email", "direction": "inbound", "text": "Our budget is tight, can you do better?"},
            "lead-4",
            "opp-4",
        ),
        # usage_declining on beta: 6, 4, 2 uses in three weeks running
        *[(k * 4 * h, "feature_use", "beta", {"feature": "api"}, "", "") for k in range(6)],
        *[(7 * d + k * 4 * h, "feature_use", "beta", {"feature": "api"}, "", "") for k in range(4)],
        *[(14 * d + k * 4 * h, "feature_use", "beta", {"feature": "api"}, "", "") for k in range(2)],
        # activity resumes on opp-3: both stall alerts resolve
        (12 * d, "activity_note", "acme", {"kind": "call"}, "lead-3", "opp-3"),
        # a late tick moves the watermark past the week boundary and every timer
        (22 * d, "account_update", "acme", {"arr": 12000.0}, "", ""),
    ]
    items.sort(key=lambda item: item[0])
    return [_event(n, kind, at, account, props, lead, opp) for n, (at, kind, account, props, lead, opp) in
            enumerate(items)]  # fmt: skip


def score_stories() -> list[dict[str, Any]]:
    """Scores as the worker publishes them: an intent grade jumping to A, a churn grade rising two tiers."""
    t = int(BASE.timestamp() * 1000)

    def score(n: int, model: str, entity: str, entity_id: str, account: str, value: float, grade: str,
              at_h: int) -> dict[str, Any]:  # fmt: skip
        return {"score_id": f"{entity}:{entity_id}:x{n}", "model": model, "entity": entity, "entity_id": entity_id,
                "account_id": account, "event_id": f"x{n}", "ts_ms": t + at_h * 3_600_000, "score": value,
                "grade": grade, "model_version": 3, "cold": False}  # fmt: skip

    return [
        score(1, "intent", "lead", "lead-6", "acme", 0.30, "C", 1),
        score(2, "intent", "lead", "lead-6", "acme", 0.81, "A", 2),
        score(3, "churn", "account", "beta", "beta", 0.10, "D", 1),
        score(4, "churn", "account", "beta", "beta", 0.60, "B", 30),
    ]


DRIFT_SIGNAL = {"signal": "model_drift", "model": "intent", "version": 7, "examples": 1500}

EXPECTED_FIRING = {
    "high_intent": "lead-1",
    "competitor_risk": "acme",
    "contract_review_stalled": "opp-3",
    "stage_stall": "opp-3",
    "quote_revision_overdue": "opp-4",
    "usage_declining": "beta",
    "intent_grade_a": "lead-6",
    "churn_risk_rising": "beta",
    "model_drift": "intent",
}
EXPECTED_RESOLVED = {"contract_review_stalled": "opp-3", "stage_stall": "opp-3"}
