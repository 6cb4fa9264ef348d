"""Stopping on a signal at an agreed step, and checkpoints by the clock.

Clusters warn a job before they end it: SLURM sends SIGTERM, or the signal asked for with
``--signal`` (often SIGUSR1); spot machines give 30 s to 2 min; torchrun passes SIGTERM on to
its workers; the spawn launcher (``utils.distributed``) passes both on to its processes. The
handlers here only raise a flag, so a signal never interrupts a step or a checkpoint write
half-way, and a second signal changes nothing.

A process that saw a signal cannot stop alone: its peers would wait for it in the next
gradient all-reduce. So every process calls ``StepAgreement.poll()`` at the same points (after
each training step, and between validation batches) and all get the same answer. The answer
comes from one all-reduce of two integers: "some process saw a signal" and "rank 0's clock says
a time-based checkpoint is due" (one clock, so all agree when to checkpoint).

That all-reduce runs on CPU tensors, over a gloo group. A CUDA tensor reduced with NCCL would
have to be copied back to the CPU to be read, which makes the CPU wait for every queued kernel
each step: the stall the training loop is written to avoid. The CPU reduction costs one small
message round trip per step, microseconds on one machine and well under a millisecond between
machines, against steps of a tenth of a second or more.

A stopped run exits with ``PREEMPTED_EXIT_CODE`` (75, sysexits' EX_TEMPFAIL, "try again
later"), which batch scripts test to requeue the job.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def loader_worker_signals(worker_id: int = 0) -> None:
    """For loader workers (a DataLoader worker_init_fn). They ignore SIGUSR1, which a cluster may
    send to every process of a job, so that they keep serving batches until the training process
    has stopped; SIGTERM keeps its default action (a forked worker would otherwise inherit the
    training process's handler), since the DataLoader and multiprocessing end workers with it.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Preempted(SystemExit):
    """The run stopped on a signal after saving its checkpoint.

    A SystemExit, so that a process that does not catch it ends with ``PREEMPTED_EXIT_CODE``
    and no traceback (a spawned process among them).
    """

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Decision:
    """What every process does after the step it polled at."""

    stop: bool = False
    checkpoint: bool = False  # write a mid-epoch checkpoint (always done before stopping)


class StepAgreement:
    """Signal handlers and the per-step agreement; a context manager that installs the handlers,
    as early as possible (before the process group exists): a signal that comes during start-up
    then stops the run after its first step.

    checkpoint_every_min > 0 asks for a checkpoint when that many minutes have passed, by rank
    0's clock, since the last one (or since the start); 0 leaves checkpoints to epoch ends.
    """

    def __init__(self, checkpoint_every_min: float = 0.0) -> None:
        self.checkpoint_every_s = 60.0 * max(0.0, float(checkpoint_every_min))
        self.requested = threading.Event()  # set by the handler; tests may wait on it
        self.signal_name = ""
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._distributed: bool | None = None  # known at the first poll, once the process group exists
        self._is_main = True
        self._last_checkpoint = time.monotonic()

    def __enter__(self) -> StepAgreement:
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested.is_set():
            self.signal_name = signal.Signals(signum).name
        self.requested.set()

    def poll(self, checkpoints: bool = True) -> Decision:
        """The same Decision in every process; a collective, so all must call it at the same points.

        checkpoints=False (during validation) asks about stopping only.
        """
        if self._distributed is None:
            self._join_group()
        due = checkpoints and self._is_main and self.checkpoint_every_s > 0 and \
            time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s
        flags = torch.tensor([int(self.requested.is_set()), int(due)], dtype=torch.int32)
        if self._distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        stop, checkpoint = (bool(v) for v in flags.tolist())
        if stop and not self.signal_name:
            self.signal_name = "a signal to another process"
        return Decision(stop=stop, checkpoint=checkpoint and checkpoints)

    def _join_group(self) -> None:
        """The CPU group the polls reduce over (the first poll is collective, so every process
        creates it at the same point); none in a single process."""
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self._distributed:
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self._is_main = dist.get_rank() == 0

    def checkpoint_written(self) -> None:
        """Restart the clock for the next time-based checkpoint."""
        self._last_checkpoint = time.monotonic()
