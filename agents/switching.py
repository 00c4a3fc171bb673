"""The worker's GIL switch interval, chosen per batch: short while it keeps up, long while it works off a backlog.

The event loop scores in long CPU-bound stretches; the Kafka consumer, store writer and delivery threads take the
GIL from it at every switch interval. Short hand-offs keep a live stream's latency low; longer ones let a worker
that is behind catch up faster (measured: 50 ms read +9 % events/s, but p99 at half the rate 70-74 ms against
40 ms at Python's 5 ms). A worker is *behind* when the messages already in Kafka for its partitions would take it
longer than ``backlog_after_s`` to process — by then no event reaches a score within the latency target anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

Partition = TypeVar("Partition")
SMOOTHING = 0.2  # weight of the newest batch in the seconds-per-message estimate


@dataclass
class SwitchIntervalPolicy:
    """Picks the switch interval after each batch from the consumer lag and the recent processing speed.

    >>> policy = SwitchIntervalPolicy(live_s=0.005, backlog_s=0.05, backlog_after_s=0.5)
    >>> policy.after_batch(messages=100, seconds=0.1, lag_messages=20)  # 20 x 1 ms queued: keeping up
    0.005
    >>> policy.after_batch(messages=100, seconds=0.1, lag_messages=20_000)  # ~20 s of work queued
    0.05
    >>> policy.after_batch(messages=100, seconds=0.1, lag_messages=0)  # caught up
    0.005
    """

    live_s: float
    backlog_s: float
    backlog_after_s: float
    seconds_per_message: float | None = None

    def after_batch(self, messages: int, seconds: float, lag_messages: int) -> float:
        if messages:
            newest = seconds / messages
            estimate = self.seconds_per_message
            self.seconds_per_message = newest if estimate is None else estimate + SMOOTHING * (newest - estimate)
        queued_s = lag_messages * (self.seconds_per_message or 0.0)
        return self.backlog_s if queued_s > self.backlog_after_s else self.live_s


def consumer_lag(highwater: Callable[[Partition], int | None], next_offsets: Iterable[tuple[Partition, int]]) -> int:
    """Messages in Kafka past ``next_offsets`` ((partition, next offset to read) pairs), by the consumer's view of
    each partition's high watermark (None: not known yet, counted as no lag).

    >>> consumer_lag({"p0": 120, "p1": None}.get, [("p0", 100), ("p1", 7)])
    20
    """
    lag = 0
    for tp, offset in next_offsets:
        end = highwater(tp)
        if end is not None and end > offset:
            lag += end - offset
    return lag
