"""Starting and joining the training processes: one per device, torchrun, or a single process.

Spawned processes are forks of a forkserver (no CUDA state inherited); the first to fail stops
the others, so that none waits forever on a collective, and SIGTERM and SIGUSR1 are passed on to
them (see ``utils.preemption``).
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as dist

from utils.errors import ConfigError, UserError, one_line
from utils.preemption import HANDLED_SIGNALS, PREEMPTED_EXIT_CODE, Preempted

# The environment torchrun (and torch.distributed.launch) sets for every process it starts.
_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """A spawned process failed; the message is that process's one-line error."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ProcessInfo:
    """Where a process sits in the job. ``init_method`` is None when no process group is needed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    init_method: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def find_free_port() -> int:
    """A TCP port on localhost that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_process() -> ProcessInfo | None:
    """This process's place in a torchrun job, or None when torchrun did not start it."""
    if not all(key in os.environ for key in _TORCHRUN_KEYS):
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    return ProcessInfo(rank=int(os.environ["RANK"]), world_size=world_size,
                       local_rank=int(os.environ["LOCAL_RANK"]),
                       local_world_size=local_world_size(world_size), init_method="env://")


def local_world_size(world_size: int) -> int:
    """How many processes of the job run on this machine (they share its cores and loader
    workers): torchrun's or srun's count, else one per visible CUDA device."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    # SLURM_LOCALID equal to LOCAL_RANK: srun started this process as one of its tasks.
    local_id = os.environ.get("SLURM_LOCALID")
    if local_id is not None and local_id == os.environ.get("LOCAL_RANK"):
        if os.environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
            return int(os.environ["SLURM_NTASKS_PER_NODE"])
        tasks = _slurm_tasks_on_node(os.environ.get("SLURM_TASKS_PER_NODE", ""),
                                     os.environ.get("SLURM_NODEID", ""))
        if tasks:
            return tasks
    devices = torch.cuda.device_count()
    return min(world_size, devices) if devices else world_size


def _slurm_tasks_on_node(tasks_per_node: str, node_id: str) -> int:
    """Node node_id's entry of SLURM's task list ('8(x2),4' -> 8, 8, 4); 0 if unknown."""
    if not node_id.isdigit():
        return 0
    counts: list[int] = []
    for entry in tasks_per_node.split(","):
        count, _, repeat = entry.partition("(x")
        if not count.isdigit() or (repeat and not repeat.rstrip(")").isdigit()):
            return 0
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = int(node_id)
    return counts[node] if node < len(counts) else 0


def planned_world_size(nprocs: int) -> int:
    """How many processes ``launch`` will run: torchrun's count, nprocs, or one per CUDA device."""
    proc = torchrun_process()
    if proc is not None:
        return proc.world_size
    return nprocs if nprocs > 0 else max(1, torch.cuda.device_count())


def launch(fn: Callable[..., Any], args: tuple = (), nprocs: int = 0) -> None:
    """Run ``fn(ProcessInfo, *args)`` in every process of the job (nprocs = 0: one per CUDA
    device, or one on the CPU); returns when all are done, or raises one LaunchError, of the
    first process that failed for itself (not for want of a peer: see ``is_secondary``)."""
    proc = torchrun_process()
    world_size = planned_world_size(nprocs)
    if proc is not None or world_size == 1:
        fn(proc or ProcessInfo(), *args)
        return
    template = ProcessInfo(world_size=world_size, local_world_size=world_size,
                           init_method=f"tcp://127.0.0.1:{find_free_port()}")
    _spawn_and_join(fn, args, template)


# What a spawned process tells the launcher before it ends (see _spawned_entry).
USER, BUG, SECONDARY = "user", "bug", "secondary"
# Messages of errors that only say a peer went away; gloo's and NCCL's wording.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "communicator was aborted", "ECONNRESET", "EPIPE")
# How long, after a process failed for want of its peers, the others may take to report why.
PEER_REPORT_S = 30.0


@dataclass(frozen=True)
class Report:
    """Why a spawned process failed: its kind (USER, BUG or SECONDARY) and its text."""

    kind: str
    text: str


def is_secondary(exc: BaseException) -> bool:
    """Whether exc only says that another process failed: a closed connection, an aborted
    collective, a stop sent by the launcher. The job reports the other process's error."""
    return isinstance(exc, (dist.DistError, ConnectionError)) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in _PEER_GONE))


