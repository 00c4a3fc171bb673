"""DeliveryTally: the changelog records of a store group, counted together instead of a future each."""

from __future__ import annotations

import asyncio

import pytest
from confluent_kafka import KafkaError, KafkaException

from dealpulse.agents.output import DeliveryTally, _resolve_all


def test_wait_returns_once_every_record_sent_is_acknowledged_with_the_highest_offset_per_partition() -> None:
    async def scenario() -> tuple[dict[tuple[str, int], int], list[str]]:
        tally = DeliveryTally(asyncio.get_running_loop())
        tally.sent = 3
        seen: list[str] = []
        waiting = asyncio.ensure_future(tally.wait())
        waiting.add_done_callback(lambda _done: seen.append("done"))
        # deliveries arrive as the poller hands them over: in batches, possibly out of partition order
        _resolve_all([(tally, None, ("leads-changelog", 1, 41)), (tally, None, ("leads-changelog", 0, 7))])
        await asyncio.sleep(0)
        assert not waiting.done()  # one record still unacknowledged
        _resolve_all([(tally, None, ("leads-changelog", 1, 40))])
        offsets = await waiting
        tally.sent += 1  # a second phase (the end markers): wait again for what was sent since
        again = asyncio.ensure_future(tally.wait())
        await asyncio.sleep(0)
        assert not again.done()
        _resolve_all([(tally, None, ("accounts-changelog", 1, 3))])
        return {**offsets, **(await again)}, seen

    offsets, seen = asyncio.run(scenario())
    assert offsets == {
        (
            "leads-changelog",
            0,
        ): 7,
        ("leads-changelog", 1): 41,
        ("accounts-changelog", 1): 3,
    }
    assert seen == ["done"]


def test_a_failed_delivery_fails_the_wait_without_waiting_for_the_rest() -> None:
    async def scenario() -> None:
        tally = DeliveryTally(asyncio.get_running_loop())
        tally.sent = 5
        waiting = asyncio.ensure_future(tally.wait())
        _resolve_all([(tally, KafkaError(KafkaError._MSG_TIMED_OUT), ("leads-changelog", 0, -1))])
        await waiting

    with pytest.raises(KafkaException):
        asyncio.run(scenario())


def test_nothing_sent_is_nothing_to_wait_for() -> None:
    async def scenario() -> dict[tuple[str, int], int]:
        return await DeliveryTally(asyncio.get_running_loop()).wait()

    assert asyncio.run(scenario()) == {}
