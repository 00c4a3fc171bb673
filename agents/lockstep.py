"""Run a coroutine so that another thread can never act in the middle of one of its steps.

A coroutine runs as a series of synchronous steps, split at its awaits. Code on its own event loop can only run
between those steps; code on another thread can run at any point. :class:`LockedSteps` holds a lock during each
step, so another thread that takes the same lock acts only between steps, exactly where code on the coroutine's own
loop could have.

Used for aiokafka's ``Fetcher.fetched_records`` on Faust's consumer thread (with ``kafka_consumer_thread``; by
default the consumer runs on the event loop and needs no lock) against Faust's seek on the event loop's thread: a
seek that landed inside a step deleted the records being drained (``KeyError``, the worker exits) or was
overwritten by the position of records fetched before it.
"""

from __future__ import annotations

import threading
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


class LockedSteps:
    """Await ``coro`` holding ``lock`` during each of its steps, never across an await.

    >>> import asyncio, threading
    >>> async def twice(x):
    ...     await asyncio.sleep(0)
    ...     return 2 * x
    >>> lock = threading.Lock()
    >>> asyncio.run(LockedSteps(twice(21), lock).wait())
    42
    >>> lock.locked()
    False
    """

    def __init__(self, coro: Coroutine[Any, Any, T], lock: threading.Lock) -> None:
        self._coro = coro
        self._lock = lock

    async def wait(self) -> T:
        return await self

    def __await__(self) -> Generator[Any, Any, T]:
        coro, lock = self._coro, self._lock
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            with lock:
                try:
                    yielded = coro.send(sent) if thrown is None else coro.throw(thrown)
                except StopIteration as done:
                    return done.value
            sent, thrown = None, None
            try:
                sent = yield yielded  # the coroutine waits here: the lock is free
            except BaseException as exc:  # a cancellation, or an error set on the awaited future
                thrown = exc
