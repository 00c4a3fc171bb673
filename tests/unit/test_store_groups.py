"""Store groups follow the writer: a group whose time is up waits for a busy writer instead of queueing behind it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from dealpulse.agents.app import IngestService, StoreGroup
from dealpulse.agents.metrics import IngestMetrics
from dealpulse.pipelines.ingest import Batch
from dealpulse.pipelines.settings import Settings


class GatedWriter:
    """Records each write's row count; a write waits until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.written: list[int] = []

    def write(self, batch: Batch) -> None:
        self.started.set()
        self.gate.wait(10)
        self.written.append(len(batch.events))


def service_with(writer: GatedWriter) -> IngestService:
    settings = Settings(metrics_enabled=False, store_flush_seconds=0.05)
    service = IngestService(settings, store=None, metrics=IngestMetrics())  # type: ignore[arg-type]
    service.writer = writer  # type: ignore[assignment]
    return service


def add_rows(service: IngestService, rows: int) -> None:
    """Add a processed batch of ``rows`` events to the open group, opening one (and its timer) if needed."""

    async def ack(_event: Any) -> None:
        return None

    if service._open is None:
        service._open = StoreGroup(ack)
        asyncio.get_running_loop().call_later(
            service.settings.store_flush_seconds, service._close_when_writer_free, service._open
        )
    batch = Batch(events=[("row",)] * rows)
    service._open.add(1, [], batch, {}, [])


def test_a_group_whose_time_is_up_closes_at_once_when_the_writer_is_free() -> None:
    async def scenario() -> list[int]:
        writer = GatedWriter()
        writer.gate.set()
        service = service_with(writer)
        add_rows(service, 3)
        await asyncio.sleep(0.2)  # the timer fired: the group was written without anything else happening
        assert service._open is None
        await service.drain()
        return writer.written

    assert asyncio.run(scenario()) == [3]


def test_while_the_writer_is_busy_the_open_group_grows_and_closes_when_it_finishes() -> None:
    async def scenario() -> tuple[list[int], bool]:
        writer = GatedWriter()
        service = service_with(writer)
        add_rows(service, 5)
        await asyncio.get_running_loop().run_in_executor(None, writer.started.wait, 5)  # group 1 is being written
        add_rows(service, 2)  # group 2 opens; its timer fires while group 1 is still being written
        await asyncio.sleep(0.2)
        still_open = service._open is not None and service._open.due
        add_rows(service, 4)  # joins group 2 rather than starting a third
        writer.gate.set()
        for _ in range(100):  # group 2 closes by itself once group 1 is stored
            if service._open is None and not any(not f.done() for f in service._in_flight):
                break
            await asyncio.sleep(0.02)
        return writer.written, still_open

    written, was_waiting = asyncio.run(scenario())
    assert was_waiting
    assert written == [5, 6]
