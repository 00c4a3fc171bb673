"""`dealpulse bench dedup`: a full dedup window against one below its cap, with the real ingest function."""

from __future__ import annotations

import orjson
from click.testing import CliRunner

from dealpulse.agents.bench_dedup import PARTITION, TOPIC, filled_window, timed_ingest
from dealpulse.agents.cli import main
from dealpulse.pipelines.contract import ContractRules
from dealpulse.pipelines.generator import generate_world, pack_messages


def test_a_full_window_evicts_its_oldest_id_for_every_new_one_and_still_finds_duplicates() -> None:
    messages = list(pack_messages(generate_world(5, 3_000).records(), 100))
    state = filled_window(1_000, 1_000)
    timed = timed_ingest(messages, state, ContractRules.default())
    seen = state.partitions[(TOPIC, PARTITION)].seen
    assert timed.items == 3_000 and timed.stored > 2_000
    assert len(seen) == 1_000  # at the cap throughout
    assert not any(event_id.startswith("bench-fill-") for event_id in seen)  # the oldest went first
    # the same messages again (as a replay after a restart would send them): the newest ids are still known
    again = filled_window(0, 1_000)
    first = timed_ingest(messages, again, ContractRules.default())
    second = timed_ingest(messages[-5:], again, ContractRules.default(), first_offset=len(messages))
    assert first.stored == timed.stored
    assert second.stored == 0 and second.items > 0


def test_bench_dedup_reports_the_figures_its_help_names() -> None:
    # figures are not asserted (they belong to the bench); what a user reads from it is
    result = CliRunner().invoke(main, ["bench", "dedup", "--events", "4000", "--window", "2000", "--json"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout.splitlines()[-1])
    assert report["bench"] == "dedup" and report["events"] == 4_000 and report["window_ids"] == 2_000
    assert 3_000 < report["evictions"] < 4_000  # every stored event evicted one id (the rest: DLQ, duplicates)
    assert len(report["at_cap_ratio_by_fifth"]) == 5
    for key in ("us_per_event_below_cap", "us_per_event_at_cap", "at_cap_ratio", "at_cap_growth"):
        assert report[key] > 0
    assert isinstance(report["within_bounds"], bool)
    assert "--window" in CliRunner().invoke(main, ["bench", "dedup", "--help"]).output
