"""The training order and each sample's draws as functions of (seed, epoch, index) alone: the
same batches for any ``data.num_workers``, and a resumed epoch recomputes its order and skips.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import NamedTuple

from torch.utils.data import Dataset, DistributedSampler


class SampleKey(NamedTuple):
    """What a sample's randomness depends on."""

    seed: int
    epoch: int
    index: int


def sample_generator(key: SampleKey) -> random.Random:
    """The sample's own generator. A string seed goes through SHA-512: the same in every process
    and every Python session (a hash of a tuple would vary with PYTHONHASHSEED)."""
    return random.Random(f"{key.seed}/{key.epoch}/{key.index}")


class EpochSampler(DistributedSampler):
    """DistributedSampler's shuffled shard, as ``SampleKey``s. ``set_epoch(epoch, skip)`` leaves
    out the shard's first skip samples (steps done before an interruption), and ``len()`` counts
    the rest. A resumed run sets ``seed`` to its checkpoint's."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = min(max(0, skip), self.num_samples)

    def __iter__(self) -> Iterator[SampleKey]:
        indices = list(super().__iter__())[self.skip:]
        return iter([SampleKey(self.seed, self.epoch, index) for index in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip
