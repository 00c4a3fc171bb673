"""Repeated log records are collapsed, through a real logger and handler (the formatting is what broke once)."""

from __future__ import annotations

import io
import logging

from dealpulse.agents.log_repeats import RepeatedLogFilter


def test_repeats_are_held_then_summarised_and_other_messages_pass() -> None:
    now = [0.0]
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.log_repeats")
    logger.propagate = False
    logger.addHandler(handler)
    logger.addFilter(RepeatedLogFilter(every_s=30, clock=lambda: now[0]))
    try:
        for second in range(60):  # the broker is down for a minute: the same error every 0.25 s
            now[0] = float(second)
            for _ in range(4):
                logger.error("Unable connect to node with id %s: %s", 111, ConnectionRefusedError(111, "refused"))
        logger.warning("Unable connect to node with id %s: %s", 111, "other error")  # another message: shown
    finally:
        logger.removeHandler(handler)
    assert out.getvalue().splitlines() == [
        "ERROR Unable connect to node with id 111: [Errno 111] refused",
        "ERROR Unable connect to node with id 111: [Errno 111] refused (119 more like it in the last 30 s)",
        "WARNING Unable connect to node with id 111: other error",
    ]
