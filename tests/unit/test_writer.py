"""The batch writer's retry loop (the store is a mock: this is about the loop, not about ClickHouse)."""

from __future__ import annotations

import threading
import time
from unittest import mock

import pytest

from dealpulse.pipelines.ingest import Batch
from dealpulse.pipelines.store.writer import BatchWriter, RetryPolicy, StoreUnavailable


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
