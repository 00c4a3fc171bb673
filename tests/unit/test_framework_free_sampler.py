"""The framework-free loop measured while a worker runs: bursts in a process of its own, counted in CPU time."""

from __future__ import annotations

import time
from pathlib import Path

from dealpulse.agents.bench import FrameworkFreeSampler, framework_free_score_rate, spread_sample
from dealpulse.pipelines.generator import generate_world, pack_messages


def test_sampler_counts_bursts_in_cpu_time_and_stops(tmp_path: Path) -> None:
    messages = spread_sample(list(pack_messages(generate_world(3, 60_000).records(), 100)), 30_000)
    with FrameworkFreeSampler(messages, tmp_path) as sampler:
        deadline = time.monotonic() + 60
        while sampler.events() < 2_000 and time.monotonic() < deadline:  # a few bursts after the spawn
            time.sleep(0.2)
        events, cpu = sampler.events(), sampler.cpu_seconds()
    assert events >= 2_000 and cpu > 0
    # the bursts run the same loop as the before/after measurement: same order of magnitude of events per second
    rate, _ = framework_free_score_rate(messages)
    assert rate / 5 < events / cpu < rate * 5
    assert not list(tmp_path.iterdir())  # its message file is removed
    stopped_at = sampler.events()
    time.sleep(1.5)
    assert sampler.events() == stopped_at  # no burst after the exit
