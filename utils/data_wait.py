"""How long the training loop waits for its next batch: tells a data-bound run from a compute-bound one.

The time is the host's, spent inside ``next()`` of the batch iterator, and needs no device
synchronisation. On CUDA the loop queues work ahead of the GPU, so when the GPU is the
bottleneck the host waits at the loop's periodic read of the device instead and the data wait
stays near zero. When loading is the bottleneck the host waits here, with nothing queued, and
the GPU idles for as long: the wait's share of the step time is the share the GPU went unfed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class DataWaitTimer(Generic[T]):
    """Iterates over batches, adding the time each ``next()`` took to ``seconds``."""

    def __init__(self, batches: Iterable[T]) -> None:
        self.batches = batches
        self.seconds = 0.0

    def __iter__(self) -> Iterator[T]:
        start = time.perf_counter()
        batches = iter(self.batches)  # may start loader processes: part of the wait
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield batch
            start = time.perf_counter()


def wait_share(wait_seconds: float, seconds: float) -> float:
    """The fraction of seconds spent waiting for data (0 for an empty interval)."""
    return wait_seconds / seconds if seconds > 0 else 0.0
