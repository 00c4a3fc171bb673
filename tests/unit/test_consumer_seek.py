"""Seeks run on the Kafka consumer's own thread, between its steps: aiokafka is not thread-safe, and a seek from the
event loop's thread that landed inside its ``fetched_records`` crashed a worker (KeyError)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from dealpulse.agents.app import _consumer_transport


@contextmanager
def consumer_thread_running(seek: Callable[[Any, int], None]) -> Iterator[Any]:
    """The consumer thread class with only its loop (running in a thread of its own) and ``seek``."""
    thread_class = _consumer_transport(wait_ms=50, gapless_topic="events").Consumer.thread_class
    consumer_thread: Any = object.__new__(thread_class)
    consumer_thread.thread_loop = asyncio.new_event_loop()
    consumer_thread.seek = seek
    runner = threading.Thread(target=consumer_thread.thread_loop.run_forever, daemon=True)
    runner.start()
    try:
        yield consumer_thread
    finally:
        consumer_thread.thread_loop.call_soon_threadsafe(consumer_thread.thread_loop.stop)
        runner.join(5)
        consumer_thread.thread_loop.close()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_seek_waits_for_the_consumer_threads_step_in_progress_and_runs_on_that_thread() -> None:
    happened: list[tuple[str, int]] = []

    def one_step() -> None:  # like fetched_records: a synchronous loop that gives up the GIL now and then
        happened.append(("step begins", threading.get_ident()))
        for _ in range(20):
            time.sleep(0.005)
        happened.append(("step ends", threading.get_ident()))

    with consumer_thread_running(lambda tp, offset: happened.append((f"seek {offset}", threading.get_ident()))) as ct:
        ct.thread_loop.call_soon_threadsafe(one_step)
        wait_until(lambda: bool(happened))
        time.sleep(0.02)  # well inside the step
        ct.seek_between_steps(("events", 0), 42)  # returns at once: the caller's loop never waits on the thread
        wait_until(lambda: len(happened) == 3)
        thread = ct.thread_loop._thread_id

    assert [what for what, _ in happened] == ["step begins", "step ends", "seek 42"]
    assert {ident for _, ident in happened} == {thread}


def test_a_seek_that_fails_is_logged_with_the_partition(caplog: pytest.LogCaptureFixture) -> None:
    def seek(tp: Any, offset: int) -> None:
        raise ValueError(f"partition {tp} is not assigned")

    with consumer_thread_running(seek) as ct:
        ct.seek_between_steps(("events", 3), 7)
        wait_until(lambda: any("seek to 7 failed" in r.getMessage() for r in caplog.records))
    failed = next(r for r in caplog.records if "seek to 7 failed" in r.getMessage())
    assert "('events', 3)" in failed.getMessage() and failed.exc_info is not None
