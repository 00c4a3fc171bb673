"""Features declared in YAML, computed on event time, kept in small per-entity state. No I/O here.

A :class:`FeatureSpec` says which events feed which feature of which entity (lead or account). An entity's
state is a plain, JSON-serialisable dict so it can live in a Faust table: windowed features keep one bucket per
UTC day (or hour, for windows under two days), so state stays bounded however many events arrive.

>>> spec = FeatureSpec.parse('''
... models: {intent: {entity: lead}}
... features:
...   - {name: spec_views_3d, entity: lead, kind: count, window: 3d, prior: 1,
...      match: {type: page_view, props: {page_category: product_spec}}}
...   - {name: days_quiet, entity: lead, kind: days_since, cap: 30, match: {type: [page_view, meeting]}}
... ''', "features.yaml")
>>> state = new_state()
>>> day = 86_400_000
>>> view = {"page_category": "product_spec"}
>>> for ts in (0, day, 5 * day):
...     changed = update_state(spec, "lead", state, "page_view", ts, view, ())
>>> spec.vector("lead", state)
[1.0, 0.0]
>>> spec.names("lead")
['spec_views_3d', 'days_quiet']
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

from dealpulse.pipelines.config_errors import error_at, load_yaml

ENTITIES = ("lead", "account")
KINDS = ("count", "sum", "max", "days_since", "days_until", "wow_change", "open_items")
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MAX_OPEN_ITEMS = 64  # open tickets per account kept in state; beyond that the oldest are forgotten
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([dh])$")


@dataclass(frozen=True, slots=True)
class Feature:
    """One declared feature; ``index`` is its position in its entity's vector."""

    name: str
    entity: str
    kind: str
    index: int
    types: frozenset[str]
    key: str = ""  # its short key in entity state (the index): keeps state small
    props: tuple[tuple[str, frozenset[Any]], ...] = ()
    keywords: frozenset[str] = frozenset()
    window_ms: int = 0
    bucket_ms: int = DAY_MS
    prop: str = ""
    status_prop: str = ""
    closed: frozenset[str] = frozenset()
    cap: float = math.inf
    prior: float = 0.0
    scale: float = 1.0

    def matches(self, props: dict[str, Any], keywords: Sequence[str]) -> bool:
        for name, allowed in self.props:
            if props.get(name) not in allowed:
                return False
        return not self.keywords or any(tag in self.keywords for tag in keywords)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model over one entity's features, and its cold-start prior."""

    name: str
    entity: str
    bias: float = 0.0
    min_labels: int = 200


