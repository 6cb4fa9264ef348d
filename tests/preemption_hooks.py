"""Signals sent at exact points of a training run, from inside it (imported by spawned processes).

``run(plan, proc, cfg, loss)`` stands in for ``train_with_distillation.run_process``. In process 0
it sends SIGUSR1 to the launcher, which passes it on to every process, at the point the plan names,
and waits until its own handler has seen the signal: the run then stops at that very point, not at
whatever point the signal happens to reach it.

Plans: ``("step", epoch, step)``, when the log line of that (1-based) step is written (needs
print_freq=1); ``("checkpoint_write",)``, in the middle of the next epoch-end checkpoint's
write, followed by a second signal before the write completes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any

import train_with_distillation
from tests.signal_wait import wait_for_signal
from utils import checkpoint as checkpoint_module
from utils.logger import RunLogger
from utils.preemption import Preemption

WAIT_S = 60.0


def agreement() -> Preemption:
    """The Preemption whose handler is installed in this process."""
    return signal.getsignal(signal.SIGUSR1).__self__


def signal_launcher_and_wait() -> None:
    os.kill(multiprocessing.parent_process().pid, signal.SIGUSR1)  # the launcher
    if not wait_for_signal(agreement()):
        raise RuntimeError("the launcher did not pass SIGUSR1 on")


def _at_step(epoch: int, step: int) -> None:
    info = RunLogger.info
    line = f"Epoch: [{epoch}/"

    def hooked(self: RunLogger, message: str) -> None:
        info(self, message)
        if message.startswith(line) and f"][{step}/" in message:
            signal_launcher_and_wait()

    RunLogger.info = hooked


def _at_checkpoint_write() -> None:
    def hooked(obj: Any, path: str) -> None:
        with checkpoint_module.atomic_write(path) as f:
            checkpoint_module.torch.save(obj, f)
            if obj.get("step") == 0:  # an epoch's end
                signal_launcher_and_wait()
                os.kill(os.getpid(), signal.SIGUSR1)  # a second one, before the file is complete

    checkpoint_module.atomic_save = hooked


def run(plan: tuple, proc: Any, cfg: Any, loss: Any) -> None:
    if proc.is_main:
        kind, *where = plan
        hooks = {"step": _at_step, "checkpoint_write": _at_checkpoint_write}
        hooks[kind](*where)
    train_with_distillation.run_process(proc, cfg, loss)
