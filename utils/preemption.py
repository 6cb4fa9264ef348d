"""Stopping on a signal at an agreed step, and checkpoints by the clock.

Clusters warn a job before they end it: SLURM sends SIGTERM, or the signal asked for with
``--signal`` (often SIGUSR1); spot machines give 30 s to 2 min; torchrun passes SIGTERM on to
its workers; the spawn launcher (``utils.distributed``) passes both on to its processes. The
handlers here only raise a flag, so a signal never interrupts a step or a checkpoint write
half-way, and a second signal changes nothing.

A process that saw a signal cannot stop alone: its peers would wait for it in the next
gradient all-reduce. So every process asks ``Preemption`` at the same points (after each
training step, and between validation batches) and all get the same answer. The answer comes
from one all-reduce of two integers: "some process saw a signal" and "rank 0's clock says a
time-based checkpoint is due" (one clock, so all agree when to checkpoint).

That all-reduce runs on CPU tensors, over a gloo group of its own. A CUDA tensor reduced with
NCCL would have to be copied back to the CPU to be read, which makes the CPU wait for every
queued kernel each step: the stall the training loop is written to avoid. Nor does it block
the loop: training polls every ``POLL_EVERY_STEPS`` steps, each poll starting the all-reduce
of its flags and acting on the previous poll's, whose result has long arrived. Every process
still acts at the same step, and no process's loop waits on its slowest peer here. Only the
first poll of an epoch, of its validation and after its checkpoint wait for their answer,
three round trips an epoch.

A stopped run exits with ``PREEMPTED_EXIT_CODE`` (75, sysexits' EX_TEMPFAIL, "try again
later"), which batch scripts test to requeue the job.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any, Callable, NoReturn, Protocol

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Steps between two polls during training. Starting an all-reduce costs about a tenth of a
# millisecond of the loop's time; once every 16 steps of 5 to 15 ms that is under 0.1 %, and a
# signal still stops the run within 32 steps (well under a second on 8 GPUs).
POLL_EVERY_STEPS = 16


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


class Log(Protocol):
    def info(self, message: str) -> None: ...
    def summary(self, message: str) -> None: ...


class Preemption:
    """Signal handlers, and where the run stops or writes a timed checkpoint.

    A context manager that installs the handlers as early as possible (before the process
    group exists), so that a signal during start-up stops the run after its first step. The
    training loop calls ``after_step`` once per step, ``stop_in_validation`` per validation
    batch and ``after_epoch`` after each epoch-end checkpoint, in every process alike.

    checkpoint_every_min > 0 asks for a checkpoint when that many minutes have passed, by rank
    0's clock, since the last one (or since the start); 0 leaves checkpoints to epoch ends.
    """

    def __init__(self, checkpoint_every_min: float = 0.0, timeout_s: float = 600.0,
                 log: Log | None = None) -> None:
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

    # ------------------------------------------------------------------ the loop's three calls

    def after_step(self, epoch: int, step: int, steps: int, save: Callable[[], str]) -> None:
        """After step `step` of `steps` (1-based) of a 0-based epoch: checkpoint and/or stop.

        save() writes the mid-epoch checkpoint, collectively, and returns its path. Polls at
        an epoch's first step (waiting for the answer) and every POLL_EVERY_STEPS steps after
        it (not waiting): the same steps in every process.
        """
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

    # ------------------------------------------------------------------ the agreement

    def poll(self, checkpoints: bool = True, blocking: bool = False) -> Decision:
        """The same Decision in every process; a collective, so all must call it at the same
        points. It acts on the flags the previous call sent, and sends this call's without
        waiting; the first poll of the run, and one with blocking=True, also wait for this
        call's. checkpoints=False (during validation) asks about stopping only.
        """
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
        creates it at the same point); none in a single process. A group of its own, so that
        its messages never queue behind the gradients' on a gloo run."""
        self._distributed = dist.is_available() and dist.is_initialized()  # one process too
        if self._distributed:
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
            self._is_main = dist.get_rank() == 0
