"""A synthetic sales world with hidden ground truth, deterministic by seed.

Accounts (region, industry, product line, owner) have leads and opportunities that move through the stages;
each lead has a latent intent and converts or not; each account has a churn propensity and churns or not; some
opportunities stall. The latent variables never appear in event props: they go to the ground-truth file only.

The stream is event-time ordered with a little lateness, ~1 % malformed and ~0.5 % duplicate records.

>>> world = generate_world(seed=3, target_events=2000)
>>> records = list(world.records())
>>> len(records), records == list(generate_world(seed=3, target_events=2000).records())
(2000, True)
>>> sorted({r.kind for r in records})
['duplicate', 'malformed', 'valid']
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import orjson

from dealpulse.pipelines.contract import PAGE_CATEGORIES

REGIONS = {"APAC": 8, "EMEA": 1, "NA": -5, "LATAM": -3}  # region -> UTC offset hours
INDUSTRIES = ("manufacturing", "retail", "finance", "healthcare", "software", "logistics")
PRODUCT_LINES = ("analytics", "crm", "erp")
STAGE_PATH = ("lead", "outreach", "diagnosis", "presentation", "objection", "negotiation", "contract_review")
FEATURES = ("dashboard", "export", "api", "alerts", "reports", "sso")
CHAT_LINES = {
    "price_objection": [
        "Is there a discount for 3 years?",
        "Our budget is tight this quarter",
        "预算有限，价格能再谈吗",
    ],
    "competitor_comparison": [
        "How do you compare to Salesforce?",
        "We are also talking to a competitor",
        "和竞品对比一下",
    ],
    "delivery_pressure": [
        "We need go-live before March",
        "The deadline is end of quarter",
        "我们需要尽快上线",
    ],
    "neutral": ["Thanks for the call", "Can you resend the deck?", "Who else should join the meeting?"],
}
WORLD_START = datetime(2026, 6, 1, tzinfo=UTC)
EVENTS_PER_LEAD = 60  # rough average, used to size the world for a target event count


@dataclass(frozen=True, slots=True)
class Record:
    """One generated item: its key (account id), its JSON bytes and what it is meant to be."""

    key: str
    value: bytes
    kind: str  # valid | duplicate | malformed
    ts_ms: int


@dataclass
class Truth:
    """The hidden ground truth of a world."""

    leads: dict[str, dict[str, Any]] = field(default_factory=dict)
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    opportunities: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"leads": self.leads, "accounts": self.accounts, "opportunities": self.opportunities},
            option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
        )


@dataclass
class World:
    seed: int
    target_events: int
    events: list[tuple[int, int, dict[str, Any]]]  # (ts_ms, sequence, event)
    truth: Truth

    def records(self) -> Iterator[Record]:
        """The stream as sent: event-time order with lateness, plus malformed and duplicate records."""
        rng = random.Random(self.seed * 7919 + 1)
        ordered = [event for _, _, event in sorted(self.events, key=lambda e: (e[0], e[1]))]
        # a little lateness: ~2 % of events arrive a few positions after later ones
        for i in range(len(ordered) - 1):
            if rng.random() < 0.02:
                j = min(len(ordered) - 1, i + rng.randint(1, 20))
                ordered[i], ordered[j] = ordered[j], ordered[i]
        emitted = 0
        sent: list[dict[str, Any]] = []
        for event in ordered:
            if emitted >= self.target_events:
                return
            roll = rng.random()
            if roll < 0.01:
                yield _malformed(rng, event)
                emitted += 1
            elif roll < 0.015 and sent:
                original = sent[rng.randrange(max(0, len(sent) - 200), len(sent))]
                yield Record(original["account_id"], orjson.dumps(original), "duplicate", _ts_ms(original))
                emitted += 1
            if emitted >= self.target_events:
                return
            sent.append(event)
            yield Record(event["account_id"], orjson.dumps(event), "valid", _ts_ms(event))
            emitted += 1


def _ts_ms(event: dict[str, Any]) -> int:
    return int(datetime.fromisoformat(event["ts"]).timestamp() * 1000)


def _malformed(rng: random.Random, event: dict[str, Any]) -> Record:
    """A realistic bad record: broken JSON, wrong types, unknown type, missing fields, bad time."""
    broken = dict(event, event_id=event["event_id"] + "-bad")
    choice = rng.randrange(6)
    if choice == 0:
        value = orjson.dumps(broken)[: rng.randint(5, 40)]  # truncated JSON
    elif choice == 1:
        value = orjson.dumps(dict(broken, type="fax_received"))
    elif choice == 2:
        value = orjson.dumps({k: v for k, v in broken.items() if k != "account_id"})
    elif choice == 3:
        value = orjson.dumps(dict(broken, ts=broken["ts"][:19]))  # no offset
    elif choice == 4:
        value = orjson.dumps(dict(broken, ts="2099-01-01T00:00:00+00:00"))
    else:
        props = dict(broken.get("props") or {}, dwell_ms="long", page="two", revision=-1, severity="meh")
        value = orjson.dumps(dict(broken, type="doc_page_turn", lead_id=broken.get("lead_id") or "l-x", props=props))
    return Record(event["account_id"], value, "malformed", _ts_ms(event))


class _Builder:
    """Accumulates events with ids, in one place, so every event gets a unique id and a proper timestamp."""

    def __init__(self, rng: random.Random, end: datetime) -> None:
        self.rng = rng
        self.end = end
        self.events: list[tuple[int, int, dict[str, Any]]] = []

    def add(self, when: datetime, tz_hours: int, event_type: str, account: str, props: dict[str, Any],
            lead: str = "", opportunity: str = "", source: str = "web") -> None:  # fmt: skip
        if when >= self.end:
            return
        local = when.astimezone(timezone(timedelta(hours=tz_hours)))
        event: dict[str, Any] = {
            "event_id": f"e-{len(self.events):08d}",
            "type": event_type,
            "ts": local.isoformat(timespec="milliseconds"),
            "account_id": account,
            "source": source,
            "props": props,
        }
        if lead:
            event["lead_id"] = lead
        if opportunity:
            event["opportunity_id"] = opportunity
        self.events.append((int(when.timestamp() * 1000), len(self.events), event))

    def working_time(self, day: datetime, tz_hours: int) -> datetime:
        """A moment during local business hours on ``day``."""
        local_hour = self.rng.uniform(9, 18)
        return day.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(hours=local_hour - tz_hours)


def generate_world(seed: int, target_events: int, days: int = 150, scale: float = 1.0) -> World:
    """Build a world big enough for ``target_events`` records (grown until it is: small worlds vary a lot)."""
    world = _build_world(seed, target_events, days, scale)
    if len(world.events) < target_events * 1.03:
        return generate_world(seed, target_events, days, scale * 1.5)
    return world


def _build_world(seed: int, target_events: int, days: int, scale: float) -> World:
    rng = random.Random(seed)
    end = WORLD_START + timedelta(days=days)
    builder = _Builder(rng, end)
    truth = Truth()
    n_leads = max(4, math.ceil(target_events * 1.05 * scale / EVENTS_PER_LEAD))
    n_accounts = max(2, n_leads // 3)
    lead_counter = 0
    for a in range(n_accounts):
        account = f"acc-{a:05d}"
        region = rng.choice(list(REGIONS))
        tz = REGIONS[region]
        churn_propensity = rng.betavariate(2, 5)
        churns = rng.random() < churn_propensity
        contract_end = (WORLD_START + timedelta(days=rng.randint(30, days + 120))).date()
        owner = f"rep-{rng.randint(1, 12):02d}"
        truth.accounts[account] = {
            "churn_propensity": round(churn_propensity, 4),
            "churns": churns,
            "region": region,
            "contract_end": contract_end.isoformat(),
        }
        builder.add(
            WORLD_START + timedelta(hours=rng.uniform(0, 48)), tz, "account_update", account,
            {"region": region, "industry": rng.choice(INDUSTRIES), "product_line": rng.choice(PRODUCT_LINES),
             "owner": owner, "team": f"team-{owner[-1]}", "contract_end": contract_end.isoformat(),
             "arr": round(rng.lognormvariate(10.5, 0.8), 2)}, source="crm",
        )  # fmt: skip
        _account_usage(builder, rng, account, tz, churn_propensity, churns, contract_end, days)
        for _ in range(3 if a < n_leads % n_accounts else max(1, n_leads // n_accounts)):
            lead = f"lead-{lead_counter:06d}"
            opportunity = f"opp-{lead_counter:06d}"
            lead_counter += 1
            _lead_journey(builder, rng, truth, account, lead, opportunity, tz, days)
    return World(seed, target_events, builder.events, truth)


def _account_usage(builder: _Builder, rng: random.Random, account: str, tz: int, propensity: float,
                   churns: bool, contract_end: date, days: int) -> None:  # fmt: skip
    """Weekly product usage (declining before a churn) and support tickets (more when unhappy)."""
    base = rng.uniform(5, 25)
    for week in range(days // 7):
        decline = (0.82**week) if churns and week > 4 else 1.0
        for _ in range(max(0, int(rng.gauss(base * decline, 2) / 4))):
            when = builder.working_time(WORLD_START + timedelta(days=week * 7 + rng.randint(0, 4)), tz)
            builder.add(when, tz, "feature_use", account, {"feature": rng.choice(FEATURES),
                        "count": rng.randint(1, 30)}, source="product")  # fmt: skip
        if rng.random() < 0.1 + propensity * 0.6:
            when = builder.working_time(WORLD_START + timedelta(days=week * 7 + rng.randint(0, 4)), tz)
            ticket = f"t-{account}-{week}"
            severity = rng.choices(["low", "medium", "high", "critical"], [4, 3, 2 + 4 * propensity, 1])[0]
            builder.add(when, tz, "support_ticket", account,
                        {"ticket_id": ticket, "severity": severity, "status": "open"}, source="support")  # fmt: skip
            builder.add(when + timedelta(days=rng.uniform(0.5, 9)), tz, "support_ticket", account,
                        {"ticket_id": ticket, "severity": severity, "status": "resolved"}, source="support")  # fmt: skip
    end_day = (contract_end - WORLD_START.date()).days
    if end_day < days:
        when = builder.working_time(WORLD_START + timedelta(days=end_day), tz)
        builder.add(when, tz, "outcome", account, {"kind": "churned" if churns else "renewed"}, source="crm")


def _lead_journey(builder: _Builder, rng: random.Random, truth: Truth, account: str, lead: str,
                  opportunity: str, tz: int, days: int) -> None:  # fmt: skip
    intent = rng.betavariate(2, 3)
    converts = rng.random() < intent**1.3
    stalls = rng.random() < 0.15
    # how far the deal gets: converting deals go all the way; others drop out earlier with lower intent
    reach = len(STAGE_PATH) - 1 if converts else min(len(STAGE_PATH) - 1, int(rng.random() * (1 + intent * 7)))
    stall_stage = rng.randint(1, max(1, reach)) if stalls else -1
    day = WORLD_START + timedelta(days=rng.uniform(0, days * 0.6))
    truth.leads[lead] = {"intent": round(intent, 4), "converts": converts, "account_id": account}
    truth.opportunities[opportunity] = {
        "lead_id": lead,
        "account_id": account,
        "stalls": stalls,
        "stall_stage": STAGE_PATH[stall_stage] if stalls else None,
        "converts": converts,
    }
    # real CRMs are messy: some deals skip a stage, some fall back one stage and come forward again
    skip = rng.randint(1, reach - 1) if reach >= 3 and rng.random() < 0.08 else -1
    if skip == stall_stage:
        skip = -1
    revisit = rng.randint(2, reach) if reach >= 3 and rng.random() < 0.06 else -1
    path = [i for i in range(reach + 1) if i != skip]
    if revisit > 0 and revisit in path:
        at = path.index(revisit)
        path[at + 1 : at + 1] = [revisit - 1, revisit]
    previous = None
    stalled_once = False
    for index in path:
        stage = STAGE_PATH[index]
        when = builder.working_time(day, tz)
        builder.add(when, tz, "stage_change", account, {"from_stage": previous, "to_stage": stage} if previous
                    else {"to_stage": stage}, lead, opportunity, "crm")  # fmt: skip
        previous = stage
        stalled_here = index == stall_stage and not stalled_once
        stalled_once = stalled_once or stalled_here
        dwell_days = rng.expovariate(1 / (2 + 4 * (1 - intent))) + 1
        if stalled_here:
            dwell_days += rng.uniform(12, 25)
        _stage_behaviour(builder, rng, account, lead, opportunity, tz, stage, day, dwell_days, intent, stalled_here)
        day += timedelta(days=dwell_days)
    outcome_day = builder.working_time(day, tz)
    if converts:
        builder.add(outcome_day, tz, "stage_change", account, {"from_stage": previous, "to_stage": "won"},
                    lead, opportunity, "crm")  # fmt: skip
        builder.add(outcome_day, tz, "outcome", account, {"kind": "won"}, lead, opportunity, "crm")
    else:
        builder.add(outcome_day, tz, "stage_change", account, {"from_stage": previous, "to_stage": "lost"},
                    lead, opportunity, "crm")  # fmt: skip
        builder.add(outcome_day, tz, "outcome", account, {"kind": "lost"}, lead, opportunity, "crm")


def _stage_behaviour(builder: _Builder, rng: random.Random, account: str, lead: str, opportunity: str, tz: int,
                     stage: str, start: datetime, dwell_days: float, intent: float, stalled: bool) -> None:  # fmt: skip
    """The micro-behaviours of one lead while its opportunity sits in one stage."""
    activity = 0.3 if stalled else 1.0
    n = max(1, int(rng.gauss((2 + 10 * intent) * min(dwell_days, 10) / 4 * activity, 1.5)))
    window = min(dwell_days, 10) if not stalled else 3  # a stalled deal goes quiet after a few days
    kinds = ["page_view"] * 5 + ["doc_open", "doc_page_turn", "doc_page_turn", "chat_message", "download"]
    if intent > 0.5:
        kinds += ["meeting", "doc_annotation", "page_view"]
    for _ in range(n):
        when = builder.working_time(start + timedelta(days=rng.uniform(0, window)), tz)
        kind = rng.choice(kinds)
        props: dict[str, Any]
        if kind == "page_view":
            # weights follow PAGE_CATEGORIES: product_spec, pricing, competitor, case_study, whitepaper, blog, docs, other
            weights = [1 + 4 * intent, 1 + 3 * intent, 1 + 2 * (1 - intent), 1, 1 + intent, 2, 1, 1]
            category = rng.choices(PAGE_CATEGORIES, weights)[0]
            props = {"url": f"/{category}/{rng.randint(1, 40)}", "page_category": category,
                     "dwell_ms": int(rng.lognormvariate(9 + intent, 0.7))}  # fmt: skip
        elif kind == "doc_open":
            props = {
                "doc_id": f"proposal-{opportunity}",
                "doc_kind": rng.choice(["proposal", "deck", "datasheet"]),
            }
        elif kind == "doc_page_turn":
            props = {"doc_id": f"proposal-{opportunity}", "page": rng.randint(1, 24),
                     "dwell_ms": int(rng.lognormvariate(8.5 + intent, 0.6))}  # fmt: skip
        elif kind == "doc_annotation":
            props = {"doc_id": f"proposal-{opportunity}", "page": rng.randint(1, 24)}
        elif kind == "download":
            props = {"asset_id": f"asset-{rng.randint(1, 30)}",
                     "asset_kind": rng.choice(["whitepaper", "case_study", "datasheet"])}  # fmt: skip
        elif kind == "chat_message":
            topic = rng.choices(list(CHAT_LINES), [1 + (stage in ("objection", "negotiation")) * 3, 1, intent * 2, 3])[
                0
            ]
            props = {"channel": rng.choice(["web_chat", "email", "wechat"]), "direction": "inbound",
                     "text": rng.choice(CHAT_LINES[topic])}  # fmt: skip
        else:
            props = {"kind": rng.choice(["demo", "discovery", "review"]),
                     "initiated_by": "customer" if rng.random() < intent else "sales",
                     "duration_min": rng.choice([15, 30, 45, 60])}  # fmt: skip
        builder.add(when, tz, kind, account, props, lead, opportunity if kind != "page_view" else "")
    if not stalled:  # reps log their work; a stalled deal has none
        for _ in range(rng.randint(1, 3)):
            when = builder.working_time(start + timedelta(days=rng.uniform(0, window)), tz)
            builder.add(when, tz, "activity_note", account, {"kind": "call"}, lead, opportunity, "crm")
    if stage == "negotiation":
        for revision in range(1, rng.randint(2, 4)):
            when = builder.working_time(start + timedelta(days=rng.uniform(0, window)), tz)
            builder.add(when, tz, "quote", account, {"quote_id": f"q-{opportunity}", "revision": revision,
                        "amount": round(rng.uniform(5e3, 2e5), 2), "currency": "USD"}, lead, opportunity, "crm")  # fmt: skip
    if stage == "contract_review":
        when = builder.working_time(start + timedelta(days=rng.uniform(0, 2)), tz)
        builder.add(when, tz, "contract_upload", account, {"doc_id": f"contract-{opportunity}"}, lead, opportunity)


def pack_messages(records: Iterable[Record], events_per_message: int) -> Iterator[tuple[str, bytes, int]]:
    """Pack records into Kafka messages: (key, value, item count), per account, at most N events each.

    Malformed records travel alone (one broken item must not take its neighbours down with it).

    >>> recs = [Record("a", b'{"x":1}', "valid", 0), Record("a", b'{"x":2}', "valid", 0), Record("b", b'{', "malformed", 0)]
    >>> list(pack_messages(recs, 10))
    [('b', b'{', 1), ('a', b'[{"x":1},{"x":2}]', 2)]
    """
    if events_per_message <= 1:
        for record in records:
            yield record.key, record.value, 1
        return
    buffers: dict[str, list[bytes]] = {}
    for record in records:
        if record.kind == "malformed":
            yield record.key, record.value, 1
            continue
        buffer = buffers.setdefault(record.key, [])
        buffer.append(record.value)
        if len(buffer) >= events_per_message:
            yield record.key, b"[" + b",".join(buffer) + b"]", len(buffer)
            del buffers[record.key]
    for key, buffer in buffers.items():
        yield key, b"[" + b",".join(buffer) + b"]", len(buffer)