@dataclass(frozen=True)
class FeatureSpec:
    """The parsed features file: models, features, and an index from (entity, event type) to features."""

    models: dict[str, ModelSpec]
    features: tuple[Feature, ...]
    source: str = "features.yaml"

    def __post_init__(self) -> None:
        index: dict[tuple[str, str], list[Feature]] = {}
        for feature in self.features:
            for event_type in feature.types:
                index.setdefault((feature.entity, event_type), []).append(feature)
        object.__setattr__(self, "_by_type", {key: tuple(value) for key, value in index.items()})
        object.__setattr__(self, "_by_entity", {e: tuple(f for f in self.features if f.entity == e) for e in ENTITIES})
        # hot path: each feature with its value before it has seen anything (and that in a snapshot); the prior's
        # non-zero terms
        plan = {}
        for entity in ENTITIES:
            empties = [feature_value(f, None, 0) for f in self.of(entity)]
            plan[entity] = tuple(
                (f.key, empty, snapshot_value(empty), evaluator(f))
                for f, empty in zip(self.of(entity), empties, strict=True)
            )
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(
            self,
            "_prior_terms",
            {e: tuple((i, f.prior, f.scale) for i, f in enumerate(self.of(e)) if f.prior) for e in ENTITIES},
        )
        object.__setattr__(self, "_model_of", {m.entity: m for m in reversed(self.models.values())})

    @functools.cached_property
    def fingerprint(self) -> str:
        """Changes whenever the features change: state written under another spec is not reused."""
        import hashlib

        # sorted: a frozenset's order changes with the process's hash seed, the fingerprint must not
        props = [[(name, sorted(map(repr, values))) for name, values in f.props] for f in self.features]
        text = repr([(f.name, f.entity, f.kind, sorted(f.types), p, sorted(f.keywords), f.window_ms, f.prop,
                      f.status_prop, sorted(f.closed)) for f, p in zip(self.features, props, strict=True)])  # fmt: skip
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def for_event(self, entity: str, event_type: str) -> tuple[Feature, ...]:
        return self._by_type.get((entity, event_type), ())  # type: ignore[attr-defined]

    def of(self, entity: str) -> tuple[Feature, ...]:
        return self._by_entity[entity]  # type: ignore[attr-defined]

    def names(self, entity: str) -> list[str]:
        return [f.name for f in self.of(entity)]

    def model_for(self, entity: str) -> ModelSpec:
        """The (first declared) model over ``entity``'s features; KeyError if there is none."""
        return self._model_of[entity]  # type: ignore[attr-defined]

    def vector(self, entity: str, state: dict[str, Any]) -> list[float]:
        """The entity's feature values at its own event time (the newest event it has seen)."""
        return self.vector_and_snapshot(entity, state)[0]

    def vector_and_snapshot(self, entity: str, state: dict[str, Any]) -> tuple[list[float], list[float]]:
        """:meth:`vector`, and the same values as a snapshot keeps them (see :func:`snapshot_value`), in one pass:
        a feature that has seen nothing costs neither an evaluation nor a rounding (most features of most
        entities, and this runs for every score)."""
        now = state["t"]
        values = state["s"]
        vector: list[float] = []
        snapshot: list[float] = []
        for key, empty, empty_in_snapshot, value_of in self._plan[entity]:  # type: ignore[attr-defined]
            current = values.get(key)
            if current is None:
                vector.append(empty)
                snapshot.append(empty_in_snapshot)
            else:
                value = value_of(current, now)
                vector.append(value)
                snapshot.append(int(value) if value.is_integer() else round(value, 4))  # snapshot_value, inlined
        return vector, snapshot

    def prior(self, entity: str, vector: Sequence[float]) -> float:
        """The documented cold-start score: sigmoid(bias + sum(prior * v / (|v| + scale)))."""
        z = self.model_for(entity).bias
        for i, weight, scale in self._prior_terms[entity]:  # type: ignore[attr-defined]
            value = vector[i]
            z += weight * value / (abs(value) + scale)
        return 1.0 / (1.0 + math.exp(-z))

    @classmethod
    def parse(cls, text: str, filename: str) -> FeatureSpec:
        return _parse(text, filename)

    @classmethod
    def from_file(cls, path: Path) -> FeatureSpec:
        return _parse(path.read_text(encoding="utf-8"), str(path))

    @classmethod
    def default(cls) -> FeatureSpec:
        text = resources.files("dealpulse.pipelines").joinpath("features.yaml").read_text(encoding="utf-8")
        return _parse(text, "features.yaml")


def load_features(path: Path | None) -> FeatureSpec:
    """The features file at ``path``, or the shipped default."""
    return FeatureSpec.from_file(path) if path else FeatureSpec.default()


# --- state -------------------------------------------------------------------------------------------------------


def new_state() -> dict[str, Any]:
    """An entity's state: ``t`` its newest event time, ``s`` feature states, ``a`` activity buckets (baseline)."""
    return {"t": 0, "s": {}, "a": []}


