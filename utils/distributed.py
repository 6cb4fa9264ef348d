"""Starting and joining the training processes: spawn per device, torchrun, or a single process.

``launch`` runs ``fn(proc, *args)`` once per process, where ``proc`` says which process this
is. Under torchrun the process is already one of many and ``fn`` runs directly; otherwise N > 1
processes are spawned on this machine, rendezvous on a free localhost port, and the first one
to fail stops the others, so a dead process never leaves its peers waiting on a collective.

A process counts as started by torchrun (or any launcher that sets the same environment: a
hand-written SLURM script, for one) when RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT are all set. The number of processes on this machine, which shares out its CPU cores
and loader workers, comes from LOCAL_WORLD_SIZE; without it, from SLURM_NTASKS_PER_NODE or
SLURM_TASKS_PER_NODE (with SLURM_NODEID) when SLURM_LOCALID equals LOCAL_RANK, else from the
number of visible CUDA devices (see ``local_world_size``).

SIGTERM and SIGUSR1 sent to the launching process are passed on to the spawned ones (see
``utils.preemption``); when they all stop with ``PREEMPTED_EXIT_CODE``, so does ``launch``.
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
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as dist

from utils.errors import UserError, one_line
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
    """How many processes of the job run on this machine, from the launcher's environment.

    LOCAL_WORLD_SIZE when set (torchrun sets it). Otherwise, when SLURM_LOCALID equals LOCAL_RANK
    (srun started this process as one of its tasks), SLURM_NTASKS_PER_NODE or this node's entry of
    SLURM_TASKS_PER_NODE. Otherwise one process per visible CUDA device, at most world_size; on
    a machine without CUDA devices, world_size (every process on this machine).
    """
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if os.environ.get("SLURM_LOCALID") is not None and os.environ["SLURM_LOCALID"] == os.environ.get("LOCAL_RANK"):
        if os.environ.get("SLURM_NTASKS_PER_NODE", "").isdigit():
            return int(os.environ["SLURM_NTASKS_PER_NODE"])
        tasks = _slurm_tasks_on_node(os.environ.get("SLURM_TASKS_PER_NODE", ""),
                                     os.environ.get("SLURM_NODEID", ""))
        if tasks:
            return tasks
    devices = torch.cuda.device_count()
    return min(world_size, devices) if devices else world_size


def _slurm_tasks_on_node(tasks_per_node: str, node_id: str) -> int:
    """Node node_id's entry of SLURM's compressed task list, e.g. '8(x2),4' -> 8, 8, 4; 0 if unknown."""
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
    if nprocs > 0:
        return nprocs
    return max(1, torch.cuda.device_count())


def launch(fn: Callable[..., Any], args: tuple = (), nprocs: int = 0) -> None:
    """Run ``fn(ProcessInfo, *args)`` in every process of the job; returns when all are done.

    nprocs = 0 means one process per visible CUDA device (one on the CPU). A UserError raised
    in a spawned process comes back as a LaunchError carrying its message, without a
    traceback; other failures carry the process's exit status (its traceback has already been
    printed by the process itself).
    """
    proc = torchrun_process()
    if proc is not None:
        fn(proc, *args)
        return
    world_size = planned_world_size(nprocs)
    if world_size == 1:
        fn(ProcessInfo(), *args)
        return
    template = ProcessInfo(world_size=world_size, local_world_size=world_size,
                           init_method=f"tcp://127.0.0.1:{find_free_port()}")
    _spawn_and_join(fn, args, template)


def _spawn_and_join(fn: Callable[..., Any], args: tuple, template: ProcessInfo) -> None:
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    processes = []
    for rank in range(template.world_size):
        proc = replace(template, rank=rank, local_rank=rank)
        process = ctx.Process(target=_spawned_entry, args=(fn, proc, args, errors),
                              name=f"rank{rank}")
        process.start()
        processes.append(process)

    def forward(signum: int, frame: Any) -> None:
        for process in processes:
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.kill(process.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in HANDLED_SIGNALS}
    try:
        failed = _wait_for_first_failure(processes)
        if failed is not None and failed.exitcode == PREEMPTED_EXIT_CODE:
            failed = _wait_for_first_failure(processes, also_ok=PREEMPTED_EXIT_CODE)
            if failed is None:
                raise Preempted("every process stopped after saving a checkpoint")
    except KeyboardInterrupt:
        _stop(processes)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failed is None:
        return
    _stop(processes)
    message = errors.get() if not errors.empty() else _describe_exit(failed)
    raise LaunchError(message, exit_code=failed.exitcode if (failed.exitcode or 0) > 0 else 1)


def _spawned_entry(fn: Callable[..., Any], proc: ProcessInfo, args: tuple, errors: Any) -> None:
    """A spawned process: run fn, and turn a user error into a message for the parent and exit 2."""
    # Stopped by the parent because a peer failed: unwind, so half-written files are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        fn(proc, *args)
    except UserError as exc:
        errors.put(f"{one_line(exc)} (process {proc.rank})")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _wait_for_first_failure(processes: list, also_ok: int = 0) -> Any:
    """Block until every process has ended well (None) or one has failed (that process).

    Ending well is exit status 0, or also_ok (the preempted processes that stopped together).
    """
    pending = {p.sentinel: p for p in processes if p.exitcode is None}
    while pending:
        for sentinel in multiprocessing.connection.wait(list(pending)):
            process = pending.pop(sentinel)
            process.join()
            if process.exitcode not in (0, also_ok):
                return process
    return None


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


def _describe_exit(process: Any) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"{process.name} was killed by {signal.Signals(-code).name}; the job was stopped"
        except ValueError:
            pass
    return f"{process.name} exited with status {code}; see its messages above"


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
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process belongs to a process group: the collectives then run, with one
    process too (a one-GPU check of the multi-process code; see tests/test_cuda.py)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place; a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy src's buffers (BatchNorm running statistics) to every process.

    DDP sends rank 0's buffers at the start of each training forward, so after the last step
    every process holds statistics updated by its own batch. Aligning them makes all processes
    validate the model that rank 0 saves.
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def usable_cores() -> int:
    """The CPU cores this process may run on: its CPU affinity, less where a cgroup CPU quota
    (a container's --cpus, a Kubernetes limit) allows fewer cores' worth of time."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, int(quota))) if quota is not None else cores


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The cores' worth of CPU time this process's cgroup allows; None without a quota.

    cgroup v2 writes '<quota> <period>' (or 'max <period>') in cpu.max; v1 writes the two in
    cpu/cpu.cfs_quota_us (-1 for none) and cpu/cpu.cfs_period_us.
    """
    def read(*names: str) -> list[str] | None:
        for name in names:
            try:
                with open(os.path.join(root, name), encoding="ascii") as f:
                    return f.read().split()
            except OSError:
                continue
        return None

    v2 = read("cpu.max")
    if v2 is not None:
        quota, period = (v2 + ["100000"])[:2]
    else:
        v1_quota = read("cpu/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_quota_us")
        v1_period = read("cpu/cpu.cfs_period_us", "cpu,cpuacct/cpu.cfs_period_us")
        if not v1_quota or not v1_period:
            return None
        quota, period = v1_quota[0], v1_period[0]
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # 'max': no quota
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cpu_threads_per_process(local_world_size: int) -> int:
    """The CPU cores of this machine shared evenly among its processes (at least one each)."""
    return max(1, usable_cores() // max(1, local_world_size))


def loader_workers_per_process(setting: int | str, local_world_size: int) -> int:
    """Each process's data-loading workers from data.num_workers.

    'auto': the process's share of the machine's cores, less one for the training loop itself
    (two when the share is over 8: the loop and its pin-memory thread), at least one. A number: the machine's total, divided evenly among its processes.
    """
    local = max(1, local_world_size)
    if setting == "auto":
        share = cpu_threads_per_process(local)
        return max(1, share - (2 if share > 8 else 1))
    return int(setting) // local
