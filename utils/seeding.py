"""The run's seed: fixed in seeded runs, drawn afresh (and shared by all processes) otherwise.

The data order and every augmentation derive from it (``dataset.sampling``); seeded runs also
reseed the global generators at each epoch, so a resumed run continues as the uninterrupted
one would.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from utils import distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def run_seed(use_seed: bool, seed: int, device: torch.device) -> int:
    """seed in a seeded run; otherwise a fresh one drawn by rank 0 for every process, so that
    unseeded runs differ from one another yet all processes shuffle alike."""
    if use_seed:
        return int(seed)
    drawn = random.SystemRandom().randrange(2 ** 62) if distributed.get_rank() == 0 else 0
    shared = distributed.all_reduce_sum(torch.tensor(drawn, dtype=torch.int64, device=device))
    return int(shared.item())


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Distinct for every (epoch, rank) pair of jobs with fewer than 10,000 processes."""
    return seed + 10_000 * (epoch + 1) + rank
