"""Waiting in the main thread for a Preemption's signal handler to run (imported by spawned
processes, so it imports nothing heavy)."""

from __future__ import annotations

import os
import select
import signal
import time

from utils.preemption import Preemption

WAIT_S = 60.0


def wait_for_signal(waited: Preemption, timeout_s: float = WAIT_S) -> bool:
    """Wait, in the main thread, until the handler of `waited` has run; whether it did in time.

    Not ``waited.requested.wait()``: the handler runs in this same thread, and a signal that
    lands while Event.wait holds the Event's lock (before it blocks) runs the handler's set(),
    which then waits forever for that lock. Here the signal wakes a select() through the
    interpreter's wakeup fd instead, and this thread holds no lock while the handler runs.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)
    deadline = time.monotonic() + timeout_s
    try:
        while not waited.requested.is_set():  # the loop runs pending handlers before the test
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if select.select([read_fd], [], [], left)[0]:
                os.read(read_fd, 512)
        return True
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
