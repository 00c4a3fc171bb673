"""LockedSteps: another thread taking the lock acts only between the coroutine's steps."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dealpulse.agents.lockstep import LockedSteps


async def _two_steps(inside: threading.Event, state: dict[str, bool]) -> str:
    state["in_step"] = True
    inside.set()  # the other thread now tries to act
    time.sleep(0.1)  # still inside the first step
    state["in_step"] = False
    await asyncio.sleep(0)
    return "done"


def _seen_by_other_thread(wrap: bool) -> tuple[bool, str]:
    lock = threading.Lock()
    inside = threading.Event()
    state = {"in_step": False}
    seen: list[bool] = []

    def other_thread() -> None:
        inside.wait(5)
        with lock:
            seen.append(state["in_step"])

    thread = threading.Thread(target=other_thread)
    thread.start()
    coro = _two_steps(inside, state)
    result = asyncio.run(LockedSteps(coro, lock).wait() if wrap else coro)
    thread.join(5)
    return seen[0], result


def test_another_thread_acts_only_between_steps() -> None:
    assert _seen_by_other_thread(wrap=True) == (False, "done")


def test_without_it_the_other_thread_lands_inside_a_step() -> None:
    # the control: shows the test above would catch a lock that is not held during the step
    assert _seen_by_other_thread(wrap=False) == (True, "done")


def test_errors_and_cancellation_reach_the_coroutine_and_free_the_lock() -> None:
    lock = threading.Lock()
    cleaned: list[str] = []

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("finally ran")

    async def main() -> None:
        task = asyncio.ensure_future(LockedSteps(waits_forever(), lock).wait())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert cleaned == ["finally ran"]
    assert not lock.locked()

    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("from the coroutine")

    with pytest.raises(ValueError, match="from the coroutine"):
        asyncio.run(LockedSteps(fails(), lock).wait())
    assert not lock.locked()
