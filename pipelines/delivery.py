"""Alert delivery policy, the Alertmanager way: routing, silences, grouping, signatures and retry delays. No I/O.

A subscribers file declares webhook subscribers, who they hear about (``match`` on rule, severity, team,
recipient, region, entity) and how alerts are batched for them (``group_by``, ``group_wait``,
``group_interval``, ``repeat_interval``). Every request is signed: ``X-Dealpulse-Timestamp`` (Unix seconds) and
``X-Dealpulse-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`` with the subscriber's secret.

>>> body = b'{"alerts": []}'
>>> headers = signature_headers("s3cret", body, now_s=1_700_000_000)
>>> headers["X-Dealpulse-Signature"][:3], verify_signature("s3cret", headers, body, now_s=1_700_000_100)
('v1=', True)
>>> verify_signature("wrong", headers, body, now_s=1_700_000_100)
False
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dealpulse.pipelines.calendar import Duration
from dealpulse.pipelines.config_errors import error_at, load_yaml

SIGNATURE_TOLERANCE_S = 300
MATCH_LABELS = ("rule", "severity", "entity", "entity_id", "account_id", "team", "region", "recipient", "status")


# --- signatures -------------------------------------------------------------------------------------------------


def signature_headers(secret: str, body: bytes, now_s: int) -> dict[str, str]:
    """The two headers that let a receiver check a request came from dealpulse and is fresh."""
    digest = hmac.new(secret.encode(), f"{now_s}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Dealpulse-Timestamp": str(now_s), "X-Dealpulse-Signature": f"v1={digest}"}


def verify_signature(secret: str, headers: dict[str, str], body: bytes, now_s: int,
                     tolerance_s: int = SIGNATURE_TOLERANCE_S) -> bool:  # fmt: skip
    """What a receiver does: recompute the HMAC over ``"<timestamp>.<body>"``, compare in constant time, and
    reject timestamps older than ``tolerance_s`` (replays)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        stamp = int(lowered.get("x-dealpulse-timestamp", ""))
    except ValueError:
        return False
    if abs(now_s - stamp) > tolerance_s:
        return False
    expected = signature_headers(secret, body, stamp)["X-Dealpulse-Signature"]
    return hmac.compare_digest(expected, lowered.get("x-dealpulse-signature", ""))


def backoff_delays(initial_s: float, max_s: float, window_s: float, rng: random.Random) -> Iterator[float]:
    """Exponential backoff with full jitter, until the retry window is used up.

    >>> delays = list(backoff_delays(1, 8, 30, random.Random(1)))
    >>> all(0 <= d <= 8 for d in delays), round(sum(delays), 1) <= 30
    (True, True)
    """
    spent, ceiling = 0.0, initial_s
    while True:
        delay = rng.uniform(0, ceiling)
        if spent + delay > window_s:
            return
        spent += delay
        yield delay
        ceiling = min(max_s, ceiling * 2)


# --- labels, routing and silences -------------------------------------------------------------------------------


def labels_of(alert: dict[str, Any]) -> dict[str, list[str]]:
    """The values an alert offers to matchers: every recipient's role and id count as ``recipient``."""
    out = {name: [str(alert.get(name) or "")] for name in MATCH_LABELS if name != "recipient"}
    recipients: list[str] = []
    for recipient in alert.get("recipients", ()):
        recipients.extend(str(v) for k, v in recipient.items() if k in ("role", "id") and v)
    out["recipient"] = recipients
    return out


@dataclass(frozen=True)
class Matcher:
    """``label=value``, ``label!=value``, ``label=~regex`` or ``label!~regex`` (Alertmanager syntax)."""

    label: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Matcher:
        """Parse one matcher.

        >>> Matcher.parse("rule=~stage_.*")
        Matcher(label='rule', op='=~', value='stage_.*')
        """
        match = re.match(r"^\s*([a-z_]+)\s*(=~|!~|!=|=)\s*(.*?)\s*$", text)
        if not match or match.group(1) not in MATCH_LABELS:
            raise ValueError(f"{text!r} is not a matcher like rule=stage_stall (labels: {', '.join(MATCH_LABELS)})")
        label, op, value = match.groups()
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{text!r}: bad regular expression: {exc}") from exc
        return cls(label, op, value.strip("\"'"))

    def matches(self, labels: dict[str, list[str]]) -> bool:
        values = labels.get(self.label, [""]) or [""]
        if self.op == "=":
            return self.value in values
        if self.op == "!=":
            return self.value not in values
        hit = any(re.fullmatch(self.value, v) for v in values)
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f"{self.label}{self.op}{self.value}"


