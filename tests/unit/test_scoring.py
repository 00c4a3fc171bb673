"""Predict, then learn: labels reach only snapshots scored before them; models learn and resume."""

from __future__ import annotations

import math
import random

from dealpulse.models.online import OnlineModel, dump_snapshot, load_snapshot
from dealpulse.pipelines.contract import Event
from dealpulse.pipelines.features import DAY_MS, FeatureSpec
from dealpulse.pipelines.scoring import EntityStates, Scorer

SPEC = FeatureSpec.parse(
    """
models: {intent: {entity: lead, bias: 0}, churn: {entity: account, bias: 0}}
features:
  - {name: meetings, entity: lead, kind: count, prior: 1, match: {type: meeting}}
  - {name: usage, entity: account, kind: count, window: 7d, prior: -1, match: {type: feature_use}}
""",
    "f.yaml",
)


def event(i: int, event_type: str, day: float, lead: str = "lead-1", opp: str = "", **props: object) -> Event:
    return Event(f"e{i}", event_type, int(day * DAY_MS), 0, "acc-1", lead, opp, "crm", dict(props), ())


class Fixed:
    """A stand-in model snapshot (a unit test: the real ones are exercised in test_models_learn)."""

    def __init__(self, version: int, score: float) -> None:
        self.version, self.score = version, score

    def predict(self, vector: object) -> float:
        return self.score


