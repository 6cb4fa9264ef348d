"""The run's seed, from which the data order and every augmentation derive (dataset.sampling).

Seeded runs reseed the global generators each epoch: a resume goes on as the uninterrupted run.
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
