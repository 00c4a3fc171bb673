"""The batch writer's retry loop (the store is a mock: this is about the loop, not about ClickHouse)."""

from __future__ import annotations

import threading
import time
from unittest import mock

import pytest

from dealpulse.agents.embedded import free_port
from dealpulse.pipelines.ingest import Batch
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.writer import BatchWriter, RetryPolicy, StoreUnavailable, connect_when_ready


def test_a_stop_request_cuts_a_long_backoff_short() -> None:
    store = mock.Mock()
    store.insert.side_effect = ConnectionError("store down")
    stop = threading.Event()
    writer = BatchWriter(store, RetryPolicy(initial_s=30, max_s=30), should_stop=stop.is_set)
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="insert into events failed 2 times: store down"):
        writer.write(Batch(events=[("row",)]))
    assert time.monotonic() - started < 5, "the writer waited out its 15-30 s backoff"


def test_reads_are_retried_and_reported_until_the_store_answers() -> None:
    reported: list[int] = []
    answers = mock.Mock(side_effect=[ConnectionError("down"), ConnectionError("down"), "positions"])
    writer = BatchWriter(
        mock.Mock(), RetryPolicy(0.001, 0.001), on_read_retry=lambda attempt, exc: reported.append(attempt)
    )
    assert writer.read("stored positions", answers) == "positions"
    assert reported == [1, 2]


def test_connecting_waits_for_a_store_that_cannot_be_reached_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    class GaveUp(Exception):
        pass

    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the third backoff ends the test
        slept.append(seconds)
        if len(slept) == 3:
            raise GaveUp

    settings = Settings(clickhouse_port=free_port())  # nothing listens there
    with pytest.raises(GaveUp):
        connect_when_ready(settings, RetryPolicy(0.01, 0.04), sleep=sleep)
    assert len(slept) == 3 and all(0 < s <= 0.04 for s in slept)
    waiting = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(waiting) == 3
    assert f"the store at 127.0.0.1:{settings.clickhouse_port} cannot be reached (attempt 1" in waiting[0]
    assert "ConnectionRefusedError" in waiting[0]