def update_state(
    spec: FeatureSpec,
    entity: str,
    state: dict[str, Any],
    event_type: str,
    ts_ms: int,
    props: dict[str, Any],
    keywords: Sequence[str],
) -> bool:
    """Fold one event into the entity's state; True if any feature changed (then the entity gets a new score)."""
    if ts_ms > state["t"]:
        state["t"] = ts_ms
    _add_bucket(state["a"], ts_ms // DAY_MS, 1.0, False, state["t"] // DAY_MS - 7)
    changed = False
    values = state["s"]
    for feature in spec.for_event(entity, event_type):
        if (feature.props or feature.keywords) and not feature.matches(props, keywords):
            continue
        values[feature.key] = _fold(feature, values.get(feature.key), ts_ms, props, state["t"])
        changed = True
    return changed


def baseline(state: dict[str, Any]) -> float:
    """The naive recency/frequency score evaluation compares with: events in the last 7 days, squashed."""
    since = state["t"] // DAY_MS - 7
    recent = 0.0
    for day, count in state["a"]:  # a plain loop beats sum() over a generator (runs for every score)
        if day > since:
            recent += count
    return recent / (recent + 5.0)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _add_bucket(buckets: list[list[float]], bucket: int, value: float, use_max: bool, oldest: int) -> None:
    """Add to (or max into) a bucket of a sorted [[bucket, value], ...] list, dropping buckets <= ``oldest``."""
    if bucket <= oldest:
        return
    if buckets and buckets[-1][0] == bucket:
        last = buckets[-1]
        last[1] = max(last[1], value) if use_max else last[1] + value
    elif not buckets or buckets[-1][0] < bucket:
        buckets.append([bucket, value])
    else:  # a late event: find its bucket
        for item in buckets:
            if item[0] == bucket:
                item[1] = max(item[1], value) if use_max else item[1] + value
                break
        else:
            buckets.append([bucket, value])
            buckets.sort()
    while buckets and buckets[0][0] <= oldest:
        del buckets[0]


def _fold(feature: Feature, current: Any, ts_ms: int, props: dict[str, Any], now_ms: int) -> Any:
    kind = feature.kind
    if kind in ("count", "sum", "max", "wow_change"):
        amount = 1.0 if kind == "count" or not feature.prop else _number(props.get(feature.prop))
        if amount is None:
            return current
        if not feature.window_ms and kind != "wow_change":  # all-time totals need no buckets
            if current is None:
                return amount
            return max(current, amount) if kind == "max" else current + amount
        buckets = current if current is not None else []
        span = 14 * DAY_MS if kind == "wow_change" else feature.window_ms
        oldest = now_ms // feature.bucket_ms - span // feature.bucket_ms
        _add_bucket(buckets, ts_ms // feature.bucket_ms, amount, kind == "max", oldest)
        return buckets
    if kind == "days_since":
        return ts_ms if current is None else max(current, ts_ms)
    if kind == "days_until":
        value = props.get(feature.prop)
        if not isinstance(value, str):
            return current
        try:
            target = date.fromisoformat(value[:10])
        except ValueError:
            return current
        # the latest statement wins: [event time, target epoch ms]
        if current is not None and current[0] > ts_ms:
            return current
        return [ts_ms, (target - date(1970, 1, 1)).days * DAY_MS]
    # open_items: {item id: event time of its latest status}
    item = props.get(feature.prop)
    if not isinstance(item, str | int):
        return current
    items = current if current is not None else {}
    key = str(item)
    is_open = props.get(feature.status_prop) not in feature.closed
    if is_open:
        items[key] = ts_ms
        if len(items) > MAX_OPEN_ITEMS:
            del items[min(items, key=items.__getitem__)]
    else:
        items.pop(key, None)
    return items


def snapshot_value(value: float) -> float:
    """A feature value as a state's snapshot keeps it: whole numbers as integers, the rest to 4 decimals (states
    stay small in JSON).

    >>> [snapshot_value(v) for v in (3.0, 0.123456, -2.5, math.inf)]
    [3, 0.1235, -2.5, inf]
    """
    return int(value) if value.is_integer() else round(value, 4)


def evaluator(feature: Feature) -> Callable[[Any, int], float]:
    """``feature_value`` for one feature, specialised where it pays: windowed counts and sums (most features),
    days since, all-time totals. A vector evaluates every feature its entity has seen at every score.

    >>> f = Feature("views", "lead", "count", 0, frozenset({"page_view"}), "0", window_ms=3 * DAY_MS)
    >>> evaluator(f)([[19, 2.0], [20, 1.0]], 20 * DAY_MS) == feature_value(f, [[19, 2.0], [20, 1.0]], 20 * DAY_MS)
    True
    """
    cap = feature.cap
    if feature.kind == "days_since":  # every lead and account has one

        def days_since(current: int, now_ms: int) -> float:
            value = (now_ms - current) / DAY_MS
            return 0.0 if value < 0.0 else value if value < cap else float(cap)

        return days_since
    if feature.kind in ("count", "sum", "max") and not feature.window_ms:  # all-time: the state is the value

        def total(current: float, now_ms: int) -> float:
            return float(current if current < cap else cap)

        return total
    if feature.kind not in ("count", "sum"):
        return functools.partial(feature_value, feature)
    bucket_ms, span = feature.bucket_ms, feature.window_ms // feature.bucket_ms

    def windowed_total(current: list[list[float]], now_ms: int) -> float:
        newest = now_ms // bucket_ms
        oldest = newest - span
        value = 0.0
        for bucket, amount in current:
            if oldest < bucket <= newest:
                value += amount
        return float(value if value < cap else cap)

    return windowed_total


def feature_value(feature: Feature, current: Any, now_ms: int) -> float:
    """The feature's value at ``now_ms`` from its state (0 or ``cap`` when it has seen nothing)."""
    kind = feature.kind
    if current is None:
        return feature.cap if kind in ("days_since", "days_until") else 0.0
    if kind in ("count", "sum", "max") and feature.window_ms:
        newest = now_ms // feature.bucket_ms
        oldest = newest - feature.window_ms // feature.bucket_ms
        if kind == "max":
            value = max((v for b, v in current if oldest < b <= newest), default=0.0)
        else:
            value = 0.0
            for bucket, amount in current:  # a plain loop beats sum() over a generator (hot path)
                if oldest < bucket <= newest:
                    value += amount
    elif kind in ("count", "sum", "max"):
        value = current
    elif kind == "wow_change":
        today = now_ms // DAY_MS
        this_week = sum(v for b, v in current if today - 7 < b <= today)
        last_week = sum(v for b, v in current if today - 14 < b <= today - 7)
        value = (this_week - last_week) / max(1.0, last_week)
    elif kind == "days_since":
        value = max(0.0, (now_ms - current) / DAY_MS)
    elif kind == "days_until":
        value = max(-feature.cap, (current[1] - now_ms) / DAY_MS)
    else:  # open_items
        value = float(len(current))
    return float(min(value, feature.cap))


# --- parsing -----------------------------------------------------------------------------------------------------

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_FEATURE_KEYS = {
    "name", "entity", "kind", "match", "window", "prop", "status_prop", "closed", "cap", "prior", "scale",
}  # fmt: skip


def parse_duration_ms(text: Any) -> int | None:
    """'3d' -> 259200000, '72h' -> 259200000; None if it is not a duration.

    >>> parse_duration_ms("3d") == parse_duration_ms("72h") == 3 * DAY_MS
    True
    """
    match = _DURATION.match(str(text).strip()) if isinstance(text, str | int) else None
    if not match:
        return None
    amount, unit = float(match.group(1)), match.group(2)
    return int(amount * (DAY_MS if unit == "d" else HOUR_MS))


def _parse(text: str, filename: str) -> FeatureSpec:
    data, marks = load_yaml(text, filename)

    fail = error_at(filename, marks)

    if not isinstance(data, dict):
        raise fail((), "a features file is a mapping with 'models' and 'features'")
    for key in data:
        if key not in ("models", "features"):
            raise fail((key,), f"unknown key {key!r} (expected 'models' and 'features')")
    models = _parse_models(data.get("models"), fail)
    raw_features = data.get("features")
    if not isinstance(raw_features, list) or not raw_features:
        raise fail(("features",), "'features' must be a non-empty list")
    features: list[Feature] = []
    seen: set[str] = set()
    positions = dict.fromkeys(ENTITIES, 0)
    for i, raw in enumerate(raw_features):
        feature = _parse_feature(raw, ("features", i), positions, fail)
        if feature.name in seen:
            raise fail(("features", i, "name"), f"feature {feature.name!r} is declared twice")
        seen.add(feature.name)
        positions[feature.entity] += 1
        features.append(feature)
    for model in models.values():
        if not positions[model.entity]:
            raise fail(("models", model.name), f"model {model.name!r} has no {model.entity} features")
    return FeatureSpec(models, tuple(features), filename)


def _parse_models(raw: Any, fail: Any) -> dict[str, ModelSpec]:
    if raw is None:
        return {"intent": ModelSpec("intent", "lead"), "churn": ModelSpec("churn", "account")}
    if not isinstance(raw, dict):
        raise fail(("models",), "'models' maps a model name (intent, churn) to {entity, bias, min_labels}")
    models = {}
    for name, body in raw.items():
        path = ("models", name)
        if name not in ("intent", "churn"):
            raise fail(path, f"unknown model {name!r} (expected intent or churn)")
        if not isinstance(body, dict):
            raise fail(path, f"model {name!r} needs a mapping")
        expected = "lead" if name == "intent" else "account"
        if body.get("entity", expected) != expected:
            raise fail((*path, "entity"), f"model {name!r} scores a {expected}")
        for key in body:
            if key not in ("entity", "bias", "min_labels"):
                raise fail((*path, key), f"unknown key {key!r} in model {name!r}")
        bias, min_labels = body.get("bias", 0.0), body.get("min_labels", 200)
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise fail((*path, "bias"), "'bias' must be a number")
        if isinstance(min_labels, bool) or not isinstance(min_labels, int) or min_labels < 0:
            raise fail((*path, "min_labels"), "'min_labels' must be a whole number >= 0")
        models[name] = ModelSpec(name, expected, float(bias), min_labels)
    return models


def _parse_feature(raw: Any, path: tuple[Any, ...], positions: dict[str, int], fail: Any) -> Feature:
    if not isinstance(raw, dict):
        raise fail(path, "a feature is a mapping with name, entity, kind and match")
    for key in raw:
        if key not in _FEATURE_KEYS:
            raise fail((*path, key), f"unknown key {key!r}; expected one of {', '.join(sorted(_FEATURE_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail((*path, "name"), "'name' must be snake_case")
    entity = raw.get("entity")
    if entity not in ENTITIES:
        raise fail((*path, "entity"), f"feature {name!r}: 'entity' must be one of {', '.join(ENTITIES)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise fail((*path, "kind"), f"feature {name!r}: 'kind' must be one of {', '.join(KINDS)}")
    match = raw.get("match")
    if not isinstance(match, dict) or "type" not in match:
        raise fail((*path, "match"), f"feature {name!r}: 'match' needs at least a 'type'")
    for key in match:
        if key not in ("type", "props", "keywords"):
            raise fail((*path, "match", key), f"unknown match key {key!r} (type, props, keywords)")
    types = match["type"] if isinstance(match["type"], list) else [match["type"]]
    if not types or not all(isinstance(t, str) and t for t in types):
        raise fail((*path, "match", "type"), f"feature {name!r}: 'type' is an event type or a list of them")
    props_raw = match.get("props") or {}
    if not isinstance(props_raw, dict):
        raise fail((*path, "match", "props"), "'props' maps a prop name to a value or a list of values")
    props = tuple((str(k), frozenset(v if isinstance(v, list) else [v])) for k, v in props_raw.items())
    keywords = match.get("keywords") or []
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise fail((*path, "match", "keywords"), "'keywords' is a list of keyword tags")
    window_ms = 0
    if "window" in raw:
        parsed = parse_duration_ms(raw["window"])
        if not parsed:
            raise fail(
                (*path, "window"), f"feature {name!r}: window {raw['window']!r} is not a duration like 3d or 72h"
            )
        window_ms = parsed
    if kind == "count" and not window_ms and "window" in raw:
        raise fail((*path, "window"), "window must be positive")
    if kind in ("days_since", "days_until", "open_items", "wow_change") and window_ms:
        raise fail((*path, "window"), f"feature {name!r}: a {kind} feature has no window")
    prop = raw.get("prop", "")
    if kind in ("sum", "max", "days_until", "open_items") and not (isinstance(prop, str) and prop):
        raise fail(path, f"feature {name!r}: a {kind} feature needs 'prop'")
    status_prop, closed = raw.get("status_prop", ""), raw.get("closed", [])
    if kind == "open_items" and (not status_prop or not isinstance(closed, list) or not closed):
        raise fail(path, f"feature {name!r}: an open_items feature needs 'status_prop' and a 'closed' list")
    numbers = {}
    default_cap = 365.0 if kind in ("days_since", "days_until") else math.inf
    for key, default in (("cap", default_cap), ("prior", 0.0), ("scale", 1.0)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise fail((*path, key), f"feature {name!r}: {key!r} must be a number")
        numbers[key] = float(value)
    if numbers["scale"] <= 0 or numbers["cap"] <= 0:
        raise fail(path, f"feature {name!r}: 'scale' and 'cap' must be positive")
    bucket_ms = DAY_MS if window_ms >= 2 * DAY_MS or not window_ms else HOUR_MS
    if window_ms and window_ms % bucket_ms:
        raise fail((*path, "window"), f"feature {name!r}: a window of 2 days or more is whole days")
    return Feature(
        name, entity, kind, positions[entity], frozenset(types), str(positions[entity]), props, frozenset(keywords), window_ms, bucket_ms,
        str(prop), str(status_prop), frozenset(map(str, closed)), numbers["cap"], numbers["prior"], numbers["scale"],
    )  # fmt: skip
