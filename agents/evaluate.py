"""`dealpulse evaluate`: run a world (or any v1 JSONL file) through the real pipeline and score the models.

Everything goes through the embedded broker and store, one worker and the trainer, exactly as in production.
The figures come from two places: the trainer's progressive (predict-then-learn) metrics in the newest model
snapshots, and the scores the pipeline served, as stored in ClickHouse, compared with the outcomes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from dealpulse.agents.stack import EmbeddedStack, produce
from dealpulse.agents.trainer import newest_snapshots, read_to_end
from dealpulse.models.online import BinnedAUC, ModelSnapshot
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store

# the last intent score a lead got before its won/lost outcome, and the label
_FINAL_INTENT = """
SELECT o.lead_id, o.won, argMax(s.score, s.ts), argMax(s.grade, s.ts)
FROM
(
    SELECT lead_id, min(ts) AS outcome_ts, max(JSONExtractString(props, 'kind') = 'won') AS won
    FROM events WHERE type = 'outcome' AND lead_id != '' AND JSONExtractString(props, 'kind') IN ('won', 'lost')
    GROUP BY lead_id
) AS o
INNER JOIN (SELECT entity_id, ts, score, grade FROM scores WHERE model = 'intent') AS s ON s.entity_id = o.lead_id
WHERE s.ts < o.outcome_ts
GROUP BY o.lead_id, o.won
"""
_FINAL_CHURN = """
SELECT o.account_id, o.churned, argMax(s.score, s.ts)
FROM
(
    SELECT account_id, min(ts) AS outcome_ts, max(JSONExtractString(props, 'kind') = 'churned') AS churned
    FROM events WHERE type = 'outcome' AND JSONExtractString(props, 'kind') IN ('churned', 'renewed')
    GROUP BY account_id
) AS o
INNER JOIN (SELECT entity_id, ts, score FROM scores WHERE model = 'churn') AS s ON s.entity_id = o.account_id
WHERE s.ts < o.outcome_ts
GROUP BY o.account_id, o.churned
"""


def training_end(settings: Settings) -> int:
    """The offset of the last message on the training topic (-1 if it is empty)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "dealpulse-evaluate"})
    try:
        _low, high = consumer.get_watermark_offsets(TopicPartition(settings.training_topic, 0), 10)
    finally:
        consumer.close()
    last = -1
    for message in read_to_end(settings, settings.training_topic, start=max(0, high - 2)):
        last = message.offset() or 0
    return last


def wait_trainer_caught_up(settings: Settings, timeout: float) -> dict[str, ModelSnapshot]:
    """Wait until the newest snapshots have learned everything on the training topic."""
    deadline = time.monotonic() + timeout
    while True:
        end = training_end(settings)
        snapshots = newest_snapshots(settings) if end >= 0 else {}
        if end < 0 or (snapshots and all(s.training_offset >= end for s in snapshots.values())):
            return snapshots
        if time.monotonic() > deadline:
            raise TimeoutError(f"the trainer has not learned up to training offset {end} after {timeout:.0f}s")
        time.sleep(1.0)


def _auc(pairs: Iterable[tuple[float, int]]) -> float | None:
    auc = BinnedAUC()
    for score, label in pairs:
        auc.update(score, label)
    value = auc.value()
    return None if value != value else round(value, 4)


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, index in enumerate(order):
            out[index] = float(rank)
        return out

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    mean = (n - 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(rx, ry, strict=True))
    var = sum((a - mean) ** 2 for a in rx)
    return round(cov / var, 4) if var else None


def served_metrics(store: Store, truth: dict[str, Any] | None) -> dict[str, Any]:
    """What the pipeline served: each lead's / account's last score before its outcome, against the outcome."""
    leads = store.query_rows(_FINAL_INTENT)
    accounts = store.query_rows(_FINAL_CHURN)
    # grade accuracy: a lead graded A or B before its outcome should be won, C or D lost
    correct = sum(1 for _lead, won, _score, grade in leads if (grade in ("A", "B")) == bool(won))
    result: dict[str, Any] = {
        "labelled_leads": len(leads),
        "labelled_accounts": len(accounts),
        "grade_accuracy": round(correct / len(leads), 4) if leads else None,
        "lead_final_score_auc": _auc((float(score), int(won)) for _lead, won, score, _grade in leads),
        "account_final_score_auc": _auc((float(score), int(churned)) for _acc, churned, score in accounts),
    }
    if truth is not None:  # the generator's hidden latent intent: does the ranking follow it?
        latent = truth["leads"]
        pairs = [(float(score), latent[lead]["intent"]) for lead, _won, score, _grade in leads if lead in latent]
        result["latent_intent_spearman"] = _spearman([p[0] for p in pairs], [p[1] for p in pairs])
    return result


def evaluate(
    workdir: Path,
    messages: list[tuple[str, bytes, int]],
    truth: dict[str, Any] | None,
    features_file: Path | None = None,
    timeout: float = 900,
    on_stage: Callable[[str], None] = lambda _stage: None,
) -> dict[str, Any]:
    """Send ``messages`` through the embedded pipeline with the trainer running; return the evaluation."""
    started = time.monotonic()
    # one input partition: the worker labels examples in the stream's own order, so the trainer learns the same
    # sequence and reports the same progressive metrics run after run (with more, the partitions interleave on the
    # training topic as they happen to be processed, and the learned figures move by up to ~0.01 AUC)
    overrides: dict[str, Any] = {"snapshot_interval_s": 1.0, "topic_partitions": 1}
    if features_file is not None:
        overrides["features_file"] = features_file.resolve()
    with EmbeddedStack(workdir, **overrides) as stack:
        on_stage("starting worker and trainer")
        worker = stack.start_worker()
        stack.start_trainer()
        stack.wait_worker_ready(worker)
        on_stage("sending events")
        _, sent = produce(stack.settings, messages)
        on_stage("waiting for the pipeline")
        counts = stack.wait_accounted(sent, timeout)
        on_stage("waiting for the trainer")
        snapshots = wait_trainer_caught_up(stack.settings, timeout)
        served = served_metrics(stack.store, truth)
    result: dict[str, Any] = {"events": sent, **counts}
    for name in ("intent", "churn"):
        metrics = snapshots[name].metrics if name in snapshots else {}
        result[f"{name}_auc"] = metrics.get("auc")
        result[f"baseline_{name}_auc"] = metrics.get("baseline_auc")
        result[f"served_{name}_auc"] = metrics.get("served_auc")
        result[f"{name}_log_loss"] = metrics.get("log_loss")
        result[f"{name}_calibration_error"] = metrics.get("calibration_error")
        result[f"{name}_examples"] = metrics.get("examples", 0)
        result[f"{name}_auc_curve"] = metrics.get("auc_curve", [])
        result[f"{name}_model_version"] = snapshots[name].version if name in snapshots else 0
    result.update(served)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result