@dataclass(frozen=True)
class Silence:
    """Mutes matching alerts from ``starts_ms`` to ``ends_ms`` (wall-clock)."""

    silence_id: str
    matchers: tuple[Matcher, ...]
    starts_ms: int
    ends_ms: int
    created_by: str = ""
    comment: str = ""

    def active(self, now_ms: int) -> bool:
        return self.starts_ms <= now_ms < self.ends_ms

    def mutes(self, alert: dict[str, Any], now_ms: int) -> bool:
        labels = labels_of(alert)
        return self.active(now_ms) and all(m.matches(labels) for m in self.matchers)


def silenced_by(alert: dict[str, Any], silences: Sequence[Silence], now_ms: int) -> list[str]:
    return [s.silence_id for s in silences if s.mutes(alert, now_ms)]


# --- subscribers ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupPolicy:
    group_by: tuple[str, ...] = ("rule", "team")
    group_wait_ms: int = 30_000
    group_interval_ms: int = 300_000
    repeat_interval_ms: int = 4 * 3_600_000


@dataclass(frozen=True)
class Subscriber:
    name: str
    url: str
    secret: str
    match: tuple[tuple[str, frozenset[str]], ...] = ()
    policy: GroupPolicy = GroupPolicy()
    timeout_s: float = 5.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    retry_window_s: float = 3600.0

    def wants(self, alert: dict[str, Any]) -> bool:
        labels = labels_of(alert)
        return all(any(v in allowed for v in labels.get(label, ())) for label, allowed in self.match)


@dataclass(frozen=True)
class SubscriberConfig:
    subscribers: tuple[Subscriber, ...]
    source: str = ""

    def route(self, alert: dict[str, Any]) -> list[Subscriber]:
        return [s for s in self.subscribers if s.wants(alert)]

    @classmethod
    def load(cls, path: Path | None, environ: dict[str, str] | None = None) -> SubscriberConfig:
        if path is None:
            return cls(())
        return cls.parse(path.read_text(), str(path), environ)

    @classmethod
    def parse(cls, text: str, filename: str, environ: dict[str, str] | None = None) -> SubscriberConfig:
        """Parse a subscribers file; secrets come from ``secret_env`` (an environment variable) or ``secret``.

        >>> cfg = SubscriberConfig.parse('''
        ... defaults: {group_wait: 10s}
        ... subscribers:
        ...   - {name: legal-desk, url: "http://127.0.0.1:9/hook", secret: x, match: {recipient: [legal]}}
        ... ''', "subscribers.yaml")
        >>> cfg.subscribers[0].policy.group_wait_ms, cfg.route({"recipients": [{"role": "legal"}]})[0].name
        (10000, 'legal-desk')
        """
        return _parse_subscribers(text, filename, os.environ if environ is None else environ)


def _ms(text: Any) -> int:
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*s\s*$", str(text))
    if match:
        return int(float(match.group(1)) * 1000)
    parsed = Duration.parse(text)
    if parsed.working_days:
        raise ValueError("use calendar time here (s, m, h, d), not working days")
    return parsed.ms


_SUBSCRIBER_KEYS = {"name", "url", "secret", "secret_env", "match", "group_by", "group_wait", "group_interval",
                    "repeat_interval", "timeout", "retry_initial", "retry_max", "retry_window"}  # fmt: skip
_TIMING = ("group_wait", "group_interval", "repeat_interval", "timeout", "retry_initial", "retry_max", "retry_window")


