"""Declarative alert rules and stage-stall detection, evaluated on event time. No I/O here.

A rules file (YAML; see ``rules.yaml`` for the shipped default set) declares business calendars, per-stage stall
thresholds and rules. A rule is about one entity kind (lead, account, opportunity, or model for operational
signals); its condition combines (``all`` / ``any`` / ``not``):

- ``count``: at least N events matching a filter within a duration;
- ``sequence``: matching events in order within a duration;
- ``absent``: no matching event for a duration (calendar time or working days) since the stage began, since an
  anchor event, or since the entity was first seen;
- ``grade`` / ``score``: a grade becomes X, rises or falls by N tiers within a duration, a score above/below;
- ``attribute``: a comparison on an account / opportunity attribute, e.g. ``contract_end`` within 60 days;
- ``stage``: the current stage; ``signal``: an operational signal (``model_drift``) within a duration.

A condition that holds makes the rule *fire* (once per rule and entity: the fingerprint); when it stops holding
the alert *resolves*. Conditions say when they may change without new events (a window slides, a deadline
passes); the :class:`RuleEngine` keeps those as timers and fires them as the watermark passes them.

>>> rules = RuleSet.parse('''
... rules:
...   - name: spec_interest
...     entity: lead
...     severity: info
...     notify: [owner]
...     message: "{entity_id} read the spec {count} times"
...     when: {count: {match: {type: page_view, props: {page_category: product_spec}}, within: 3d, at_least: 2}}
... ''', "rules.yaml")
>>> engine = RuleEngine(rules)
>>> state = PartitionState()
>>> def view(i, ts):
...     return Event(f"e{i}", "page_view", ts, 0, "acme", "lead-1", "", "web", {"page_category": "product_spec"}, ())
>>> engine.on_event(state, view(1, 0))
[]
>>> [(a["status"], a["rule"], a["message"]) for a in engine.on_event(state, view(2, 3_600_000))]
[('firing', 'spec_interest', 'lead-1 read the spec 2 times')]
>>> [(a["status"], a["ends_at"]) for a in engine.advance(state, 4 * 86_400_000)]  # the window slid past the first
[('resolved', '1970-01-04T00:00:00+00:00')]
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from dealpulse.pipelines.calendar import DAY_MS, BusinessCalendar, Duration, ms_iso
from dealpulse.pipelines.config_errors import ConfigError, error_at, load_yaml
from dealpulse.pipelines.contract import Event

ENTITY_KINDS = ("lead", "account", "opportunity", "model")
SEVERITIES = ("info", "warning", "critical")
GRADES = ("A", "B", "C", "D")  # A: the highest score (highest intent, or highest churn risk)
ALERT_SCHEMA = "dealpulse.alert/v1"
MAX_MATCHES = 32  # per condition and entity: bounds state; counts above this saturate
MAX_EVIDENCE_EVENTS = 10
GRADE_HISTORY = 16
MAX_LINKED_OPPORTUNITIES = 8
NO_TIMER = 1 << 62
_PROP_OPS = ("eq", "ne", "in", "gt", "gte", "lt", "lte")


# --- filters and conditions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """An event filter: type(s), prop tests (a value, a list, or {gte, lt, in, ...}) and keyword tags (any)."""

    types: frozenset[str]
    props: tuple[tuple[str, str, Any], ...] = ()  # (prop, op, operand)
    keywords: frozenset[str] = frozenset()

    def matches(self, event: Event) -> bool:
        if self.types and event.type not in self.types:
            return False
        for name, op, operand in self.props:
            if not _compare(event.props.get(name), op, operand):
                return False
        return not self.keywords or any(tag in self.keywords for tag in event.keywords)


def _compare(value: Any, op: str, operand: Any) -> bool:
    if op == "eq":
        return bool(value == operand)
    if op == "ne":
        return bool(value != operand)
    if op == "in":
        return value in operand
    if value is None or isinstance(value, bool):
        return False
    left: Any
    right: Any
    try:
        left, right = (float(value), float(operand)) if not isinstance(operand, str) else (str(value), operand)
    except (TypeError, ValueError):
        return False
    return bool({"gt": left > right, "gte": left >= right, "lt": left < right, "lte": left <= right}[op])


@dataclass(frozen=True, slots=True)
class Result:
    """A condition's value at time t, the earliest time it may change without new events, and why."""

    ok: bool
    next_ms: int = NO_TIMER
    evidence: tuple[dict[str, Any], ...] = ()
    values: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Context:
    """What a condition sees: the entity's state, its account's state, the time and the entity's calendar."""

    state: dict[str, Any]
    account: dict[str, Any] | None
    t: int
    calendar: BusinessCalendar
    explain: bool = True  # False: only ok and next_ms matter (evidence and values are built for alerts only)

    def attribute(self, name: str) -> Any:
        value = self.state.get("attrs", {}).get(name)
        if value is None and self.account is not None:
            value = self.account.get("attrs", {}).get(name)
        return value

    def matches(self, key: str) -> list[list[Any]]:
        return [m for m in self.state.get("m", {}).get(key, ()) if m[0] <= self.t]


class Condition:
    """Base of all conditions. ``key`` names the match lists a condition keeps in entity state."""

    key: str = ""

    def evaluate(self, ctx: Context) -> Result:
        raise NotImplementedError

    def trackers(self) -> Iterable[tuple[str, Match, int]]:
        """(state key, filter, how long matches are kept) of the events this condition needs to remember."""
        return ()

    def buckets(self) -> Iterable[tuple[str, Match, int, int, int]]:
        """(state key, filter, period, offset, periods kept) of the events this condition counts per period."""
        return ()


def _brief(match: list[Any]) -> dict[str, Any]:
    return {"event_id": match[1], "type": match[2], "ts": ms_iso(match[0]), **match[3]}


@dataclass(frozen=True)
class Count(Condition):
    match: Match
    within: Duration
    at_least: int
    key: str = ""

    def trackers(self) -> Iterable[tuple[str, Match, int]]:
        return [(self.key, self.match, self.within.ms)]

    def evaluate(self, ctx: Context) -> Result:
        recent = [m for m in ctx.matches(self.key) if m[0] > ctx.t - self.within.ms]
        values = ((f"count[{self.key}]", len(recent)),) if ctx.explain else ()
        if len(recent) >= self.at_least:
            # it stops holding when the oldest of the newest `at_least` leaves the window
            leaves = sorted(m[0] for m in recent)[-self.at_least] + self.within.ms
            evidence = tuple(_brief(m) for m in recent[-MAX_EVIDENCE_EVENTS:]) if ctx.explain else ()
            return Result(True, leaves, evidence, values)
        return Result(False, values=values)


@dataclass(frozen=True)
class Sequence_(Condition):
    steps: tuple[Match, ...]
    within: Duration
    key: str = ""

    def trackers(self) -> Iterable[tuple[str, Match, int]]:
        return [(f"{self.key}.{i}", step, self.within.ms * 2) for i, step in enumerate(self.steps)]

    def evaluate(self, ctx: Context) -> Result:
        lists = [sorted(ctx.matches(f"{self.key}.{i}")) for i in range(len(self.steps))]
        best: list[list[Any]] | None = None
        for last in reversed(lists[-1]):  # the newest completion first
            if last[0] <= ctx.t - self.within.ms:
                break
            chain = [last]
            for earlier in reversed(lists[:-1]):
                before = [m for m in earlier if m[0] <= chain[0][0] and m[1] not in {c[1] for c in chain}]
                if not before:
                    break
                chain.insert(0, before[-1])
            if len(chain) == len(self.steps) and chain[-1][0] - chain[0][0] <= self.within.ms:
                best = chain
                break
        if best is None:
            return Result(False)
        return Result(True, best[-1][0] + self.within.ms, tuple(_brief(m) for m in best))


@dataclass(frozen=True)
class Absent(Condition):
    """No matching event for ``duration`` since ``since``: stage | first_seen | an anchor filter."""

    match: Match
    duration: Duration
    since: str = "first_seen"
    anchor: Match | None = None
    key: str = ""

    def trackers(self) -> Iterable[tuple[str, Match, int]]:
        keep = self.duration.nominal_ms * 2
        out = [(self.key, self.match, keep)]
        if self.anchor is not None:
            out.append((f"{self.key}.anchor", self.anchor, keep))
        return out

    def evaluate(self, ctx: Context) -> Result:
        if self.anchor is not None:
            anchors = ctx.matches(f"{self.key}.anchor")
            if not anchors:
                return Result(False)
            base, base_evidence = anchors[-1][0], [_brief(anchors[-1])]
        elif self.since == "stage":
            if not ctx.state.get("stage") or ctx.state.get("stage_ts", NO_TIMER) > ctx.t:
                return Result(False)
            base, base_evidence = ctx.state["stage_ts"], []
        else:
            base, base_evidence = ctx.state.get("first", ctx.t), []
        last = [m for m in ctx.matches(self.key) if m[0] >= base]
        start = max([base] + [m[0] for m in last])
        deadline = ctx.calendar.deadline(start, self.duration)
        values = (("quiet_since", ms_iso(start)), ("deadline", ms_iso(deadline))) if ctx.explain else ()
        if ctx.t >= deadline:
            return Result(True, NO_TIMER, tuple(base_evidence), values)
        return Result(False, deadline, values=values)


@dataclass(frozen=True)
class Stalled(Condition):
    """The entity sits in a stage with no activity longer than that stage's threshold (on its calendar)."""

    thresholds: tuple[tuple[str, Duration], ...]
    activity: Match
    key: str = ""

    def trackers(self) -> Iterable[tuple[str, Match, int]]:
        longest = max(d.nominal_ms for _, d in self.thresholds)
        return [(self.key, self.activity, longest * 2)]

    def evaluate(self, ctx: Context) -> Result:
        stage = ctx.state.get("stage")
        limit = dict(self.thresholds).get(stage or "")
        if limit is None or ctx.state.get("stage_ts", NO_TIMER) > ctx.t:
            return Result(False)
        base = ctx.state["stage_ts"]
        recent = [m for m in ctx.matches(self.key) if m[0] >= base]
        start = max([base] + [m[0] for m in recent])
        deadline = ctx.calendar.deadline(start, limit)
        if not ctx.explain:
            return Result(ctx.t >= deadline, NO_TIMER if ctx.t >= deadline else deadline)
        values = (("stage", stage), ("stage_since", ms_iso(base)), ("quiet_since", ms_iso(start)),
                  ("threshold", limit.text), ("calendar", ctx.calendar.name))  # fmt: skip
        if ctx.t >= deadline:
            return Result(True, NO_TIMER, tuple(_brief(m) for m in recent[-3:]), values)
        return Result(False, deadline, values=values)


@dataclass(frozen=True)
class Declining(Condition):
    """Matching events fell period over period, ``periods`` times running (complete periods only).

    Weeks (any multiple of 7 days) start on Monday 00:00 UTC; other periods on the epoch.
    """

    match: Match
    periods: int
    period_ms: int
    key: str = ""

    @property
    def offset_ms(self) -> int:
        return 4 * DAY_MS if self.period_ms % (7 * DAY_MS) == 0 else 0  # 1970-01-01 was a Thursday

    def buckets(self) -> Iterable[tuple[str, Match, int, int, int]]:
        return [(self.key, self.match, self.period_ms, self.offset_ms, self.periods + 2)]

    def evaluate(self, ctx: Context) -> Result:
        current = (ctx.t - self.offset_ms) // self.period_ms
        counts = ctx.state.get("b", {}).get(self.key, {})
        series = [counts.get(str(current - back), 0) for back in range(self.periods + 1, 0, -1)]
        ok = all(later < earlier for earlier, later in itertools.pairwise(series))
        next_boundary = (current + 1) * self.period_ms + self.offset_ms
        return Result(ok, next_boundary, (), ((f"per_period[{self.key}]", ",".join(map(str, series))),))


