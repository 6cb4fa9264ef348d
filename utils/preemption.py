"""Stopping on a signal at a step every process agrees on, and checkpoints by the clock.

Clusters warn a job before they end it (SLURM's SIGTERM, or ``--signal``'s, often SIGUSR1). The
handlers only raise a flag, so a signal never cuts a step or a checkpoint write short. A process
cannot stop alone (its peers would wait for it in the next all-reduce), so all poll at the same
points and get the same answer: see ``Preemption.poll``.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from utils.logger import RunLogger

# A stopped run's exit status, which batch scripts test to requeue the job: sysexits'
# EX_TEMPFAIL, "try again later".
PREEMPTED_EXIT_CODE = 75
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Steps between two polls during training. Starting an all-reduce costs about a tenth of a
# millisecond of the loop's time; once every 16 steps of 5 to 15 ms that is under 0.1 %, and a
# signal still stops the run within 32 steps (well under a second on 8 GPUs).
POLL_EVERY_STEPS = 16


def loader_worker_signals(worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn. Workers ignore SIGUSR1, which a cluster may send to every
    process, to serve batches until training has stopped; SIGTERM, which the DataLoader ends them
    with, gets back its default action instead of the training process's inherited handler."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Preempted(SystemExit):
    """The run stopped on a signal after saving its checkpoint. A SystemExit, so that uncaught
    it ends a process with ``PREEMPTED_EXIT_CODE`` and no traceback."""

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


class Preemption:
    """Signal handlers, and where the run stops or writes a timed checkpoint. Entered before the
    process group exists, so that a signal during start-up stops the run after its first step.
    checkpoint_every_min > 0 asks for a checkpoint that many minutes (by rank 0's clock) after
    the last one or the start; 0 leaves checkpoints to epoch ends."""

    def __init__(self, checkpoint_every_min: float = 0.0, timeout_s: float = 600.0,
                 log: RunLogger | None = None) -> None:
        self.checkpoint_every_s = 60.0 * max(0.0, float(checkpoint_every_min))
        self.timeout_s = timeout_s
        self.log = log
        # Set by the handler. Another thread may wait on it; the main thread must not, as the
        # handler runs there and set() would wait for the lock that Event.wait holds.
        self.requested = threading.Event()
        self.signal_name = ""
        self.validation_polls = 0  # batches that every process's validation shard holds
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._distributed: bool | None = None  # known at the first poll, once the group exists
        self._is_main = True
        self._pending: tuple[torch.Tensor, Any] | None = None  # flags and their all-reduce
        self._last_checkpoint = time.monotonic()
        self._epoch = -1  # the epoch of the last after_step

    def __enter__(self) -> Preemption:
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

    def after_step(self, epoch: int, step: int, steps: int, save: Callable[[], str]) -> None:
        """After step `step` of `steps` (1-based) of a 0-based epoch; save() writes the mid-epoch
        checkpoint, collectively, and returns its path. Polls at an epoch's first step (waiting
        for the answer) and every POLL_EVERY_STEPS steps after it."""
        first_of_epoch = epoch != self._epoch
        self._epoch = epoch
        if not (first_of_epoch or (step - 1) % POLL_EVERY_STEPS == 0):
            return
        # An epoch's end has its own checkpoint.
        decision = self.poll(checkpoints=step < steps, blocking=first_of_epoch)
        if not (decision.stop or decision.checkpoint):
            return
        path = save()
        self._last_checkpoint = time.monotonic()
        if decision.stop:
            self.stop(path, epoch, step, steps)
        if self.log is not None:
            self.log.info(f"Checkpoint at epoch {epoch + 1}, step {step}/{steps}: '{path}'")

    def stop_in_validation(self, batch_index: int) -> bool:
        """Whether to abandon validation after this batch (asked only while every process
        still has batches, so all ask equally often). The first batch waits for the answer,
        so that a signal sent during training's last steps stops the run here."""
        return batch_index < self.validation_polls and \
            self.poll(checkpoints=False, blocking=batch_index == 0).stop

    def after_epoch(self, epoch: int, path: str) -> None:
        """After the checkpoint of 0-based `epoch`: stop if asked. Blocking, so that every
        process also waits for the main process's write."""
        self._last_checkpoint = time.monotonic()
        if self.poll(checkpoints=False, blocking=True).stop:
            self.stop(path, epoch + 1, 0, 0)

    def stop(self, path: str, epoch: int, step: int, steps: int) -> NoReturn:
        """Say where the run stopped and how to resume, and end it with Preempted."""
        where = (f"after epoch {epoch}" if step == 0
                 else f"at epoch {epoch + 1}, step {step}/{steps}")
        message = (f"Stopped by {self.signal_name or 'a signal'} {where}; checkpoint saved in "
                   f"'{path}'. To resume, run the same command with optim.resume_path=auto "
                   f"(exit status {PREEMPTED_EXIT_CODE})")
        if self.log is not None:
            self.log.summary(message)
        raise Preempted(message)

    def poll(self, checkpoints: bool = True, blocking: bool = False) -> Decision:
        """The same Decision in every process (a collective: all call it at the same points),
        from one all-reduce of two flags, "some process saw a signal" and "rank 0's clock says a
        checkpoint is due". It acts on the previous call's flags, long arrived, and sends this
        call's without waiting, so that no loop waits on its slowest peer; the run's first call
        and a blocking one wait for theirs too. checkpoints=False asks about stopping only."""
        first = self._distributed is None
        if first:
            self._join_group()
        previous = self._finish_pending()
        due = (checkpoints and self._is_main and self.checkpoint_every_s > 0
               and not previous[1]  # already agreed on: this step writes it
               and time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s)
        flags = torch.tensor([int(self.requested.is_set()), int(due)], dtype=torch.int32)
        if not self._distributed:
            agreed = flags.tolist()
        elif blocking or first:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
            agreed = [max(a, b) for a, b in zip(previous, flags.tolist())]
        else:
            work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
            self._pending = (flags, work)
            agreed = previous
        stop, checkpoint = (bool(v) for v in agreed)
        if stop and not self.signal_name:
            self.signal_name = "a signal to another process"
        return Decision(stop=stop, checkpoint=checkpoint and checkpoints)

    def _finish_pending(self) -> list[int]:
        """The flags all processes sent at the previous poll ([0, 0] if none is in flight)."""
        if self._pending is None:
            return [0, 0]
        flags, work = self._pending
        self._pending = None
        work.wait()  # long done: it had a whole step to arrive
        return flags.tolist()

    def _join_group(self) -> None:
        """The CPU group the polls reduce over (the first poll is collective, so every process
        creates it at the same point); none in a single process. CPU, since reading an NCCL
        result would make the CPU wait for every queued kernel; a group of its own, so that its
        messages never queue behind the gradients' on a gloo run."""
        self._distributed = dist.is_available() and dist.is_initialized()  # one process too
        if self._distributed:
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
            self._is_main = dist.get_rank() == 0