def _parse_subscribers(text: str, filename: str, environ: Any) -> SubscriberConfig:
    data, marks = load_yaml(text, filename)

    fail = error_at(filename, marks)

    if not isinstance(data, dict) or not isinstance(data.get("subscribers"), list):
        raise fail((), "a subscribers file is a mapping with 'subscribers' (a list) and optional 'defaults'")
    for key in data:
        if key not in ("defaults", "subscribers"):
            raise fail((key,), f"unknown key {key!r} (defaults, subscribers)")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise fail(("defaults",), "'defaults' is a mapping of group_by / timings / retry settings")
    subscribers = []
    names: set[str] = set()
    for i, raw in enumerate(data["subscribers"]):
        path: tuple[Any, ...] = ("subscribers", i)
        if not isinstance(raw, dict):
            raise fail(path, "a subscriber is a mapping with name, url, secret_env (or secret) and match")
        for key in [*raw, *defaults]:
            if key not in _SUBSCRIBER_KEYS:
                where = (*path, key) if key in raw else ("defaults", key)
                raise fail(where, f"unknown key {key!r}; expected one of {', '.join(sorted(_SUBSCRIBER_KEYS))}")
        merged = {**defaults, **raw}
        name, url = merged.get("name"), merged.get("url")
        if not isinstance(name, str) or not name or name in names:
            raise fail((*path, "name"), "every subscriber needs a unique 'name'")
        names.add(name)
        if not isinstance(url, str) or not re.match(r"^https?://", url):
            raise fail((*path, "url"), f"subscriber {name!r}: 'url' must be an http(s) URL")
        secret = merged.get("secret")
        if "secret_env" in merged:
            secret = environ.get(str(merged["secret_env"]))
            if not secret:
                raise fail((*path, "secret_env"), f"subscriber {name!r}: environment variable "
                                                  f"{merged['secret_env']} is not set")  # fmt: skip
        if not isinstance(secret, str) or not secret:
            raise fail(path, f"subscriber {name!r}: needs 'secret_env' (recommended) or 'secret' to sign requests")
        match_raw = merged.get("match") or {}
        if not isinstance(match_raw, dict):
            raise fail((*path, "match"), "'match' maps a label to a value or a list of values")
        match = []
        for label, allowed in match_raw.items():
            if label not in MATCH_LABELS:
                raise fail((*path, "match", label), f"unknown label {label!r}; one of {', '.join(MATCH_LABELS)}")
            values = allowed if isinstance(allowed, list) else [allowed]
            match.append((str(label), frozenset(str(v) for v in values)))
        timings: dict[str, int] = {}
        for key in _TIMING:
            if key in merged:
                try:
                    timings[key] = _ms(merged[key])
                except ValueError as exc:
                    where = (*path, key) if key in raw else ("defaults", key)
                    raise fail(where, f"{key}: {exc}") from exc
        group_by = merged.get("group_by", ["rule", "team"])
        if not isinstance(group_by, list) or any(g not in MATCH_LABELS for g in group_by):
            raise fail((*path, "group_by"), f"'group_by' lists labels: {', '.join(MATCH_LABELS)}")
        base = GroupPolicy()
        policy = GroupPolicy(
            tuple(group_by),
            timings.get("group_wait", base.group_wait_ms),
            timings.get("group_interval", base.group_interval_ms),
            timings.get("repeat_interval", base.repeat_interval_ms),
        )
        subscribers.append(
            Subscriber(
                name,
                url,
                secret,
                tuple(match),
                policy,
                timings.get("timeout", 5000) / 1000,
                timings.get("retry_initial", 1000) / 1000,
                timings.get("retry_max", 60_000) / 1000,
                timings.get("retry_window", 3_600_000) / 1000,
            )
        )
    return SubscriberConfig(tuple(subscribers), filename)


# --- grouping ---------------------------------------------------------------------------------------------------


@dataclass
class _Group:
    key: str
    labels: dict[str, str]
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprint -> newest state
    changed: bool = True
    created_ms: int = 0
    last_sent_ms: int | None = None