@dataclass(frozen=True)
class StageIs(Condition):
    stages: frozenset[str]

    def evaluate(self, ctx: Context) -> Result:
        stage = ctx.state.get("stage")
        return Result(stage in self.stages, values=(("stage", stage),))


@dataclass(frozen=True)
class Attribute(Condition):
    """``within``: a date attribute falls within the duration from now (and is not past); or a comparison."""

    name: str
    op: str
    operand: Any

    def evaluate(self, ctx: Context) -> Result:
        value = ctx.attribute(self.name)
        values = ((self.name, value),)
        if self.op != "within":
            return Result(value is not None and _compare(value, self.op, self.operand), values=values)
        try:
            at = _date_ms(value)
        except (TypeError, ValueError):
            return Result(False, values=values)
        window: int = self.operand
        if ctx.t < at - window:
            return Result(False, at - window, values=values)
        if ctx.t <= at:
            return Result(True, at + 1, values=values)
        return Result(False, values=values)


def _date_ms(value: Any) -> int:
    from datetime import UTC, date, datetime

    text = str(value)
    if len(text) == 10:
        day = date.fromisoformat(text)
        return int(datetime(day.year, day.month, day.day, 23, 59, 59, tzinfo=UTC).timestamp() * 1000)
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@dataclass(frozen=True)
class Grade(Condition):
    """``becomes``: the grade is now X and was something else before; ``rises_by`` / ``falls_by`` N tiers
    (towards A / towards D) compared with the lowest / highest grade within ``within``; ``above`` / ``below``
    a score."""

    model: str
    becomes: str = ""
    rises_by: int = 0
    falls_by: int = 0
    within: int = 30 * DAY_MS
    above: float | None = None
    below: float | None = None

    def evaluate(self, ctx: Context) -> Result:
        history = [h for h in ctx.state.get("g", {}).get(self.model, ()) if h[0] <= ctx.t]
        if not history:
            return Result(False)
        _ts, grade, score = history[-1]
        values: tuple[tuple[str, Any], ...] = ((f"{self.model}_grade", grade), (f"{self.model}_score", score))
        evidence = tuple({"ts": ms_iso(h[0]), "grade": h[1], "score": h[2]} for h in history[-4:])
        if self.becomes:  # consecutive equal grades are merged, so history[-2] is the grade before
            ok = grade == self.becomes and len(history) > 1 and GRADES.index(history[-2][1]) > GRADES.index(grade)
            return Result(ok, evidence=evidence if ok else (), values=values)
        if self.above is not None or self.below is not None:
            ok = (self.above is None or score > self.above) and (self.below is None or score < self.below)
            return Result(ok, evidence=evidence if ok else (), values=values)
        recent = [h for h in history if h[0] > ctx.t - self.within]
        if not recent:
            return Result(False, values=values)
        tiers = [GRADES.index(h[1]) for h in recent]
        now = GRADES.index(grade)
        ok = (self.rises_by and max(tiers) - now >= self.rises_by) or (
            self.falls_by and now - min(tiers) >= self.falls_by
        )
        leaves = min(h[0] for h in recent) + self.within if recent else NO_TIMER
        return Result(bool(ok), leaves if ok else NO_TIMER, evidence if ok else (), values)


@dataclass(frozen=True)
class Signal(Condition):
    name: str
    within: Duration
    key: str = ""

    def evaluate(self, ctx: Context) -> Result:
        recent = [s for s in ctx.state.get("sig", {}).get(self.name, ()) if ctx.t - self.within.ms < s[0] <= ctx.t]
        if not recent:
            return Result(False)
        return Result(True, recent[-1][0] + self.within.ms, tuple(s[1] for s in recent[-3:]))


@dataclass(frozen=True)
class All(Condition):
    parts: tuple[Condition, ...]

    def trackers(self) -> Iterable[tuple[str, Match, int]]:
        return [t for part in self.parts for t in part.trackers()]

    def buckets(self) -> Iterable[tuple[str, Match, int, int, int]]:
        return [b for part in self.parts for b in part.buckets()]

    def evaluate(self, ctx: Context) -> Result:
        if not ctx.explain:
            # false until its first false part turns true: that part's next change bounds the whole
            results = []
            for part in self.parts:
                result = part.evaluate(ctx)
                if not result.ok:
                    return Result(False, result.next_ms)
                results.append(result)
            return Result(True, min(r.next_ms for r in results))
        results = [part.evaluate(ctx) for part in self.parts]
        ok = all(r.ok for r in results)
        return Result(ok, min(r.next_ms for r in results), _merge(r.evidence for r in results) if ok else (),
                      tuple(v for r in results for v in r.values))  # fmt: skip


@dataclass(frozen=True)
class AnyOf(Condition):
    parts: tuple[Condition, ...]

    def trackers(self) -> Iterable[tuple[str, Match, int]]:
        return [t for part in self.parts for t in part.trackers()]

    def buckets(self) -> Iterable[tuple[str, Match, int, int, int]]:
        return [b for part in self.parts for b in part.buckets()]

    def evaluate(self, ctx: Context) -> Result:
        if not ctx.explain:
            # true while its first true part holds: that part's next change bounds the whole
            results = []
            for part in self.parts:
                result = part.evaluate(ctx)
                if result.ok:
                    return Result(True, result.next_ms)
                results.append(result)
            return Result(False, min(r.next_ms for r in results))
        results = [part.evaluate(ctx) for part in self.parts]
        true = [r for r in results if r.ok]
        return Result(bool(true), min(r.next_ms for r in results), _merge(r.evidence for r in true),
                      tuple(v for r in results for v in r.values))  # fmt: skip


@dataclass(frozen=True)
class Not(Condition):
    part: Condition

    def trackers(self) -> Iterable[tuple[str, Match, int]]:
        return self.part.trackers()

    def buckets(self) -> Iterable[tuple[str, Match, int, int, int]]:
        return self.part.buckets()

    def evaluate(self, ctx: Context) -> Result:
        inner = self.part.evaluate(ctx)
        return Result(not inner.ok, inner.next_ms, (), inner.values)


def _merge(groups: Iterable[tuple[dict[str, Any], ...]]) -> tuple[dict[str, Any], ...]:
    seen: dict[str, dict[str, Any]] = {}
    for group in groups:
        for item in group:
            seen.setdefault(str(item.get("event_id") or orjson.dumps(item, option=orjson.OPT_SORT_KEYS)), item)
    return tuple(seen.values())


# --- rules and the rule set ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    entity: str
    severity: str
    notify: tuple[str, ...]
    message: str
    when: Condition
    cooldown_ms: int = 0
    description: str = ""


@dataclass(frozen=True)
class RuleSet:
    """Parsed rules, calendars and stall thresholds; ``version`` is a hash of the source text."""

    rules: tuple[Rule, ...]
    calendars: dict[str, BusinessCalendar]
    version: str
    source: str = ""
    text: str = ""
    trackers: dict[str, tuple[tuple[str, Match, int], ...]] = field(default_factory=dict)
    buckets: dict[str, tuple[tuple[str, Match, int, int, int], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_entity: dict[str, dict[str, tuple[str, Match, int]]] = {kind: {} for kind in ENTITY_KINDS}
        buckets: dict[str, list[tuple[str, Match, int, int, int]]] = {kind: [] for kind in ENTITY_KINDS}
        for rule in self.rules:
            for key, match, keep in rule.when.trackers():
                by_entity[rule.entity][key] = (key, match, keep)
            buckets[rule.entity].extend(rule.when.buckets())
        object.__setattr__(self, "trackers", {k: tuple(v.values()) for k, v in by_entity.items()})
        object.__setattr__(self, "buckets", {k: tuple(v) for k, v in buckets.items()})

    def calendar_for(self, region: Any) -> BusinessCalendar:
        return self.calendars.get(str(region), self.calendars["default"])

    @classmethod
    def parse(cls, text: str, filename: str) -> RuleSet:
        return _parse(text, filename)

    @classmethod
    def load(cls, path: Path | None) -> RuleSet:
        """A rules file, or a directory of ``*.yaml`` files (read in name order as one set); the default if None."""
        if path is None:
            text = resources.files("dealpulse.pipelines").joinpath("rules.yaml").read_text()
            return _parse(text, "rules.yaml (built-in)")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not files:
                raise ConfigError(str(path), 1, 1, "no *.yaml rule files in this directory")
            parsed = [_parse(p.read_text(), str(p), partial=True) for p in files]
            return _combine(parsed, str(path))
        return _parse(path.read_text(), str(path))


def _combine(parts: list[RuleSet], source: str) -> RuleSet:
    calendars: dict[str, BusinessCalendar] = {"default": BusinessCalendar()}
    rules: list[Rule] = []
    names: set[str] = set()
    for part in parts:
        for name, calendar in part.calendars.items():
            if name != "default" or calendar != BusinessCalendar():
                calendars[name] = calendar
        for rule in part.rules:
            if rule.name in names:
                raise ConfigError(part.source, 1, 1, f"rule {rule.name!r} is also declared in another file")
            names.add(rule.name)
            rules.append(rule)
    text = "\n".join(p.text for p in parts)
    return RuleSet(tuple(rules), calendars, _version(text), source, text)


def _version(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


_RULE_KEYS = {"name", "entity", "severity", "notify", "message", "when", "cooldown", "description"}
_TOP_KEYS = {"calendars", "stalls", "rules"}
_ROLE_HINT = "owner, manager, team, a role such as legal / customer_success / ops, or user:<id>"


def _parse(text: str, filename: str, partial: bool = False) -> RuleSet:
    data, marks = load_yaml(text, filename)

    fail = error_at(filename, marks)

    if data is None and partial:
        data = {}
    if not isinstance(data, dict):
        raise fail((), "a rules file is a mapping with 'rules' (and optionally 'calendars', 'stalls')")
    for key in data:
        if key not in _TOP_KEYS:
            raise fail((key,), f"unknown key {key!r}; expected one of {', '.join(sorted(_TOP_KEYS))}")
    calendars = {"default": BusinessCalendar()}
    raw_calendars = data.get("calendars") or {}
    if not isinstance(raw_calendars, dict):
        raise fail(("calendars",), "'calendars' maps a region name (or 'default') to {timezone, workdays, holidays}")
    for name, body in raw_calendars.items():
        if not isinstance(body, dict):
            raise fail(("calendars", name), "a calendar is a mapping {timezone, workdays, holidays}")
        for key in body:
            if key not in ("timezone", "workdays", "holidays"):
                raise fail(("calendars", name, key), f"unknown calendar key {key!r} (timezone, workdays, holidays)")
        try:
            calendars[str(name)] = BusinessCalendar.parse_spec(body, str(name))
        except ValueError as exc:
            raise fail(("calendars", name), str(exc)) from exc
    rules: list[Rule] = []
    if data.get("stalls") is not None:
        rules.append(_parse_stalls(data["stalls"], fail))
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list) or (not raw_rules and not rules and not partial):
        raise fail(("rules",), "'rules' must be a non-empty list of rules")
    seen = {rule.name for rule in rules}
    for i, raw in enumerate(raw_rules):
        rule = _parse_rule(raw, ("rules", i), fail)
        if rule.name in seen:
            raise fail(("rules", i, "name"), f"rule {rule.name!r} is declared twice")
        seen.add(rule.name)
        rules.append(rule)
    return RuleSet(tuple(rules), calendars, _version(text), filename, text)


def _parse_stalls(raw: Any, fail: Callable[..., ConfigError]) -> Rule:
    path: tuple[Any, ...] = ("stalls",)
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict) or not raw["stages"]:
        raise fail(path, "'stalls' needs 'stages': {stage: threshold such as 5wd or 36h}")
    for key in raw:
        if key not in ("stages", "activity", "severity", "notify", "message", "entity", "cooldown"):
            raise fail((*path, key), f"unknown stalls key {key!r}")
    thresholds = []
    for stage, text in raw["stages"].items():
        try:
            thresholds.append((str(stage), Duration.parse(text)))
        except ValueError as exc:
            raise fail((*path, "stages", stage), f"stage {stage!r}: {exc}") from exc
    activity = _parse_match(raw["activity"], (*path, "activity"), fail) if "activity" in raw else Match(frozenset())
    condition = Stalled(tuple(thresholds), activity, key="stall")
    body = {
        "name": "stage_stall",
        "entity": raw.get("entity", "opportunity"),
        "severity": raw.get("severity", "warning"),
        "notify": raw.get("notify", ["owner", "manager"]),
        "message": raw.get("message", "{entity_id} has been quiet in {stage} since {quiet_since}"),
        **({"cooldown": raw["cooldown"]} if "cooldown" in raw else {}),
    }
    return _rule_from(body, condition, path, fail)


def _parse_rule(raw: Any, path: tuple[Any, ...], fail: Callable[..., ConfigError]) -> Rule:
    if not isinstance(raw, dict):
        raise fail(path, "a rule is a mapping with name, entity, severity, notify, message and when")
    for key in raw:
        if key not in _RULE_KEYS:
            raise fail((*path, key), f"unknown rule key {key!r}; expected one of {', '.join(sorted(_RULE_KEYS))}")
    if "when" not in raw:
        raise fail(path, f"rule {raw.get('name')!r} has no 'when' condition")
    condition = _parse_condition(raw["when"], (*path, "when"), fail)
    return _rule_from(raw, condition, path, fail)


def _rule_from(raw: dict[str, Any], condition: Condition, path: tuple[Any, ...],
               fail: Callable[..., ConfigError]) -> Rule:  # fmt: skip
    name = raw.get("name")
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise fail((*path, "name"), "'name' must be snake_case")
    entity = raw.get("entity")
    if entity not in ENTITY_KINDS:
        raise fail((*path, "entity"), f"rule {name!r}: 'entity' must be one of {', '.join(ENTITY_KINDS)}")
    severity = raw.get("severity", "warning")
    if severity not in SEVERITIES:
        raise fail((*path, "severity"), f"rule {name!r}: 'severity' must be one of {', '.join(SEVERITIES)}")
    notify = raw.get("notify", ["owner"])
    if isinstance(notify, str):
        notify = [notify]
    if not isinstance(notify, list) or not notify or not all(isinstance(n, str) and n for n in notify):
        raise fail((*path, "notify"), f"rule {name!r}: 'notify' lists who should hear: {_ROLE_HINT}")
    message = raw.get("message", "{rule} on {entity} {entity_id}")
    if not isinstance(message, str):
        raise fail((*path, "message"), f"rule {name!r}: 'message' is a text template")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(message) if f is not None]
    except ValueError as exc:
        raise fail((*path, "message"), f"rule {name!r}: message template: {exc}") from exc
    for placeholder in fields:
        if not placeholder.isidentifier():
            raise fail((*path, "message"), f"rule {name!r}: placeholder {{{placeholder}}} is not a plain name")
    cooldown = 0
    if "cooldown" in raw:
        try:
            cooldown = Duration.parse(raw["cooldown"]).ms
        except ValueError as exc:
            raise fail((*path, "cooldown"), f"rule {name!r}: cooldown {exc} (working days are not allowed)") from exc
    description = str(raw.get("description", ""))
    return Rule(name, entity, severity, tuple(notify), message, condition, cooldown, description)


