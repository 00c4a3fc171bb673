"""The switch-interval policy: behind means the waiting messages would take longer than the threshold."""

from __future__ import annotations

from dealpulse.agents.switching import SwitchIntervalPolicy, consumer_lag


def policy() -> SwitchIntervalPolicy:
    return SwitchIntervalPolicy(live_s=0.005, backlog_s=0.05, backlog_after_s=1.0)


def test_the_threshold_is_work_queued_not_messages() -> None:
    slow, fast = policy(), policy()
    slow.after_batch(messages=10, seconds=0.1, lag_messages=0)  # 10 ms per message
    fast.after_batch(messages=10, seconds=0.001, lag_messages=0)  # 0.1 ms per message
    assert slow.after_batch(10, 0.1, lag_messages=200) == 0.05  # 2 s of work waiting
    assert fast.after_batch(10, 0.001, lag_messages=200) == 0.005  # 20 ms of work waiting


def test_the_speed_estimate_follows_recent_batches() -> None:
    p = policy()
    p.after_batch(messages=100, seconds=1.0, lag_messages=0)
    for _ in range(40):
        p.after_batch(messages=100, seconds=0.1, lag_messages=0)
    assert p.seconds_per_message is not None and abs(p.seconds_per_message - 0.001) < 1e-5


def test_an_empty_batch_keeps_the_estimate_and_no_estimate_means_live() -> None:
    p = policy()
    assert p.after_batch(messages=0, seconds=0.5, lag_messages=10_000) == 0.005  # nothing measured yet
    assert p.seconds_per_message is None


def test_lag_counts_only_what_lies_past_the_next_offset() -> None:
    highwater = {"a": 100, "b": 50, "c": None}.get
    assert consumer_lag(highwater, [("a", 90), ("b", 60), ("c", 0)]) == 10  # b: read past a stale watermark