def test_outcome_labels_only_snapshots_scored_before_it() -> None:
    scorer = Scorer(SPEC, max_snapshots=5)
    states = EntityStates(lambda e, k: None, SPEC.fingerprint)
    scorer.process(event(1, "meeting", 1), states, {})
    scorer.process(event(2, "meeting", 3), states, {})
    scorer.process(event(3, "meeting", 9), states, {})  # the same moment as the outcome: after the fact
    out = scorer.process(event(4, "outcome", 9, kind="lost"), states, {})
    assert [(x.vector, x.label, x.snapshot_ts_ms // DAY_MS) for x in out.examples] == [([1.0], 0, 1), ([2.0], 0, 3)]
    assert all(x.snapshot_ts_ms < x.labelled_ts_ms for x in out.examples)
    again = scorer.process(event(5, "outcome", 10, kind="lost"), states, {})
    assert [x.snapshot_ts_ms // DAY_MS for x in again.examples] == [9]  # never labelled twice


def test_snapshots_are_spaced_and_bounded() -> None:
    scorer = Scorer(SPEC, max_snapshots=2)
    states = EntityStates(lambda e, k: None, SPEC.fingerprint)
    for i, day in enumerate((1.0, 1.2, 1.5, 4.0, 8.0)):
        scorer.process(event(i, "meeting", day), states, {})
    snapshots = states.get("lead", "lead-1")["x"]
    assert [s[0] / DAY_MS for s in snapshots] == [4.0, 8.0]


def test_feedback_labels_the_score_it_names_and_outcomes_via_the_opportunity() -> None:
    scorer = Scorer(SPEC)
    states = EntityStates(lambda e, k: None, SPEC.fingerprint)
    scored = scorer.process(event(1, "meeting", 1), states, {}).scores[0]
    feedback = scorer.process(event(2, "feedback", 2, ref_id=scored.score_id, verdict="accepted"), states, {})
    assert [(x.score_id, x.label, x.source) for x in feedback.examples] == [(scored.score_id, 1, "feedback")]
    unknown = scorer.process(event(3, "feedback", 2, ref_id="alert:x:y", verdict="rejected"), states, {})
    assert unknown.feedback_unmatched == 1 and not unknown.examples
    scorer.process(event(4, "stage_change", 3, lead="lead-9", opp="opp-9", to_stage="lead"), states, {})
    scorer.process(event(5, "meeting", 4, lead="lead-9"), states, {})
    won = scorer.process(event(6, "outcome", 9, lead="", opp="opp-9", kind="won"), states, {})
    assert [(x.entity_id, x.label) for x in won.examples] == [("lead-9", 1)]


def test_a_verdict_on_an_alert_labels_the_newest_snapshot_from_before_the_alert() -> None:
    scorer = Scorer(SPEC, max_snapshots=5)
    states = EntityStates(lambda e, k: None, SPEC.fingerprint)
    for i, day in enumerate((1, 3, 6)):
        scorer.process(event(i, "meeting", day), states, {})
    verdict = {"ref_id": "a1b2-0", "verdict": "rejected", "entity_ref": "lead:lead-1", "at_ms": int(4 * DAY_MS)}
    out = scorer.process(event(9, "feedback", 7, **verdict), states, {})
    assert [(x.snapshot_ts_ms // DAY_MS, x.label, x.source) for x in out.examples] == [(3, 0, "feedback")]
    early = scorer.process(event(10, "feedback", 7, **{**verdict, "at_ms": 0}), states, {})
    assert early.feedback_unmatched == 1 and not early.examples  # nothing was scored before that alert


def test_cold_prior_until_a_model_is_given_then_its_version() -> None:
    scorer = Scorer(SPEC, grades=(0.75, 0.5, 0.25))
    states = EntityStates(lambda e, k: None, SPEC.fingerprint)
    cold = scorer.process(event(1, "meeting", 1), states, {}).scores[0]
    assert (cold.cold, cold.model_version, round(cold.score, 4)) == (True, 0, round(1 / (1 + math.exp(-0.5)), 4))
    warm = scorer.process(event(2, "meeting", 2), states, {"intent": Fixed(7, 0.8)}).scores[0]
    assert (warm.cold, warm.model_version, warm.grade) == (False, 7, "A")


def test_state_from_another_features_file_is_not_reused() -> None:
    old = {"t": 5, "s": {"0": 99.0}, "a": [], "v": "older"}
    states = EntityStates(lambda e, k: old, SPEC.fingerprint)
    assert states.get("lead", "lead-1")["s"] == {}


def test_models_learn_progressively_and_resume_from_a_snapshot() -> None:
    rng = random.Random(5)
    model = OnlineModel("intent", ["signal", "noise"])
    for _ in range(3000):
        label = int(rng.random() < 0.4)
        model.learn([rng.gauss(1.5 * label, 1.0), rng.gauss(0, 1)], label, served=0.5, baseline=rng.random())
    summary = model.metrics.summary()
    curve = [auc for _, auc in summary["auc_curve"]]
    assert summary["auc"] > 0.8 > 0.6 > summary["baseline_auc"]
    assert curve[-1] > 0.8 and len(curve) == 6
    snapshot = load_snapshot(dump_snapshot(model.snapshot(version=4, training_offset=41, created_ms=0)))
    assert (snapshot.version, snapshot.training_offset, snapshot.learned) == (4, 41, 3000)
    assert snapshot.predict([3.0, 0.0]) > 0.7 > 0.3 > snapshot.predict([-1.5, 0.0])


def test_resume_continues_the_same_model() -> None:
    rng = random.Random(9)
    model = OnlineModel("churn", ["x"])
    for _ in range(500):
        label = int(rng.random() < 0.5)
        model.learn([rng.gauss(label, 0.5)], label, 0.5, 0.5)
    snapshot = model.snapshot(version=3, training_offset=10, created_ms=0)
    resumed = OnlineModel.resume(snapshot.checkpoint)
    assert (resumed.learned, resumed.metrics.examples) == (500, 500)
    assert resumed.pipeline.predict_proba_one({"x": 1.0}) == model.pipeline.predict_proba_one({"x": 1.0})


def test_a_score_serialises_to_the_topic_contract_directly() -> None:
    """The worker hands Score dataclasses to orjson; the scores topic must still carry Score.to_json()."""
    import orjson

    from dealpulse.pipelines.scoring import Score

    score = Score("lead:l-1:e-9", "intent", "lead", "l-1", "acme", "e-9", 1_700_000_000_000, 0.731204, "B", 3, False)
    assert orjson.loads(orjson.dumps([score])) == [score.to_json()]


def test_state_idle_longer_than_the_ttl_starts_afresh() -> None:
    scorer = Scorer(SPEC, max_snapshots=5, state_ttl_ms=10 * DAY_MS)
    states = EntityStates(lambda e, k: None, SPEC.fingerprint)
    scorer.process(event(1, "meeting", 1), states, {})
    scorer.process(event(2, "meeting", 5), states, {})  # 4 days idle: kept
    assert states.get("lead", "lead-1")["s"] != {}
    kept = [snapshot[-1] for snapshot in states.get("lead", "lead-1")["x"]]
    scorer.process(event(3, "meeting", 20), states, {})  # 15 days idle: what it knew is gone
    lead = states.get("lead", "lead-1")
    assert len(lead["x"]) == 1 and lead["x"][0][-1] == kept[0]  # one meeting counted again, as on day 1
    assert ("lead", "lead-1") in states.dirty and ("account", "acc-1") in states.dirty
    assert scorer.process(event(4, "outcome", 21, kind="won"), states, {}).examples  # the fresh snapshot labels