def _spawn_and_join(fn: Callable[..., Any], args: tuple, template: ProcessInfo) -> None:
    # Forks of a server that imported torch and torchvision once: seconds saved per process.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision"])
    processes, channels = [], {}
    for rank in range(template.world_size):
        proc = replace(template, rank=rank, local_rank=rank)
        receiver, sender = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_spawned_entry, args=(fn, proc, args, sender),
                              name=f"rank{rank}")
        process.start()
        sender.close()  # the child holds the only writing end: its exit closes the channel
        processes.append(process)
        channels[receiver] = rank

    def forward(signum: int, frame: Any) -> None:
        for process in processes:
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.kill(process.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in HANDLED_SIGNALS}
    try:
        failures, reports = _join(processes, channels)
    except KeyboardInterrupt:
        _stop(processes)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not failures:
        return
    if all(p.exitcode == PREEMPTED_EXIT_CODE for p in failures):
        raise Preempted("every process stopped after saving a checkpoint")
    raise _launch_error(failures, reports)


def _join(processes: list, channels: dict) -> tuple[list, dict[int, Report]]:
    """Wait for every process and its report; returns the failed processes, in the order they
    ended, and the reports by rank. A process that fails for itself stops the others at once;
    one that fails for want of a peer leaves them PEER_REPORT_S to report the cause."""
    reports: dict[int, Report] = {}
    failures: list = []
    pending = {p.sentinel: p for p in processes}
    deadline = None
    stopped: set[str] = set()  # stopped by the launcher: their ends are not failures of their own
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait([*pending, *channels], timeout)
        if not ready:  # the peers had their time to say why: stop them
            stopped.update(p.name for p in processes if p.is_alive())
            _stop(processes)
            continue
        for item in ready:
            if item in channels:
                with contextlib.suppress(EOFError, OSError):
                    reports[channels[item]] = item.recv()
                del channels[item]  # one report per process at most
                item.close()
                continue
            process = pending.pop(item)
            process.join()
            if process.exitcode == 0 or process.name in stopped:
                continue
            failures.append(process)
            if process.exitcode == PREEMPTED_EXIT_CODE:
                continue
            if _failed_for_itself(process, reports):
                # Its peers' errors are consequences; the report is read before they stop.
                _drain(channels, reports)
                stopped.update(p.name for p in processes if p.is_alive())
                _stop(processes)
            elif deadline is None:
                deadline = time.monotonic() + PEER_REPORT_S
    _drain(channels, reports)
    return failures, reports


def _drain(channels: dict, reports: dict[int, Report]) -> None:
    """Read the reports already sent, without waiting for any."""
    for channel, rank in list(channels.items()):
        with contextlib.suppress(EOFError, OSError):
            if channel.poll():
                reports[rank] = channel.recv()


def _rank(process: Any) -> int:
    return int(process.name.removeprefix("rank"))


def _failed_for_itself(process: Any, reports: dict[int, Report]) -> bool:
    """Whether process failed not for want of a peer (one killed by a signal sent no report)."""
    return _rank(process) not in reports or reports[_rank(process)].kind != SECONDARY


def _launch_error(failures: list, reports: dict[int, Report]) -> LaunchError:
    """The error of the first process that failed for itself, else of the first failure: a
    UserError's line (exit status 2), a bug's traceback, printed here once (1), or the signal
    that killed it (SIGBUS: 2)."""
    real = [p for p in failures if p.exitcode != PREEMPTED_EXIT_CODE]
    process = ([p for p in real if _failed_for_itself(p, reports)] or real)[0]
    report = reports.get(_rank(process))
    if report is None:
        return _exit_error(process)
    if report.kind == USER:
        return LaunchError(report.text, exit_code=2)
    print(report.text, file=sys.stderr, end="", flush=True)
    last = report.text.strip().splitlines()[-1] if report.text.strip() else "an error"
    return LaunchError(f"{process.name} failed with {last} (traceback above)", exit_code=1)


def _spawned_entry(fn: Callable[..., Any], proc: ProcessInfo, args: tuple, channel: Any) -> None:
    """A spawned process: run fn and send the launcher a Report of why it failed, if it did
    (printing nothing: the launcher shows one error for the whole job)."""
    # Stopped by the parent because a peer failed: unwind, so half-written files are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report, code = None, 0
    try:
        fn(proc, *args)
    except UserError as exc:
        report, code = Report(USER, f"{one_line(exc)} (process {proc.rank})"), 2
    except KeyboardInterrupt:
        code = 130
    except SystemExit as exc:  # Preempted, or stopped by the parent
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        if "Bus error" in str(exc):  # a DataLoader worker killed by SIGBUS
            report, code = Report(USER, _bus_error(f"a loader worker of rank{proc.rank}")), 2
        else:
            kind = SECONDARY if is_secondary(exc) else BUG
            report, code = Report(kind, traceback.format_exc()), 1
    if report is not None:
        with contextlib.suppress(OSError):
            channel.send(report)
    channel.close()
    if code != 0:
        # The report speaks for it; what the runtime prints tearing down a group whose peers are
        # gone (gloo's "terminate called without an active exception") is noise.
        sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    sys.exit(code)


