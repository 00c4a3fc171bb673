"""OnParentLoop: a mode ServiceThread (Faust's consumer "thread") served on its parent's event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from mode.threads import ServiceThread

from dealpulse.agents.app import OnParentLoop


class Probe(ServiceThread):
    """Records the thread its start and stop hooks ran on, and the tasks it saw cancelled."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.started_on: int | None = None
        self.stopped_on: int | None = None

    async def on_thread_started(self) -> None:
        self.started_on = threading.get_ident()

    async def on_thread_stop(self) -> None:
        self.stopped_on = threading.get_ident()

    async def _gather_remaining_tasks(self) -> None:
        pass  # as ConsumerThread on the parent loop: mode's sweep would cancel the parent's own tasks


def test_a_service_thread_on_the_parent_loop_starts_and_stops_there_without_a_thread() -> None:
    async def scenario() -> tuple[Probe, bool, bool, int]:
        loop = asyncio.get_running_loop()
        neighbour = asyncio.ensure_future(asyncio.sleep(3600))  # another task of the app: must survive the stop
        threads_before = threading.active_count()
        probe = Probe(loop=loop, thread_loop=loop, Worker=OnParentLoop)
        await asyncio.wait_for(probe.start(), 5)
        threads_during = threading.active_count()
        serving = probe._thread
        assert isinstance(serving, OnParentLoop) and serving.is_alive()
        await asyncio.wait_for(probe.stop(), 5)
        assert serving.serving is not None
        await asyncio.wait_for(serving.serving, 5)  # the service's task ends once it has stopped
        survived = not neighbour.cancelled()
        neighbour.cancel()
        return probe, serving.is_alive(), survived, threads_during - threads_before

    probe, still_serving, neighbour_survived, extra_threads = asyncio.run(scenario())
    main = threading.get_ident()
    assert (probe.started_on, probe.stopped_on) == (main, main)
    assert extra_threads == 0
    assert not still_serving
    assert neighbour_survived
