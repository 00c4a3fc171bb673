"""The synthetic world: deterministic, realistic proportions, no leaked latent variables."""

from __future__ import annotations

import itertools
from collections import Counter

import orjson

from dealpulse.pipelines.contract import ContractRules, Event, validate_event
from dealpulse.pipelines.generator import generate_world

NOW_MS = 1_795_000_000_000


def test_deterministic_by_seed_and_different_across_seeds() -> None:
    a = [r.value for r in generate_world(1, 2000).records()]
    assert a == [r.value for r in generate_world(1, 2000).records()]
    assert a != [r.value for r in generate_world(2, 2000).records()]


def test_proportions_of_bad_and_duplicate_records() -> None:
    records = list(generate_world(3, 20_000).records())
    kinds = Counter(r.kind for r in records)
    assert len(records) == 20_000
    assert 0.006 < kinds["malformed"] / 20_000 < 0.014
    assert 0.003 < kinds["duplicate"] / 20_000 < 0.008


def test_valid_records_pass_the_contract_and_cover_the_behaviours() -> None:
    rules = ContractRules.default()
    types = Counter()
    for record in generate_world(4, 10_000).records():
        if record.kind == "valid":
            result = validate_event(orjson.loads(record.value), rules, NOW_MS)
            assert isinstance(result, Event), (record, result)
            types[result.type] += 1
    for expected in ("page_view", "doc_page_turn", "chat_message", "meeting", "quote", "stage_change",
                     "feature_use", "support_ticket", "account_update", "outcome", "contract_upload"):  # fmt: skip
        assert types[expected] > 0, expected


def test_event_time_order_with_a_little_lateness() -> None:
    times = [r.ts_ms for r in generate_world(5, 10_000).records() if r.kind == "valid"]
    late = sum(1 for before, after in itertools.pairwise(times) if after < before)
    assert 0 < late / len(times) < 0.05


def test_latent_variables_do_not_leak_into_events() -> None:
    world = generate_world(6, 5000)
    blob = b"".join(r.value for r in world.records())
    for word in (b"intent", b"churn_propensity", b"converts", b"stall"):
        assert word not in blob
    truth = orjson.loads(world.truth.to_json())
    assert truth["leads"] and truth["accounts"] and truth["opportunities"]
    lead = next(iter(truth["leads"].values()))
    assert 0 <= lead["intent"] <= 1 and isinstance(lead["converts"], bool)


def test_the_generator_does_not_leak_its_hidden_truth_into_props() -> None:
    world = generate_world(seed=2, target_events=5_000)
    hidden = {"intent", "converts", "churns", "churn_propensity", "stalls", "stall_stage"}
    for _, _, event in world.events:
        assert not hidden & set(event["props"]), event
