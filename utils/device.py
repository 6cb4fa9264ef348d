"""How a process uses its device: the autocast precision, the SGD kernels, cuDNN and determinism,
each chosen once from the hardware, for training and ``--evaluate`` alike."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from utils import distributed
from utils.config import require_choice
from utils.errors import ConfigError

# cuDNN runs bf16 convolutions on fast kernels from this compute capability (Ampere) on.
BF16_CAPABILITY = (8, 0)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
AMP_MODES = ("auto", *_DTYPES)
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "float32"}


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: full precision), why it was chosen, and a warning ('' for none)."""

    dtype: torch.dtype | None
    reason: str
    warning: str = ""

    def describe(self) -> str:
        return f"{_DTYPE_NAMES[self.dtype]} ({self.reason})"


def check_amp(setting: str) -> None:
    require_choice("train_params.amp", setting, AMP_MODES)


def choose_precision(setting: str, device: torch.device) -> Precision:
    """train_params.amp for this device; an explicit setting is taken as given."""
    if device.type != "cuda":
        if setting == "auto":
            return Precision(None, f"train_params.amp='auto' on {device.type}")
        return Precision(_DTYPES[setting], f"train_params.amp='{setting}'")
    major, minor = torch.cuda.get_device_capability(device)
    gpu = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    has_bf16_convolutions = (major, minor) >= BF16_CAPABILITY
    if setting == "auto":
        if has_bf16_convolutions:
            return Precision(torch.bfloat16,
                             f"train_params.amp='auto': {gpu} runs bf16 convolutions")
        return Precision(torch.float16, f"train_params.amp='auto': {gpu} has no bf16 convolutions "
                                        "in cuDNN, so fp16 with a grad scaler")
    warning = ""
    if setting == "bf16" and not has_bf16_convolutions:
        warning = (f"train_params.amp='bf16' on {gpu}: cuDNN runs bf16 convolutions only from "
                   f"capability 8.0, so these run on slow generic kernels; 'auto' picks fp16 here")
    return Precision(_DTYPES[setting], f"train_params.amp='{setting}' on {gpu}", warning)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN and determinism settings; use_deterministic_algorithms's NaN fill of every new
    tensor, a pass over every allocation that determinism does not need, is turned off."""
    if device.type != "cuda":
        return  # on the CPU the kernels used give the same results for the same thread count
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not deterministic


def build_sgd(params: Iterable[torch.nn.Parameter], optim_cfg: Mapping[str, Any],
              device: torch.device) -> tuple[torch.optim.SGD, str]:
    """The optimizer of cfg.optim and one line naming its SGD kernels: on CUDA fused ones, which
    take the fp16 grad scaler's overflow flag on the device (others make it wait for the GPU)."""
    params = list(params)
    settings = {"lr": optim_cfg["init_lr"], "momentum": optim_cfg["momentum"],
                "weight_decay": optim_cfg["weight_decay"], "nesterov": optim_cfg["nesterov"]}
    if device.type != "cuda":
        optimizer, kernels = torch.optim.SGD(params, **settings), "SGD"
    elif unavailable := fused_sgd_unavailable(params):
        optimizer = torch.optim.SGD(params, foreach=True, **settings)
        kernels = (f"foreach SGD, as fused SGD is unavailable ({unavailable}); "
                   "fp16 steps wait for the GPU")
    else:
        optimizer, kernels = torch.optim.SGD(params, fused=True, **settings), "fused SGD"
    zero_momentum_buffers(optimizer)
    return optimizer, kernels


def zero_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Give every parameter that has none a momentum buffer of zeros: fused SGD makes its buffers
    with ``torch.empty_like`` at the first step, and when the fp16 grad scaler skips that step
    they keep whatever memory the allocator handed out. With dampening 0, as in cfg.optim, zeros
    give plain SGD's first step exactly."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        for param in group["params"]:
            state = optimizer.state[param]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(param)  # in param's memory format


