"""Batch writer: inserts a batch into the events / DLQ / duplicates tables, retrying until the store accepts it.

Each insert carries a dedup token derived from the source positions it holds, so an insert that reached the
store but whose answer was lost is not written twice when retried.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from dealpulse.pipelines.ingest import DLQ_COLUMNS, DUPLICATE_COLUMNS, EVENT_COLUMNS, Batch
from dealpulse.pipelines.scoring import SCORE_COLUMNS
from dealpulse.pipelines.settings import Settings
from dealpulse.pipelines.store.client import Store, connect

log = logging.getLogger(__name__)
T = TypeVar("T")

# (Batch attribute, table, columns): where the rows of a Batch go
_TABLES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("events", "events", EVENT_COLUMNS),
    ("dlq", "dlq", DLQ_COLUMNS),
    ("duplicates", "duplicates", DUPLICATE_COLUMNS),
    ("scores", "scores", SCORE_COLUMNS),
)


def dedup_token(table: str, rows: list[tuple[Any, ...]], columns: tuple[str, ...]) -> str:
    """A token that is the same for the same rows: built from the first and last source positions.

    >>> cols = ("event_id", "src_topic", "src_partition", "src_offset", "src_index")
    >>> rows = [("a", "t", 0, 5, 0), ("b", "t", 0, 9, 1)]
    >>> dedup_token("events", rows, cols) == dedup_token("events", list(rows), cols)
    True
    >>> dedup_token("events", rows, cols) == dedup_token("events", rows[:1], cols)
    False
    """
    at = columns.index("src_topic")
    first, last = rows[0][at : at + 4], rows[-1][at : at + 4]
    digest = hashlib.sha1(repr((first, last, len(rows))).encode()).hexdigest()[:16]
    return f"{table}-{len(rows)}-{digest}"


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, capped; retries until ``should_stop`` says so."""

    initial_s: float = 0.2
    max_s: float = 10.0

    def delays(self) -> Any:
        delay = self.initial_s
        while True:
            yield random.uniform(delay / 2, delay)
            delay = min(delay * 2, self.max_s)


def root_cause(exc: BaseException) -> str:
    """The innermost cause, named: the store client wraps a refused connection in three layers, each repeating a
    300-character URL.

    >>> try:
    ...     try:
    ...         raise ConnectionRefusedError(111, "Connection refused")
    ...     except OSError as refused:
    ...         raise RuntimeError("Error HTTPConnectionPool(...): Max retries exceeded with url: /?…") from refused
    ... except RuntimeError as wrapped:
    ...     root_cause(wrapped)
    'ConnectionRefusedError: [Errno 111] Connection refused'
    """
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def unreachable(exc: BaseException) -> bool:
    """Whether the store could not be reached at all (refused, reset, timed out), as opposed to answering with an
    error (a wrong password, a missing database) that waiting would not fix.

    >>> unreachable(RuntimeError("Max retries exceeded")), unreachable(ConnectionRefusedError(111, "refused"))
    (False, True)
    """
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return isinstance(exc, OSError)


def connect_when_ready(
    settings: Settings, retry: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep
) -> Store:
    """Connect to the store, waiting while it cannot be reached.

    A service started before its store, or while the store is down, waits and says so (one line per attempt)
    instead of exiting with a traceback; an orchestrator would otherwise restart it in a loop. An error the store
    answers with (a wrong password, say) raises at once.
    """
    policy = retry or RetryPolicy(settings.store_retry_initial_s, settings.store_retry_max_s)
    where = f"{settings.clickhouse_host}:{settings.clickhouse_port}"
    for attempt, delay in enumerate(policy.delays(), start=1):
        try:
            return connect(settings)
        except Exception as exc:
            if not unreachable(exc):
                raise
            log.warning("the store at %s cannot be reached (attempt %d, retry in %.1fs): %s",
                        where, attempt, delay, root_cause(exc))  # fmt: skip
            sleep(delay)
    raise AssertionError("unreachable: the delays never end")


class StoreUnavailable(RuntimeError):
    """The store kept failing and the caller asked to stop retrying."""