def _stop(processes: list, grace_s: float = 10.0) -> None:
    """Terminate the processes still running, then kill those that ignore it."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()


def _bus_error(who: str) -> str:
    """The one line for a process killed by SIGBUS: a memory-mapped file shrank under it."""
    return (f"{who} was killed by SIGBUS: an LMDB file (data.mdb) was truncated or changed "
            f"while it was read; copy the LMDB again (or rerun img2lmdb.py) and leave it "
            f"unchanged while training runs")


def _exit_error(process: Any) -> LaunchError:
    """The error of a process that sent no report: a signal killed it, or it exited."""
    code = process.exitcode
    if code == -signal.SIGBUS:
        return LaunchError(_bus_error(process.name), exit_code=2)
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):  # not a signal the enum names
            return LaunchError(f"{process.name} was killed by {signal.Signals(-code).name}; "
                               "the job was stopped", exit_code=1)
    return LaunchError(f"{process.name} exited with status {code}; see its messages above",
                       exit_code=max(1, code or 1))


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(proc: ProcessInfo, backend: str, timeout_s: float,
                       device: torch.device | None = None) -> None:
    """Join the job's process group; collectives that wait longer than timeout_s fail instead
    of hanging. On CUDA, device binds the group to this process's GPU (NCCL then knows it at
    every barrier, rather than guessing it from the current device with a warning)."""
    if proc.init_method is None or dist.is_initialized():
        return
    bound = {"device_id": device} if device is not None and device.type == "cuda" else {}
    dist.init_process_group(backend=backend, init_method=proc.init_method, rank=proc.rank,
                            world_size=proc.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **bound)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process belongs to a process group: the collectives then run, with one
    process too (a one-GPU check of the multi-process code; see tests/test_cuda.py)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place; a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy src's buffers (BatchNorm running statistics) to every process: after the last step
    each holds statistics of its own batch, and all must validate the model rank 0 saves."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def usable_cores() -> int:
    """The CPU cores this process may run on: its CPU affinity, less where a cgroup CPU quota
    (a container's --cpus, a Kubernetes limit) allows fewer cores' worth of time."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, int(quota))) if quota is not None else cores


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The cores' worth of CPU time this process's cgroup allows (v2's cpu.max, else v1's
    cfs_quota_us / cfs_period_us); None without a quota."""
    def read(*names: str) -> list[str]:
        for name in names:
            with contextlib.suppress(OSError), open(f"{root}/{name}", encoding="ascii") as f:
                return f.read().split()
        return []

    fields = read("cpu.max")  # v2: "<quota> <period>"
    if fields:
        fields = (fields + ["100000"])[:2]
    else:  # v1: the quota and the period, each in a file of its own
        fields = (read("cpu/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_quota_us")[:1]
                  + read("cpu/cpu.cfs_period_us", "cpu,cpuacct/cpu.cfs_period_us")[:1])
    try:
        quota_us, period_us = map(int, fields)
    except ValueError:  # 'max', or a file missing: no quota
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cpu_threads_per_process(local_world_size: int) -> int:
    """The CPU cores of this machine shared evenly among its processes (at least one each)."""
    return max(1, usable_cores() // max(1, local_world_size))


def loader_workers_per_process(setting: int | str, local_world_size: int) -> int:
    """Each process's data-loading workers from data.num_workers: a number is the machine's
    total; 'auto' is the process's share of its cores less one for the training loop itself (two
    when the share is over 8: the loop and its pin-memory thread)."""
    if not (setting == "auto" or (isinstance(setting, int) and not isinstance(setting, bool)
                                  and setting >= 0)):
        raise ConfigError(f"data.num_workers must be 'auto' or a non-negative integer, "
                          f"got {setting!r}")
    local = max(1, local_world_size)
    if setting == "auto":
        share = cpu_threads_per_process(local)
        return max(1, share - (2 if share > 8 else 1))
    return int(setting) // local
