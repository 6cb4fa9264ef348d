"""Checkpoints: atomic saving, safe loading, and the random-number state a resumed run needs.

A kill at any moment leaves the previous or the new complete file. Only tensors, plain containers,
numbers and strings are stored, so ``weights_only=True`` loading runs no pickled code.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from utils.device import load_optimizer_state
from utils.errors import ConfigError, DataError, first_line
from utils.files import atomic_copy, atomic_write, low_space_warning

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"


class _ByteCounter(io.RawIOBase):
    """A write-only sink that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        self.count += size
        return size


def saved_size(obj: Any) -> int:
    """The bytes torch.save writes for obj, found by saving it into a counter (no disk)."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.count


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically; a full disk is a ConfigError saying how many bytes it needed."""
    with atomic_write(path, needed=lambda: saved_size(obj)) as f:
        torch.save(obj, f)


def checkpoint_space_warning(output_dir: str, model: torch.nn.Module) -> str | None:
    """A warning when output_dir has no room for two checkpoints (the best and the latest), each
    the weights, the buffers and SGD's momentum."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return low_space_warning(output_dir, 2 * (weights + momentum), "two checkpoints")


def save_checkpoint(state: Mapping[str, Any], output_dir: str, is_best: bool) -> str:
    """The best file, when is_best, goes first: a crash between the two writes leaves the previous
    checkpoint, whose resume trains this epoch again, never one naming a best never saved."""
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    if is_best:
        best_path = os.path.join(output_dir, BEST_NAME)
        atomic_save(dict(state), best_path)
        atomic_copy(best_path, path)
    else:
        atomic_save(dict(state), path)
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``weights_only=True``; one-line errors for a bad file."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint '{path}' not found; check the path (or train first)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError) as exc:
        raise DataError(f"cannot read checkpoint '{path}' ({first_line(exc)}); it may be truncated "
                        f"or not a PyTorch file: point to a complete one") from None
    if not isinstance(obj, Mapping):
        raise DataError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of tensors")
    return dict(obj)


def resolve_resume_path(if_resume: bool, resume_path: str, output_dir: str) -> str | None:
    """The checkpoint to resume from, or None to start afresh: ``resume_path`` decides ('auto'
    lets a preempted job be relaunched unchanged). The original's ``if_resume`` only insists
    on a resume_path."""
    if not resume_path:
        if if_resume:
            raise ConfigError("optim.if_resume=True needs optim.resume_path=<checkpoint file> "
                              "(or optim.resume_path=auto)")
        return None
    if resume_path == "auto":
        candidate = os.path.join(output_dir, CHECKPOINT_NAME)
        return candidate if os.path.isfile(candidate) else None
    if not os.path.isfile(resume_path):
        raise DataError(f"resume checkpoint '{resume_path}' not found; fix optim.resume_path "
                        f"or use optim.resume_path=auto")
    return resume_path


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's generators, as tensors and plain numbers."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():  # 0 without CUDA
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Progress:
    """Where training stands: what a checkpoint carries besides weights and optimizer state."""

    epochs_done: int = 0
    best_top1_err: float = math.inf
    best_top5_err: float = math.inf  # at the epoch of the best top-1, as the original reports it
    best_epoch: int = 0
    step: int = 0  # steps done in the next epoch (0 at an epoch's end)
    seed: int = 0  # the run's seed: the data order and every augmentation come from it
    epoch_sums: tuple[tuple[float, ...], ...] = ()  # each process's running sums at that step

    def sums_of_rank(self, rank: int, world_size: int) -> list[float]:
        """A process's saved running sums (StepMeter reads missing ones as 0). Under another
        process count rank 0 takes the totals: the epoch's metrics stay right, though its
        batches are then not exactly the interrupted run's."""
        if len(self.epoch_sums) == world_size:
            return list(self.epoch_sums[rank])
        return [sum(column) for column in zip(*self.epoch_sums)] if rank == 0 else []


def training_checkpoint(student: torch.nn.Module, arch: str, optimizer: torch.optim.Optimizer,
                        scheduler: Any, scaler: torch.amp.GradScaler, progress: Progress,
                        config: Mapping[str, Any]) -> dict[str, Any]:
    """The original's layout (weights under 'state_dict'), plus all that a resume needs."""
    return {"state_dict": student.state_dict(), "arch": arch, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": progress.epochs_done, "best_top1_err": progress.best_top1_err,
            "best_top5_err": progress.best_top5_err, "best_epoch": progress.best_epoch,
            "step": progress.step, "seed": progress.seed,
            "epoch_sums": torch.tensor(progress.epoch_sums, dtype=torch.float64),
            "config": dict(config), "rng": capture_rng_state()}


def restore_training(checkpoint: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                     scheduler: Any, scaler: torch.amp.GradScaler, restore_rng: bool) -> Progress:
    """Load all but the weights (the caller's to load); returns where training stood."""
    load_optimizer_state(optimizer, checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    # An empty scaler state comes from a bf16 or full-precision run: an fp16 resume starts afresh.
    if scaler.is_enabled() and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    if restore_rng:
        restore_rng_state(checkpoint["rng"])
    sums = checkpoint.get("epoch_sums")
    return Progress(int(checkpoint["epoch"]), float(checkpoint["best_top1_err"]),
                    float(checkpoint["best_top5_err"]), int(checkpoint.get("best_epoch", 0)),
                    int(checkpoint.get("step", 0)), int(checkpoint.get("seed", 0)),
                    tuple(map(tuple, sums.tolist())) if sums is not None else ())
