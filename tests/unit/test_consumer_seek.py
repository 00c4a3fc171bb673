"""Seeks run on the Kafka consumer's own thread, between its steps: aiokafka is not thread-safe, and a seek from the
event loop's thread that landed inside its ``fetched_records`` crashed a worker (KeyError)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from dealpulse.agents.app import _consumer_transport


def test_a_seek_waits_for_the_consumer_threads_step_in_progress_and_runs_on_that_thread() -> None:
    thread_class = _consumer_transport(wait_ms=50, gapless_topic="events").Consumer.thread_class
    consumer_thread: Any = object.__new__(thread_class)  # only its loop and seek matter here
    consumer_thread.thread_loop = asyncio.new_event_loop()
    happened: list[tuple[str, int]] = []
    consumer_thread.seek = lambda tp, offset: happened.append((f"seek {offset}", threading.get_ident()))

    def one_step() -> None:  # like fetched_records: a synchronous loop that gives up the GIL now and then
        happened.append(("step begins", threading.get_ident()))
        for _ in range(20):
            time.sleep(0.005)
        happened.append(("step ends", threading.get_ident()))

    step_started = threading.Event()
    consumer_thread.thread_loop.call_soon(step_started.set)
    consumer_thread.thread_loop.call_soon(one_step)
    runner = threading.Thread(target=consumer_thread.thread_loop.run_forever, daemon=True)
    runner.start()
    try:
        step_started.wait(5)
        time.sleep(0.02)  # well inside the step
        asyncio.run(consumer_thread.seek_between_steps(("events", 0), 42))
    finally:
        consumer_thread.thread_loop.call_soon_threadsafe(consumer_thread.thread_loop.stop)
        runner.join(5)
        consumer_thread.thread_loop.close()

    assert [what for what, _ in happened] == ["step begins", "step ends", "seek 42"]
    assert {thread for _, thread in happened} == {runner.ident}


def test_a_seek_that_fails_raises_in_the_caller() -> None:
    thread_class = _consumer_transport(wait_ms=50, gapless_topic="events").Consumer.thread_class
    consumer_thread: Any = object.__new__(thread_class)
    consumer_thread.thread_loop = asyncio.new_event_loop()

    def seek(tp: Any, offset: int) -> None:
        raise ValueError(f"partition {tp} is not assigned")

    consumer_thread.seek = seek
    runner = threading.Thread(target=consumer_thread.thread_loop.run_forever, daemon=True)
    runner.start()
    try:
        with pytest.raises(ValueError, match="is not assigned"):
            asyncio.run(consumer_thread.seek_between_steps(("events", 3), 7))
    finally:
        consumer_thread.thread_loop.call_soon_threadsafe(consumer_thread.thread_loop.stop)
        runner.join(5)
        consumer_thread.thread_loop.close()