class BatchWriter:
    """Writes batches, retrying each insert until the store accepts it (or ``should_stop`` says to give up).

    ``on_retry(table, attempt, error)`` and ``on_insert(table, rows, seconds)`` report inserts;
    ``on_read_retry(attempt, error)`` reports the reads done through :meth:`read`.
    """

    def __init__(
        self,
        store: Store,
        retry: RetryPolicy,
        should_stop: Callable[[], bool] = lambda: False,
        on_retry: Callable[[str, int, Exception], None] | None = None,
        on_insert: Callable[[str, int, float], None] | None = None,
        on_read_retry: Callable[[int, Exception], None] | None = None,
    ) -> None:
        self.store = store
        self.retry = retry
        self.should_stop = should_stop
        self.on_retry = on_retry
        self.on_insert = on_insert  # (table, rows, seconds) after each accepted insert
        self.on_read_retry = on_read_retry

    def write(self, batch: Batch) -> None:
        for name, table, columns in _TABLES:
            rows: list[tuple[Any, ...]] = getattr(batch, name)
            if rows:
                self._insert_with_retry(table, rows, columns)

    def read(self, what: str, action: Callable[[Store], T]) -> T:
        """``action(store)``, retried like an insert: a worker that cannot read its state waits for the store.

        >>> from unittest import mock
        >>> flaky = mock.Mock(side_effect=[ConnectionError("down"), 42])
        >>> BatchWriter(mock.Mock(), RetryPolicy(0.001, 0.001)).read("the answer", flaky)
        42
        """
        return self._retrying(f"reading {what}", lambda: action(self.store), self.on_read_retry)

    def _insert_with_retry(self, table: str, rows: list[tuple[Any, ...]], columns: tuple[str, ...]) -> None:
        token = dedup_token(table, rows, columns)

        def insert() -> None:
            started = time.perf_counter()
            self.store.insert(table, rows, columns, dedup_token=token)
            if self.on_insert:
                self.on_insert(table, len(rows), time.perf_counter() - started)

        on_retry = self.on_retry
        report = (lambda attempt, exc: on_retry(table, attempt, exc)) if on_retry else None
        self._retrying(f"insert into {table}", insert, report)

    def _retrying(self, what: str, action: Callable[[], T], report: Callable[[int, Exception], None] | None) -> T:
        for attempt, delay in enumerate(self.retry.delays(), start=1):
            try:
                return action()
            except Exception as exc:  # any store/network error: retry, never skip
                if report:
                    report(attempt, exc)
                if self.should_stop():
                    raise StoreUnavailable(f"{what} failed {attempt} times: {exc}") from exc
                log.warning("%s failed (attempt %d, retry in %.1fs): %s", what, attempt, delay, root_cause(exc))
                self._sleep_unless_stopped(delay)
        raise AssertionError("unreachable: the delays never end")

    def _sleep_unless_stopped(self, seconds: float) -> None:
        """Back off, but cut it short when asked to stop: a stopping worker must not wait out a 10 s backoff (the
        next attempt then is the last one)."""
        deadline = time.monotonic() + seconds
        while not self.should_stop() and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


def load_partition_state(
    store: Store, topic: str, partition: int, from_offset: int, window_hours: float
) -> tuple[list[str], set[tuple[int, int]]]:
    """What a worker needs when it gains a partition: recent event ids, and positions already written."""
    params = {"topic": topic, "partition": partition, "offset": from_offset}
    ids = store.query_rows(
        "SELECT event_id FROM events WHERE src_topic = {topic:String} AND src_partition = {partition:UInt16} "
        f"AND ingested_at >= now64(3) - toIntervalSecond({int(window_hours * 3600)}) ORDER BY ingested_at",
        params,
    )
    where = "src_topic = {topic:String} AND src_partition = {partition:UInt16} AND src_offset >= {offset:UInt64}"
    positions = store.query_rows(
        f"SELECT src_offset, toInt32(src_index) FROM events WHERE {where} "
        f"UNION ALL SELECT src_offset, src_index FROM dlq WHERE {where} "
        f"UNION ALL SELECT src_offset, toInt32(src_index) FROM duplicates WHERE {where}",
        params,
    )
    return [row[0] for row in ids], {(int(row[0]), int(row[1])) for row in positions}


def accounting(store: Store) -> dict[str, int]:
    """The three counts every item ends in: stored, DLQ, duplicate-dropped."""
    row = store.query_rows("SELECT events_stored, dlq, duplicates_dropped FROM ingest_accounting")[0]
    return {"events_stored": int(row[0]), "dlq": int(row[1]), "duplicates_dropped": int(row[2])}
