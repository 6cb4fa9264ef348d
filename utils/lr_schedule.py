"""The learning rate of each epoch: step decay, cosine, or cosine with warm restarts.

A function of the epoch alone, so a resumed run finds its rate and the state is plain numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch

from utils.config import require_choice
from utils.errors import ConfigError

LR_SCHEDULES = ("step", "cosine")


def check_schedule(optim_cfg: Mapping[str, Any]) -> None:
    """ConfigError for a cfg.optim whose schedule cannot run."""
    require_choice("optim.lr_schedule", optim_cfg["lr_schedule"], LR_SCHEDULES)
    for key in ("init_lr", "lr_step_epochs"):
        if not optim_cfg[key] > 0:
            raise ConfigError(f"optim.{key} must be positive, got {optim_cfg[key]}")
    restart = optim_cfg["cosine"]["restart"]
    if not (len(restart["lr_step"]) == len(restart["lr_period"]) > 0
            and restart["lr_step"][0] == 0 and all(p > 0 for p in restart["lr_period"])):
        raise ConfigError("optim.cosine.restart needs lr_step (starting at 0) and positive "
                          "lr_period of the same length")


def lr_at_epoch(epoch: int, optim_cfg: Mapping[str, Any], epochs: int) -> float:
    """The learning rate of a 0-based epoch."""
    init_lr, min_lr = optim_cfg["init_lr"], optim_cfg["min_lr"]
    if optim_cfg["lr_schedule"] == "step":
        return init_lr * optim_cfg["lr_decay"] ** (epoch // optim_cfg["lr_step_epochs"])
    if optim_cfg["cosine"]["use_restart"]:
        restart = optim_cfg["cosine"]["restart"]
        cycle = max(i for i, start in enumerate(restart["lr_step"]) if start <= epoch)
        progress = min(1.0, (epoch - restart["lr_step"][cycle]) / restart["lr_period"][cycle])
    else:
        progress = epoch / max(1, epochs)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _factor(optim_cfg: Mapping[str, Any], epochs: int, epoch: int) -> float:
    return lr_at_epoch(epoch, optim_cfg, epochs) / optim_cfg["init_lr"]


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Mapping[str, Any],
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A partial, not a callable object: LambdaLR stores such an object's attributes in its
    state, and a checkpoint must hold only tensors and plain values."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             functools.partial(_factor, optim_cfg, epochs))