@dataclass(frozen=True)
class Notification:
    """One request to one subscriber: the group's current alerts (firing, and resolved since the last one)."""

    group_key: str
    labels: dict[str, str]
    alerts: tuple[dict[str, Any], ...]
    sent_ms: int

    @property
    def status(self) -> str:
        return "firing" if any(a["status"] == "firing" for a in self.alerts) else "resolved"

    def notification_id(self) -> str:
        ids = ",".join(f"{a['alert_id']}:{a['status']}" for a in self.alerts)
        return hashlib.sha256(f"{self.group_key}|{self.sent_ms}|{ids}".encode()).hexdigest()[:20]


class Grouper:
    """Alertmanager's group_wait / group_interval / repeat_interval for one subscriber, on a clock you pass in.

    >>> g = Grouper(GroupPolicy(("rule",), group_wait_ms=30_000, group_interval_ms=300_000, repeat_interval_ms=3_600_000))
    >>> def alert(fp, status="firing"):
    ...     return {"fingerprint": fp, "alert_id": fp, "status": status, "rule": "stall"}
    >>> g.add(alert("a"), now_ms=0); g.add(alert("b"), now_ms=10_000)
    >>> g.due(20_000), [len(n.alerts) for n in g.due(30_000)]   # one notification for both, after group_wait
    ([], [2])
    >>> g.add(alert("a", "resolved"), now_ms=40_000)
    >>> g.due(100_000), [n.status for n in g.due(330_000)]       # changes wait for group_interval
    ([], ['firing'])
    >>> [len(n.alerts) for n in g.due(330_000 + 3_600_000)]      # unchanged and still firing: repeated
    [1]
    """

    def __init__(self, policy: GroupPolicy) -> None:
        self.policy = policy
        self.groups: dict[str, _Group] = {}

    def add(self, alert: dict[str, Any], now_ms: int) -> None:
        labels = {name: ",".join(labels_of(alert).get(name, [])) for name in self.policy.group_by}
        key = "|".join(f"{k}={v}" for k, v in labels.items())
        group = self.groups.get(key)
        if group is None:
            if alert["status"] == "resolved":
                return  # nothing was announced for it in this group
            group = self.groups[key] = _Group(key, labels, created_ms=now_ms)
        previous = group.alerts.get(alert["fingerprint"])
        if previous is not None and previous["status"] == alert["status"] and previous["alert_id"] == alert["alert_id"]:
            return  # a duplicate (a redelivery after a restart)
        group.alerts[alert["fingerprint"]] = alert
        group.changed = True

    def due(self, now_ms: int) -> list[Notification]:
        out = []
        p = self.policy
        for key in list(self.groups):
            group = self.groups[key]
            if group.last_sent_ms is None:
                send = now_ms >= group.created_ms + p.group_wait_ms
            elif group.changed:
                send = now_ms >= group.last_sent_ms + p.group_interval_ms
            else:
                send = now_ms >= group.last_sent_ms + p.repeat_interval_ms
            if not send:
                continue
            alerts = tuple(sorted(group.alerts.values(), key=lambda a: (a["status"] != "firing", a["alert_id"])))
            out.append(Notification(key, dict(group.labels), alerts, now_ms))
            group.last_sent_ms, group.changed = now_ms, False
            group.alerts = {fp: a for fp, a in group.alerts.items() if a["status"] == "firing"}
            if not group.alerts:
                del self.groups[key]
        return out

    def next_due(self) -> int | None:
        p = self.policy
        times = []
        for group in self.groups.values():
            if group.last_sent_ms is None:
                times.append(group.created_ms + p.group_wait_ms)
            else:
                times.append(group.last_sent_ms + (p.group_interval_ms if group.changed else p.repeat_interval_ms))
        return min(times, default=None)


def notification_body(subscriber: str, notification: Notification, feedback_url: str = "") -> dict[str, Any]:
    """The JSON a webhook receives (schema ``dealpulse.notification/v1``)."""
    return {
        "schema": "dealpulse.notification/v1",
        "notification_id": notification.notification_id(),
        "subscriber": subscriber,
        "group_key": notification.group_key,
        "group_labels": notification.labels,
        "status": notification.status,
        "alerts": list(notification.alerts),
        "feedback_url": feedback_url,
    }