_CONDITIONS = (
    "all",
    "any",
    "not",
    "count",
    "sequence",
    "absent",
    "declining",
    "stage",
    "attribute",
    "grade",
    "score",
    "signal",
)


def _parse_condition(raw: Any, path: tuple[Any, ...], fail: Callable[..., ConfigError]) -> Condition:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise fail(path, f"a condition is a mapping with exactly one of: {', '.join(_CONDITIONS)}")
    kind, body = next(iter(raw.items()))
    here = (*path, kind)
    # the state key of a condition is a hash of its text: unchanged conditions keep their state across versions
    key = hashlib.sha256(orjson.dumps(raw, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()[:10]
    if kind in ("all", "any"):
        if not isinstance(body, list) or not body:
            raise fail(here, f"'{kind}' takes a non-empty list of conditions")
        parts = tuple(_parse_condition(c, (*here, i), fail) for i, c in enumerate(body))
        return All(parts) if kind == "all" else AnyOf(parts)
    if kind == "not":
        return Not(_parse_condition(body, here, fail))
    if kind == "stage":
        stages = body if isinstance(body, list) else [body]
        if not stages or not all(isinstance(s, str) and s for s in stages):
            raise fail(here, "'stage' is a stage name or a list of them")
        return StageIs(frozenset(stages))
    if not isinstance(body, dict):
        raise fail(here, f"'{kind}' takes a mapping")
    allowed = {
        "count": {"match", "within", "at_least"},
        "sequence": {"steps", "within"},
        "absent": {"match", "for", "since", "after"},
        "declining": {"match", "periods", "period"},
        "attribute": {"name", "within", *_PROP_OPS},
        "grade": {"model", "becomes", "rises_by", "falls_by", "within"},
        "score": {"model", "above", "below"},
        "signal": {"name", "within"},
    }.get(kind)
    if allowed is None:
        raise fail(here, f"unknown condition {kind!r}; expected one of {', '.join(_CONDITIONS)}")
    for name in body:
        if name not in allowed:
            raise fail((*here, name), f"unknown key {name!r} in {kind}; expected {', '.join(sorted(allowed))}")

    def duration(name: str, default: str | None = None, working: bool = True) -> Duration:
        if name not in body and default is None:
            raise fail(here, f"'{kind}' needs '{name}' (a duration like 3d, 72h or 5wd)")
        try:
            parsed = Duration.parse(body.get(name, default))
        except ValueError as exc:
            raise fail((*here, name), str(exc)) from exc
        if parsed.working_days and not working:
            raise fail((*here, name), f"'{name}' of {kind} is calendar time (m, h, d, w), not working days")
        return parsed

    if kind == "count":
        at_least = body.get("at_least", 1)
        if isinstance(at_least, bool) or not isinstance(at_least, int) or not 1 <= at_least <= MAX_MATCHES:
            raise fail((*here, "at_least"), f"'at_least' is a whole number from 1 to {MAX_MATCHES}")
        return Count(_parse_match(body.get("match"), (*here, "match"), fail), duration("within", working=False),
                     at_least, key)  # fmt: skip
    if kind == "sequence":
        steps = body.get("steps")
        if not isinstance(steps, list) or len(steps) < 2:
            raise fail((*here, "steps"), "'steps' is a list of at least two event filters, in order")
        matches = tuple(_parse_match(s, (*here, "steps", i), fail) for i, s in enumerate(steps))
        return Sequence_(matches, duration("within", working=False), key)
    if kind == "absent":
        since = body.get("since", "first_seen")
        if since not in ("stage", "first_seen"):
            raise fail((*here, "since"), "'since' is stage or first_seen (or give 'after': an anchor filter)")
        anchor = _parse_match(body["after"], (*here, "after"), fail) if "after" in body else None
        return Absent(_parse_match(body.get("match"), (*here, "match"), fail), duration("for"), since, anchor, key)
    if kind == "declining":
        periods = body.get("periods", 2)
        if isinstance(periods, bool) or not isinstance(periods, int) or not 1 <= periods <= 12:
            raise fail((*here, "periods"), "'periods' is how many periods running the count fell: 1 to 12")
        period = duration("period", "7d", working=False)
        return Declining(_parse_match(body.get("match"), (*here, "match"), fail), periods, period.ms, key)
    if kind == "attribute":
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise fail(here, "'attribute' needs 'name' (an account or opportunity attribute such as contract_end)")
        ops = [op for op in ("within", *_PROP_OPS) if op in body]
        if len(ops) != 1:
            raise fail(here, f"'attribute' takes exactly one of within, {', '.join(_PROP_OPS)}")
        op = ops[0]
        if op == "within":
            return Attribute(name, "within", duration("within", working=False).ms)
        operand = body[op]
        if op == "in" and not isinstance(operand, list):
            raise fail((*here, op), "'in' takes a list of values")
        return Attribute(name, op, tuple(operand) if op == "in" else operand)
    if kind in ("grade", "score"):
        model = body.get("model")
        if model not in ("intent", "churn"):
            raise fail((*here, "model"), f"'{kind}' needs model: intent or churn")
        if kind == "score":
            bounds = {b: body[b] for b in ("above", "below") if b in body}
            if not bounds or not all(isinstance(v, int | float) and 0 <= v <= 1 for v in bounds.values()):
                raise fail(here, "'score' takes above and/or below, between 0 and 1")
            return Grade(model, above=bounds.get("above"), below=bounds.get("below"))
        becomes = body.get("becomes", "")
        if becomes and becomes not in GRADES:
            raise fail((*here, "becomes"), f"'becomes' is one of {', '.join(GRADES)}")
        tiers = {b: body[b] for b in ("rises_by", "falls_by") if b in body}
        if bool(becomes) == bool(tiers) or len(tiers) > 1:
            raise fail(here, "'grade' takes exactly one of becomes, rises_by (towards A), falls_by (towards D)")
        if tiers and not all(isinstance(v, int) and 1 <= v <= 3 for v in tiers.values()):
            raise fail(here, "rises_by / falls_by is 1, 2 or 3 tiers")
        return Grade(model, becomes, tiers.get("rises_by", 0), tiers.get("falls_by", 0),
                     duration("within", "30d", working=False).ms)  # fmt: skip
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise fail(here, "'signal' needs 'name' (e.g. model_drift)")
    return Signal(name, duration("within", "1h", working=False), key)


def _parse_match(raw: Any, path: tuple[Any, ...], fail: Callable[..., ConfigError]) -> Match:
    if not isinstance(raw, dict) or "type" not in raw:
        raise fail(path, "an event filter needs at least 'type' (and optionally props, keywords)")
    for key in raw:
        if key not in ("type", "props", "keywords"):
            raise fail((*path, key), f"unknown filter key {key!r} (type, props, keywords)")
    types = raw["type"] if isinstance(raw["type"], list) else [raw["type"]]
    if not all(isinstance(t, str) and t for t in types):
        raise fail((*path, "type"), "'type' is an event type, a list of them, or '*' for any")
    props: list[tuple[str, str, Any]] = []
    raw_props = raw.get("props") or {}
    if not isinstance(raw_props, dict):
        raise fail((*path, "props"), "'props' maps a prop to a value, a list of values, or {gte: 2, ...}")
    for name, test in raw_props.items():
        if isinstance(test, list):
            props.append((str(name), "in", tuple(test)))
        elif isinstance(test, dict):
            for op, operand in test.items():
                if op not in _PROP_OPS:
                    raise fail((*path, "props", name, op), f"unknown comparison {op!r}; one of {', '.join(_PROP_OPS)}")
                props.append(
                    (str(name), str(op), tuple(operand) if op == "in" and isinstance(operand, list) else operand)
                )
        else:
            props.append((str(name), "eq", test))
    keywords = raw.get("keywords") or []
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise fail((*path, "keywords"), "'keywords' is a list of keyword tags (any of them matches)")
    type_set = frozenset() if "*" in types else frozenset(types)
    return Match(type_set, tuple(props), frozenset(keywords))


# --- state and evaluation --------------------------------------------------------------------------------------


@dataclass
class PartitionState:
    """Everything the engine keeps for one input partition; JSON-serialisable for checkpoints."""

    entities: dict[str, dict[str, Any]] = field(default_factory=dict)  # "kind:id" -> state
    timers: list[tuple[int, str]] = field(default_factory=list)  # heap of (due ms, "kind:id")
    watermark: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps({"e": self.entities, "t": self.timers, "w": self.watermark})

    @classmethod
    def from_json(cls, raw: bytes) -> PartitionState:
        data = orjson.loads(raw)
        timers = [(int(due), str(key)) for due, key in data["t"]]
        heapq.heapify(timers)
        return cls(data["e"], timers, int(data["w"]))


def fingerprint(rule: str, entity: str, entity_id: str) -> str:
    """Stable identity of an alert: one per (rule, entity), like Alertmanager's.

    >>> fingerprint("stage_stall", "opportunity", "opp-7")
    'e4a855970fe272df'
    """
    return hashlib.sha256(f"{rule}\x00{entity}\x00{entity_id}".encode()).hexdigest()[:16]


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return ""


_ATTRIBUTE_PROPS = ("region", "industry", "product_line", "owner", "manager", "team", "contract_end", "arr")


class RuleEngine:
    """Applies a :class:`RuleSet` to events, scores and signals; returns alert state changes (firing/resolved)."""

    def __init__(self, rules: RuleSet, allowed_lateness_ms: int = 0, ttl_ms: int = 120 * DAY_MS) -> None:
        self.rules = rules
        self.by_entity = {kind: tuple(r for r in rules.rules if r.entity == kind) for kind in ENTITY_KINDS}
        self.allowed_lateness_ms = allowed_lateness_ms
        self.ttl_ms = ttl_ms

    # inputs ------------------------------------------------------------------------------------------------------

    def on_event(self, state: PartitionState, event: Event) -> list[dict[str, Any]]:
        alerts = self.advance(state, event.ts_ms - self.allowed_lateness_ms)
        touched = [("account", event.account_id)]
        if event.lead_id:
            touched.append(("lead", event.lead_id))
        if event.opportunity_id:
            touched.append(("opportunity", event.opportunity_id))
            if event.lead_id:
                lead = self._entity(state, "lead", event.lead_id, event.account_id, event.ts_ms)
                linked = lead.setdefault("opps", [])
                if event.opportunity_id not in linked:
                    linked.append(event.opportunity_id)
                    del linked[:-MAX_LINKED_OPPORTUNITIES]
        elif event.lead_id:  # a lead's own activity (e.g. page views) is activity on its open deals too
            lead_state = state.entities.get(f"lead:{event.lead_id}")
            touched.extend(("opportunity", o) for o in (lead_state or {}).get("opps", ()))
        for kind, entity_id in touched:
            entity = self._entity(state, kind, entity_id, event.account_id, event.ts_ms)
            self._fold(entity, kind, event)
        for kind, entity_id in touched:
            alerts.extend(self._evaluate(state, f"{kind}:{entity_id}", None))
        return alerts

    def on_score(self, state: PartitionState, score: dict[str, Any]) -> list[dict[str, Any]]:
        """A score from the scores topic: the entity's grade history grows; grade rules re-evaluate."""
        kind, entity_id, ts = str(score["entity"]), str(score["entity_id"]), int(score["ts_ms"])
        entity = self._entity(state, kind, entity_id, str(score.get("account_id", "")), ts)
        history = entity.setdefault("g", {}).setdefault(str(score["model"]), [])
        if history and history[-1][1] == score["grade"] and ts >= history[-1][0]:
            history[-1] = [history[-1][0], score["grade"], round(float(score["score"]), 4)]
        else:
            history.append([ts, score["grade"], round(float(score["score"]), 4)])
            history.sort(key=lambda h: h[0])
            del history[:-GRADE_HISTORY]
        return self._evaluate(state, f"{kind}:{entity_id}", None)

    def on_signal(self, state: PartitionState, signal: dict[str, Any], ts_ms: int) -> list[dict[str, Any]]:
        """An operational signal (``{"signal": "model_drift", "model": "intent", ...}``) about a model."""
        entity_id = str(signal.get("model", "pipeline"))
        entity = self._entity(state, "model", entity_id, "", ts_ms)
        kept = entity.setdefault("sig", {}).setdefault(str(signal.get("signal")), [])
        kept.append([ts_ms, {k: v for k, v in signal.items() if isinstance(v, str | int | float)}])
        del kept[:-8]
        state.watermark = max(state.watermark, ts_ms)
        return self._evaluate(state, f"model:{entity_id}", None)

    def advance(self, state: PartitionState, watermark: int) -> list[dict[str, Any]]:
        """Move event time forward to ``watermark``: fire every timer due by then (in due order)."""
        alerts: list[dict[str, Any]] = []
        if watermark > state.watermark:
            state.watermark = watermark
        while state.timers and state.timers[0][0] <= state.watermark:
            due, key = heapq.heappop(state.timers)
            entity = state.entities.get(key)
            if entity is None or entity.get("due") != due:
                continue  # superseded by a later evaluation
            entity["due"] = None
            if due - entity.get("last", due) >= self.ttl_ms and not entity.get("fire"):
                del state.entities[key]  # idle past its TTL and nothing firing: forget it
                continue
            alerts.extend(self._evaluate(state, key, due))
        return alerts

    # state -------------------------------------------------------------------------------------------------------

    def _entity(self, state: PartitionState, kind: str, entity_id: str, account: str, ts: int) -> dict[str, Any]:
        key = f"{kind}:{entity_id}"
        entity = state.entities.get(key)
        if entity is None:
            entity = state.entities[key] = {"kind": kind, "id": entity_id, "acct": account, "first": ts, "last": ts}
        entity["last"] = max(entity["last"], ts)
        if account and not entity.get("acct"):
            entity["acct"] = account
        return entity

    def _fold(self, entity: dict[str, Any], kind: str, event: Event) -> None:
        if event.type == "stage_change" and kind in ("lead", "opportunity"):
            if event.ts_ms >= entity.get("stage_ts", -1):
                entity["stage"], entity["stage_ts"] = event.props.get("to_stage"), event.ts_ms
        elif event.type == "account_update" and kind == "account":
            attrs = entity.setdefault("attrs", {})
            attrs.update({k: v for k, v in event.props.items() if isinstance(v, str | int | float)})
        if kind == "opportunity" and event.lead_id:
            entity["lead"] = event.lead_id
        for key, match, period, offset, keep in self.rules.buckets[kind]:
            if match.matches(event):
                counts = entity.setdefault("b", {}).setdefault(key, {})
                index = (event.ts_ms - offset) // period
                counts[str(index)] = counts.get(str(index), 0) + 1
                for old in [k for k in counts if int(k) <= index - keep]:
                    del counts[old]
        kept = entity.setdefault("m", {})
        for key, match, keep_ms in self.rules.trackers[kind]:
            if not match.matches(event):
                continue
            items = kept.setdefault(key, [])
            if any(m[1] == event.event_id for m in items):
                continue  # a duplicate delivery counts once
            brief: dict[str, Any] = {k: event.props[k] for k in ("page_category", "asset_kind", "initiated_by", "revision", "to_stage",
                                                   "severity", "feature") if k in event.props}  # fmt: skip
            if event.keywords:
                brief["keywords"] = list(event.keywords)
            items.append([event.ts_ms, event.event_id, event.type, brief])
            items.sort(key=lambda m: m[0])
            newest = items[-1][0]
            kept[key] = [m for m in items if m[0] > newest - keep_ms][-MAX_MATCHES:]

    def _evaluate(self, state: PartitionState, key: str, at: int | None) -> list[dict[str, Any]]:
        entity = state.entities[key]
        kind = entity["kind"]
        t = at if at is not None else entity["last"]
        account = state.entities.get(f"account:{entity.get('acct')}") if kind != "account" else None
        region = (account or entity).get("attrs", {}).get("region")
        context = Context(entity, account, t, self.rules.calendar_for(region), explain=False)
        alerts = []
        due = NO_TIMER
        firing = entity.setdefault("fire", {})
        explained = None
        for rule in self.by_entity[kind]:
            result = rule.when.evaluate(context)
            due = min(due, result.next_ms)
            current = firing.get(rule.name)
            if result.ok == (current is not None):
                continue  # no change: nothing to explain
            if result.ok and t < entity.get("cool", {}).get(rule.name, -1):
                continue
            explained = explained or Context(entity, account, t, context.calendar, explain=True)
            result = rule.when.evaluate(explained)
            if result.ok and current is None:
                alert = self._alert(rule, entity, account, t, result, "firing", t)
                firing[rule.name] = {"id": alert["alert_id"], "since": t}
                alerts.append(alert)
            elif not result.ok and current is not None:
                alerts.append(self._alert(rule, entity, account, t, result, "resolved", current["since"]))
                del firing[rule.name]
                if rule.cooldown_ms:
                    entity.setdefault("cool", {})[rule.name] = t + rule.cooldown_ms
        if not firing:
            entity.pop("fire", None)
        if not t < due < NO_TIMER:
            due = entity["last"] + self.ttl_ms  # nothing pending: wake up to expire the idle state
        if due > t and entity.get("due") != due:
            entity["due"] = due
            heapq.heappush(state.timers, (due, key))
        return alerts

    def _alert(self, rule: Rule, entity: dict[str, Any], account: dict[str, Any] | None, t: int, result: Result,
               status: str, since: int) -> dict[str, Any]:  # fmt: skip
        kind, entity_id = entity["kind"], entity["id"]
        attrs = {**((account or {}).get("attrs") or {}), **(entity.get("attrs") or {})}
        values = dict(result.values)
        fields = _Fields({k: v for k, v in attrs.items() if k.isidentifier()})
        fields.update({k.split("[")[0]: v for k, v in values.items()})
        fields.update(
            rule=rule.name, severity=rule.severity, entity=kind, entity_id=entity_id, account_id=entity.get("acct", ""),
            lead_id=entity_id if kind == "lead" else entity.get("lead", ""),
            opportunity_id=entity_id if kind == "opportunity" else "", stage=entity.get("stage") or "",
        )  # fmt: skip
        fp = fingerprint(rule.name, kind, entity_id)
        recipients = [_recipient(role, attrs) for role in rule.notify]
        return {
            "schema": ALERT_SCHEMA,
            "alert_id": f"{fp}-{since}",
            "fingerprint": fp,
            "status": status,
            "rule": rule.name,
            "rule_version": self.rules.version,
            "severity": rule.severity,
            "entity": kind,
            "entity_id": entity_id,
            "account_id": entity.get("acct", ""),
            "lead_id": fields["lead_id"],
            "opportunity_id": fields["opportunity_id"],
            "team": str(attrs.get("team", "")),
            "region": str(attrs.get("region", "")),
            "recipients": recipients,
            "message": rule.message.format_map(fields),
            "starts_at": ms_iso(since),
            "ends_at": ms_iso(t) if status == "resolved" else None,
            "ts_ms": t,
            "evidence": {"events": list(result.evidence), "values": {k: _plain(v) for k, v in values.items()}},
        }


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _recipient(role: str, attrs: dict[str, Any]) -> dict[str, str]:
    if role.startswith("user:"):
        return {"role": "user", "id": role[5:]}
    if role in ("owner", "manager") and attrs.get(role):
        return {"role": role, "id": str(attrs[role])}
    if role in ("team", "manager") and attrs.get("team"):
        return {"role": role, "team": str(attrs["team"])}
    return {"role": role}


def replay_alerts(rules: RuleSet, events: Sequence[Event], watermark_end: int | None = None,
                  allowed_lateness_ms: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Every alert state change of ``events`` in order (one partition), then timers up to ``watermark_end``."""
    engine = RuleEngine(rules, allowed_lateness_ms)
    state = PartitionState()
    alerts: list[dict[str, Any]] = []
    for event in events:
        alerts.extend(engine.on_event(state, event))
    if watermark_end is not None:
        alerts.extend(engine.advance(state, watermark_end))
    return alerts
