"""The signal handlers and the stop agreement in one process (the training tests run them in
two)."""

from __future__ import annotations

import linecache
import multiprocessing
import os
import signal
import sys

import pytest

from tests.signal_wait import wait_for_signal
from utils import distributed
from utils.preemption import (
    PREEMPTED_EXIT_CODE,
    Decision,
    Preempted,
    Preemption,
    loader_worker_signals,
)


def test_a_signal_stops_at_the_next_poll_and_a_second_changes_nothing():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as agreement:
        assert agreement.poll() == Decision()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert wait_for_signal(agreement)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: the process goes on
        assert agreement.poll() == Decision(stop=True)
        assert agreement.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers put back


def test_a_signal_at_any_point_of_the_wait_is_seen():
    """The signal lands at each line that wait_for_signal runs before it blocks, in turn, in the
    thread that waits: the handler runs there and the wait ends. (threading.Event.wait hangs
    when a signal lands inside the Event's lock: the handler's set() waits for it forever.)"""
    land_at, landed = 0, []
    while not landed or landed[-1] == land_at - 1:  # until the lines before select() are done
        seen: list[int] = []

        def tracer(frame, event, arg, land_at=land_at, seen=seen):
            if frame.f_code is not wait_for_signal.__code__:
                return None
            if event == "line":
                text = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
                if len(landed) == land_at and (len(seen) == land_at or "select.select" in text):
                    landed.append(len(seen))
                    os.kill(os.getpid(), signal.SIGUSR1)
                seen.append(frame.f_lineno)
            return tracer

        with Preemption() as agreement:
            sys.settrace(tracer)
            try:
                assert wait_for_signal(agreement, timeout_s=60), land_at
            finally:
                sys.settrace(None)
        land_at += 1
    assert len(landed) >= 5  # the set-up lines, the check and the select() itself


def test_time_based_checkpoints_follow_the_clock():
    with Preemption(checkpoint_every_min=1e-9) as agreement:
        assert agreement.poll() == Decision(checkpoint=True)
        # validation asks about stopping only
        assert agreement.poll(checkpoints=False) == Decision()
    with Preemption(checkpoint_every_min=0) as never, Preemption(checkpoint_every_min=60) as hourly:
        assert never.poll() == Decision() and hourly.poll() == Decision()


def test_preempted_exits_with_the_documented_status():
    with pytest.raises(SystemExit) as info:
        raise Preempted("stopped at epoch 1, step 2")
    assert info.value.code == PREEMPTED_EXIT_CODE == 75
    assert str(info.value) == "stopped at epoch 1, step 2"


def _agree_then_stop_on_signal(proc: distributed.ProcessInfo) -> None:
    """A flag raised in rank 0 alone reaches every process together, one poll after it was
    sent (the poll that sends it does not wait for the others); then rank 0 signals the
    launcher, which passes the signal on, and both stop as preempted."""
    distributed.init_process_group(proc, "gloo", timeout_s=120)  # a bound, not a wait
    try:
        with Preemption() as agreement:
            assert agreement.poll() == Decision()  # the first poll waits for its answer
            if proc.rank == 0:
                agreement.requested.set()  # as the signal handler does
            assert agreement.poll() == Decision()  # sent, not yet agreed on
            assert agreement.poll() == Decision(stop=True)
            assert agreement.signal_name  # named in the other process too
        with Preemption() as agreement:
            distributed.barrier()  # every handler is in place
            if proc.rank == 0:
                os.kill(multiprocessing.parent_process().pid, signal.SIGTERM)
            # Each waits for its own handler to run (not requested.wait(): see wait_for_signal),
            # so that no SIGTERM arrives once the handlers are put back.
            assert wait_for_signal(agreement)
            assert agreement.poll() == Decision(stop=True)
            raise Preempted("stopped")
    finally:
        distributed.cleanup()


def test_the_launcher_passes_signals_on_and_exits_as_preempted():
    with pytest.raises(Preempted):
        distributed.launch(_agree_then_stop_on_signal, nprocs=2)


def test_loader_workers_ignore_sigusr1_and_die_on_sigterm():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with Preemption():
            loader_worker_signals(0)
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_the_agreement_group_waits_no_longer_than_dist_timeout_s(monkeypatch, tmp_path):
    """Its gloo group takes the job's timeout, not torch's 30-minute default."""
    import datetime

    import torch.distributed as dist

    groups = []
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: groups.append(kwargs))
    proc = distributed.ProcessInfo(world_size=1, local_world_size=1,
                                   init_method=f"file://{tmp_path / 'rendezvous'}")
    distributed.init_process_group(proc, "gloo", timeout_s=30)
    try:
        with Preemption(timeout_s=7) as agreement:
            monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: None)
            assert agreement.poll() == Decision()
    finally:
        distributed.cleanup()
    assert groups == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=7)}]
