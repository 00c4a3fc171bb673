"""The garbage-collector settings a worker runs with, in one place: the worker applies them for its lifetime, and
``bench score`` runs its framework-free loop under them too, so both sides of the ratio collect alike."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

# Full collections (~30 ms each in a worker) ran every ~1.3 s: objects waiting for a store write outlive young
# collections. Young ones still run as usual; a full one now waits for 1000 of the middle generation's (every
# ~15-25 s under load). bench score p99 at half rate: 52-67 ms before, 45-48 ms after (measured, 4 runs).
FULL_COLLECTION_THRESHOLD = 1000


def tune_for_worker() -> None:
    """Freeze what is alive now and make full collections rare.

    Objects alive at start-up (modules, Faust, River) live as long as the process: frozen, full collections skip
    them (a full collection took ~100 ms every few seconds without, measured: the scoring latency tail).
    """
    gc.collect()
    gc.freeze()
    young, middle, _full = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)


@contextmanager
def collections_deferred() -> Iterator[None]:
    """No garbage collection inside the block; the first allocation after it collects as usual.

    A batch makes many objects that live for the batch only (decoded states, scores, feature snapshots). Collected
    every 700 allocations, each of them was traversed once or twice before the batch freed it; deferred, reference
    counting frees them first and the collection sees only what outlives the batch.

    >>> with collections_deferred():
    ...     gc.isenabled()
    False
    >>> gc.isenabled()
    True
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def worker_gc() -> Iterator[None]:
    """Run a block under the worker's settings, then put the previous ones back.

    >>> before = gc.get_threshold()
    >>> with worker_gc():
    ...     gc.get_threshold()[2] == FULL_COLLECTION_THRESHOLD
    True
    >>> gc.get_threshold() == before
    True
    """
    thresholds = gc.get_threshold()
    tune_for_worker()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