def fused_sgd_unavailable(params: list[torch.nn.Parameter]) -> str:
    """Why fused SGD cannot step these parameters ('' when it can), found by one step of a copy
    of the first: torch checks the device and dtype only at the first step."""
    if not params:
        return ""
    probe = torch.zeros(1, dtype=params[0].dtype, device=params[0].device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.SGD([probe], lr=0.0, fused=True).step()
    except (RuntimeError, TypeError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ""


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a saved optimizer state, keeping the kernels optimizer was built with ('fused' and
    'foreach' from a foreach checkpoint would fail a fused optimizer's first fp16 step)."""
    kernels = [{key: group[key] for key in ("fused", "foreach") if key in group}
               for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, kernels):
        group.update(keep)
    zero_momentum_buffers(optimizer)  # a state saved before any step holds no buffers


def configure_process(proc: distributed.ProcessInfo, device: torch.device, deterministic: bool,
                      backend: str, timeout_s: float) -> None:
    """Threads, cuDNN and determinism settings, then the process group ('' picks the backend)."""
    if device.type == "cpu":
        torch.set_num_threads(distributed.cpu_threads_per_process(proc.local_world_size))
    configure_backends(device, deterministic=deterministic)
    distributed.init_process_group(proc, backend or distributed.default_backend(device), timeout_s,
                                   device=device)


def memory_format_for(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA, where convolutions run faster in it; the default elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def reset_peak_memory(device: torch.device) -> None:
    """Start peak_memory_gib's count afresh (each epoch), so that warm-up does not hide in it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory tensors have held on a CUDA device since reset_peak_memory; else None."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def select_device(local_rank: int, local_world_size: int = 1) -> torch.device:
    """This process's device, made current; ``local_rank % device_count`` when the process sees
    fewer devices than processes (SLURM's ``--gpus-per-task=1`` shows each task only its own)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    devices = torch.cuda.device_count()
    index = local_rank if devices >= max(1, local_world_size) else local_rank % devices
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_device_count(nprocs: int, local_world_size: int | None = None) -> None:
    """ConfigError when more processes would share this machine's CUDA devices than it has
    (local_world_size: a launcher's count, None without one), unless SLURM split them per task."""
    devices = torch.cuda.device_count()
    if devices and nprocs > devices:
        raise ConfigError(f"dist.nprocs={nprocs} but this machine has {devices} CUDA devices; "
                          f"use at most {devices} (0 means one process per device)")
    if devices and (local_world_size or 0) > devices and not _devices_split_per_task(devices):
        raise ConfigError(f"the launcher started {local_world_size} processes on a machine with "
                          f"{devices} CUDA devices; use --nproc_per_node={devices} or fewer")


def _devices_split_per_task(devices: int) -> bool:
    """Whether SLURM gave each task its own share of the GPUs (--gpus-per-task, or a
    CUDA_VISIBLE_DEVICES per task): then each process sees only its share."""
    per_task = os.environ.get("SLURM_GPUS_PER_TASK", "")
    if per_task.isdigit():
        return int(per_task) == devices
    return "SLURM_LOCALID" in os.environ and "SLURM_STEP_GPUS" in os.environ \
        and len(os.environ["SLURM_STEP_GPUS"].split(",")) > devices


def shm_bytes(path: str = "/dev/shm") -> int | None:
    """The size of the shared-memory file system loader workers pass batches through; None
    where there is none (not Linux)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_blocks * stats.f_frsize


def shm_warning(workers: int, prefetch_factor: int, batch_bytes: int,
                shm_size: int | None = None) -> str:
    """A one-line warning when /dev/shm (or shm_size) cannot hold the batches the loader workers
    keep in flight, as Docker's default 64 MB cannot; '' when it can, or without workers."""
    size = shm_bytes() if shm_size is None else shm_size
    needed = workers * prefetch_factor * batch_bytes
    if workers <= 0 or size is None or size >= needed:
        return ""
    return (f"/dev/shm holds {size / 2**20:.0f} MiB but {workers} loader workers x "
            f"{prefetch_factor} prefetched batches need {needed / 2**20:.0f} MiB; workers may die "
            "with a bus error: start the container with --shm-size=8g (or --ipc=host), or lower "
            "data.num_workers")
