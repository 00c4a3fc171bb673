"""Collapse log records that repeat: a client that cannot reach Kafka says the same thing dozens of times a second.

Measured: a worker whose broker was down logged ~80 lines/s from aiokafka ("Unable connect to node …", "Unable to
update metadata …", "Failed fetch messages …"), 36 MB an hour; a stray worker once wrote 101 MB. The first record
of each kind still shows at once, so an outage is visible when it starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

RepeatKey = tuple[str, int, str]  # (logger, level, the message as logged)


class RepeatedLogFilter(logging.Filter):
    """Pass the first record of each kind, then at most one every ``every_s`` seconds that says how many were held.

    >>> now = [0.0]
    >>> repeats = RepeatedLogFilter(every_s=30, clock=lambda: now[0])
    >>> record = lambda: logging.LogRecord("aiokafka", logging.ERROR, "", 0, "node %s down", (1,), None)
    >>> [repeats.filter(record()) for _ in range(3)]
    [True, False, False]
    >>> now[0] = 31.0
    >>> again = record()
    >>> repeats.filter(again), again.getMessage()
    (True, 'node 1 down (2 more like it in the last 31 s)')
    """

    MAX_KINDS = 1000  # kinds remembered; past this, kinds not seen for ``every_s`` are forgotten

    def __init__(self, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._shown_at: dict[RepeatKey, float] = {}
        self._held: dict[RepeatKey, int] = {}
        self._lock = threading.Lock()  # aiokafka logs from Faust's consumer thread as well as the event loop

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        now = self.clock()
        with self._lock:
            shown_at = self._shown_at.get(key)
            if shown_at is not None and now - shown_at < self.every_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            held = self._held.pop(key, 0)
            self._shown_at[key] = now
            if len(self._shown_at) > self.MAX_KINDS:
                self._forget_before(now - self.every_s)
        if held and shown_at is not None:
            record.msg = f"{record.getMessage()} ({held} more like it in the last {now - shown_at:.0f} s)"
            record.args = ()  # mode's formatter reads args as a tuple
        return True

    def _forget_before(self, moment: float) -> None:
        for key in [key for key, at in self._shown_at.items() if at < moment]:
            del self._shown_at[key]
            self._held.pop(key, None)


def collapse_repeated_logs(prefixes: Iterable[str], every_s: float = 30.0) -> RepeatedLogFilter:
    """Attach one :class:`RepeatedLogFilter` to every logger whose name starts with one of ``prefixes``.

    A logger's filters see only the records logged to it (not its children's), so each is attached to; call this
    after the libraries are imported, when their loggers exist.
    """
    repeats = RepeatedLogFilter(every_s)
    prefixes = tuple(prefixes)
    names = [name for name in logging.root.manager.loggerDict if name.startswith(prefixes)]
    for name in {*names, *prefixes}:
        logging.getLogger(name).addFilter(repeats)
    return repeats
