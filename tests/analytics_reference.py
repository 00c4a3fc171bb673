"""The analytics definitions computed again in plain Python, independently of ClickHouse, to check the views.

Input: the valid events (dicts as sent, deduplicated) and the stage configuration. Times are integer
milliseconds since the epoch (UTC), as in the store, so nothing depends on float time arithmetic.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

DAY_MS = 86_400_000


def ts_ms(event: dict[str, Any]) -> int:
    return round(datetime.fromisoformat(event["ts"]).timestamp() * 1000)


def quantile_inclusive(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (ClickHouse quantileExactInclusive, numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    return xs[lo] if lo + 1 >= len(xs) else xs[lo] + (h - lo) * (xs[lo + 1] - xs[lo])


@dataclass(frozen=True)
class StageInfo:
    position: int
    kind: str
    threshold_days: float
    required_activity: str


class Reference:
    def __init__(self, events: list[dict[str, Any]], config: list[tuple[str, int, str, float, str]]) -> None:
        self.events = events
        self.stages = {name: StageInfo(pos, kind, thr, req) for name, pos, kind, thr, req in config}
        self.max_ts = max(ts_ms(e) for e in events)
        self.stage_events = sorted(
            (e["opportunity_id"], ts_ms(e), e["event_id"], e["props"]["to_stage"])
            for e in events
            if e["type"] == "stage_change" and e.get("opportunity_id")
        )
        self.activity: dict[tuple[str, str], list[int]] = defaultdict(list)
        for e in events:
            if e.get("opportunity_id") and e["type"] != "stage_change":
                self.activity[(e["opportunity_id"], e["type"])].append(ts_ms(e))
        self.dims = self._dimensions()

    def cutoff(self, as_of_ms: int | None) -> int:
        return self.max_ts if as_of_ms is None else min(as_of_ms, self.max_ts)

    def _dimensions(self) -> dict[str, dict[str, str]]:
        """Per opportunity: the account's newest non-empty attributes."""
        latest: dict[str, dict[str, tuple[int, str]]] = defaultdict(dict)
        for e in self.events:
            if e["type"] != "account_update":
                continue
            for key in ("region", "industry", "product_line", "owner", "team"):
                value = e["props"].get(key) or ""
                if value and (key not in latest[e["account_id"]] or latest[e["account_id"]][key][0] < ts_ms(e)):
                    latest[e["account_id"]][key] = (ts_ms(e), value)
        account_of = {e["opportunity_id"]: e["account_id"] for e in self.events if e.get("opportunity_id")}
        return {opp: {key: value for key, (_, value) in latest[account].items()} for opp, account in account_of.items()}

    def _paths(self, cutoff: int) -> dict[str, list[tuple[int, str, str]]]:
        paths: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
        for opp, ts, event_id, stage in self.stage_events:
            if ts <= cutoff:
                paths[opp].append((ts, event_id, stage))
        return paths

    # -- funnel ------------------------------------------------------------------------------------------------
    def funnel_steps(self, as_of_ms: int | None, window_days: int) -> list[dict[str, Any]]:
        cutoff = self.cutoff(as_of_ms)
        window = window_days * DAY_MS
        steps = []
        for opp, path in self._paths(cutoff).items():
            known = [(ts, stage, self.stages[stage]) for ts, _, stage in path if stage in self.stages]
            firsts: dict[str, int] = {}
            for ts, stage, _ in known:
                firsts[stage] = min(ts, firsts.get(stage, ts))
            for stage, entered in firsts.items():
                info = self.stages[stage]
                if info.kind != "open":
                    continue
                later = [ts for ts, _, i in known if i.position > info.position and i.kind != "lost" and ts >= entered]
                lost = [ts for ts, _, i in known if i.kind == "lost" and ts >= entered]
                converted_at = min(later) if later else None
                converted = converted_at is not None and converted_at <= entered + window
                dropped = not converted and (bool(lost) or entered + window <= cutoff)
                steps.append({
                    "opportunity_id": opp, "stage": stage, "position": info.position, "entered_at": entered,
                    "converted": converted, "dropped": dropped, "open": not converted and not dropped,
                    "days_to_convert": (converted_at - entered) / DAY_MS if converted and converted_at else None,
                    **{k: self.dims.get(opp, {}).get(k, "") for k in ("region", "industry", "product_line", "owner", "team")},
                })  # fmt: skip
        return steps

    def funnel(self, as_of_ms: int | None = None, window_days: int = 30, since_ms: int = 0,
               by: str | None = None) -> dict[tuple[Any, ...], dict[str, Any]]:  # fmt: skip
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
        for step in self.funnel_steps(as_of_ms, window_days):
            if step["entered_at"] < since_ms or (as_of_ms is not None and step["entered_at"] >= as_of_ms):
                continue
            key = ((step[by],) if by else ()) + (step["stage"], step["position"])
            groups[key].append(step)
        result = {}
        for key, rows in groups.items():
            converted = sum(r["converted"] for r in rows)
            dropped = sum(r["dropped"] for r in rows)
            days = [r["days_to_convert"] for r in rows if r["converted"]]
            result[key] = {
                "entered": len(rows), "converted": converted, "dropped": dropped,
                "still_open": sum(r["open"] for r in rows), "conversion_rate": converted / len(rows),
                "decided_conversion_rate": converted / (converted + dropped) if converted + dropped else None,
                "median_days_to_convert": quantile_inclusive(days, 0.5),
                "p90_days_to_convert": quantile_inclusive(days, 0.9),
            }  # fmt: skip
        return result

    # -- stage visits --------------------------------------------------------------------------------------------
    def visits(self, as_of_ms: int | None) -> list[dict[str, Any]]:
        cutoff = self.cutoff(as_of_ms)
        visits = []
        for opp, path in self._paths(cutoff).items():
            ordered = sorted(path)
            for i, (ts, _, stage) in enumerate(ordered):
                info = self.stages.get(stage)
                if info is None or info.kind != "open":
                    continue
                left = ordered[i + 1][0] if i + 1 < len(ordered) else None
                end = cutoff if left is None else left
                dwell = (end - ts) / DAY_MS
                notes = self.activity.get((opp, info.required_activity), [])
                visits.append({
                    "opportunity_id": opp, "stage": stage, "position": info.position, "entered_at": ts,
                    "is_current": left is None, "dwell_days": dwell, "threshold_days": info.threshold_days,
                    "over_threshold": dwell > info.threshold_days,
                    "compliant": any(ts <= t < end and t <= cutoff for t in notes),
                })  # fmt: skip
        return visits

    def dwell(self, as_of_ms: int | None = None, since_ms: int = 0) -> dict[tuple[Any, ...], dict[str, Any]]:
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
        for v in self.visits(as_of_ms):
            if v["entered_at"] >= since_ms and (as_of_ms is None or v["entered_at"] < as_of_ms):
                groups[(v["stage"], v["position"])].append(v)
        result = {}
        for key, rows in groups.items():
            done = [r["dwell_days"] for r in rows if not r["is_current"]]
            result[key] = {
                "visits": len(rows), "completed": len(done), "avg_dwell_days": sum(done) / len(done) if done else None,
                "p50_dwell_days": quantile_inclusive(done, 0.5), "p90_dwell_days": quantile_inclusive(done, 0.9),
                "blocking_rate": sum(r["over_threshold"] for r in rows) / len(rows),
                "stalled_now": sum(r["is_current"] and r["over_threshold"] for r in rows),
            }  # fmt: skip
        return result

    def stalls(self, as_of_ms: int | None = None) -> dict[str, dict[str, Any]]:
        cutoff = self.cutoff(as_of_ms)
        last: dict[str, int] = {}
        for (opp, _type), times in self.activity.items():
            seen = [t for t in times if t <= cutoff]
            if seen:
                last[opp] = max(last.get(opp, 0), max(seen))
        return {
            v["opportunity_id"]: {
                "stage": v["stage"],
                "days_in_stage": v["dwell_days"],
                "days_stalled": v["dwell_days"] - v["threshold_days"],
                "days_since_activity": (cutoff - last[v["opportunity_id"]]) / DAY_MS
                if v["opportunity_id"] in last
                else None,
                "owner": self.dims.get(v["opportunity_id"], {}).get("owner", ""),
            }
            for v in self.visits(as_of_ms)
            if v["is_current"] and v["over_threshold"]
        }

    # -- health ----------------------------------------------------------------------------------------------------
    def customer_health(self, as_of_ms: int | None = None) -> dict[str, dict[str, Any]]:
        cutoff_day = datetime.fromtimestamp(self.cutoff(as_of_ms) / 1000, UTC).date()
        this_week = cutoff_day - timedelta(days=cutoff_day.weekday())
        counts: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
        for e in self.events:
            day: date = datetime.fromtimestamp(ts_ms(e) / 1000, UTC).date()
            if not this_week - timedelta(days=21) <= day < this_week:
                continue
            week = ((this_week - day).days - 1) // 7  # 0 = the last complete week
            row = counts[e["account_id"]]
            if e["type"] == "feature_use":
                row[week] += 1
            if e["type"] == "support_ticket" and e["props"].get("status") == "open":
                row[3 + week] += 1
        result = {}
        for account, (u1, u2, u3, t1, t2, t3) in counts.items():
            if u1 + u2 + u3 + t1 + t2 + t3 == 0:
                continue
            result[account] = {"status": "warn" if (u1 < u2 < u3) or (t1 > t2 > t3) else "ok"}
        return result

    def health(
        self, since_ms: int, until_ms: int | None, targets: dict[str, tuple[str, str]]
    ) -> dict[str, tuple[float, float]]:
        """metric -> (numerator, denominator); ``targets`` maps reach metrics to (from_stage, to_stage)."""
        cutoff = self.cutoff(until_ms)
        end = until_ms if until_ms is not None else 2**62
        paths = self._paths(cutoff)
        result: dict[str, tuple[float, float]] = {}
        for metric, (from_stage, to_stage) in targets.items():
            goal = self.stages[to_stage].position
            num = den = 0
            for path in paths.values():
                known = [(ts, self.stages[s]) for ts, _, s in path if s in self.stages]
                entries = [ts for ts, _, s in path if s == from_stage]
                if not entries or not since_ms <= min(entries) < end:
                    continue
                den += 1
                num += any(i.position >= goal and i.kind != "lost" and ts >= min(entries) for ts, i in known)
            result[metric] = (float(num), float(den))
        done = [v for v in self.visits(until_ms) if not v["is_current"] and since_ms <= v["entered_at"] < end]
        result["opportunity_compliance"] = (float(sum(v["compliant"] for v in done)), float(len(done)))
        cycle, won = 0.0, 0
        for path in paths.values():
            known = [(ts, self.stages[s]) for ts, _, s in path if s in self.stages]
            wins = [ts for ts, i in known if i.kind == "won"]
            if known and wins and since_ms <= min(wins) < end:
                cycle += (min(wins) - min(ts for ts, _ in known)) / DAY_MS
                won += 1
        result["deal_cycle_days"] = (cycle, float(won))
        health = self.customer_health(until_ms)
        result["customer_health"] = (float(sum(h["status"] == "ok" for h in health.values())), float(len(health)))
        return result
