"""Device-dependent choices on the CPU: precision from a mocked GPU, SGD kernels, backend flags."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from imagenet_train_cfg import cfg as default_cfg
from utils import device as device_module
from utils.checkpoint import atomic_save
from utils.device import (
    build_sgd,
    check_device_count,
    choose_precision,
    configure_backends,
    fused_sgd_unavailable,
    load_optimizer_state,
    select_device,
    shm_warning,
)
from utils.errors import ConfigError

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture()
def gpu(monkeypatch):
    """Pretend CUDA device 0 has the compute capability the test sets: gpu(7, 0)."""
    def set_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name",
                            lambda device=None: f"GPU sm_{major}{minor}")
    return set_capability


@pytest.mark.parametrize("capability, dtype", [
    ((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
    ((9, 0), torch.bfloat16),
])
def test_auto_is_bf16_from_capability_8_and_fp16_below(gpu, capability, dtype):
    gpu(*capability)
    precision = choose_precision("auto", CUDA)
    assert precision.dtype == dtype and not precision.warning
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    assert precision.describe().startswith(f"{name} (train_params.amp='auto': GPU sm_")
    assert f"compute capability {capability[0]}.{capability[1]}" in precision.describe()


def test_auto_is_full_precision_on_the_cpu():
    precision = choose_precision("auto", CPU)
    assert precision.dtype is None
    assert precision.describe() == "float32 (train_params.amp='auto' on cpu)"


def test_bf16_asked_for_on_an_old_gpu_is_kept_with_a_one_line_warning(gpu):
    gpu(7, 0)
    precision = choose_precision("bf16", CUDA)
    assert precision.dtype == torch.bfloat16
    warning = precision.warning
    assert "slow" in warning and "7.0" in warning and "\n" not in warning
    gpu(8, 6)
    assert not choose_precision("bf16", CUDA).warning


@pytest.mark.parametrize("setting, dtype",
                         [("fp16", torch.float16), ("off", None), ("bf16", torch.bfloat16)])
def test_explicit_settings_are_taken_as_given(gpu, setting, dtype):
    gpu(9, 0)
    assert choose_precision(setting, CUDA).dtype == dtype
    assert choose_precision(setting, CPU).dtype == dtype


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_sgd_on_cuda_is_fused_with_the_configured_settings():
    optimizer, kernels = build_sgd(small_model().parameters(), default_cfg.optim, CUDA)
    group = optimizer.param_groups[0]
    assert group["fused"] and not group["foreach"] and kernels == "fused SGD"
    assert optimizer._step_supports_amp_scaling  # what lets GradScaler.step skip its .item()
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (
        default_cfg.optim.init_lr, default_cfg.optim.momentum, default_cfg.optim.weight_decay,
        default_cfg.optim.nesterov)


def test_sgd_falls_back_to_foreach_and_says_why(monkeypatch):
    monkeypatch.setattr(device_module, "fused_sgd_unavailable",
                        lambda params: "no fused kernels here")
    optimizer, kernels = build_sgd(small_model().parameters(), default_cfg.optim, CUDA)
    group = optimizer.param_groups[0]
    assert group["foreach"] and not group["fused"]
    assert "foreach" in kernels and "no fused kernels here" in kernels


def test_sgd_on_the_cpu_keeps_torch_defaults():
    optimizer, kernels = build_sgd(small_model().parameters(), default_cfg.optim, CPU)
    assert not optimizer.param_groups[0]["fused"] and kernels == "SGD"


def test_fused_sgd_unavailable_names_the_reason():
    assert fused_sgd_unavailable(list(small_model().parameters())) == ""
    reason = fused_sgd_unavailable([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    assert "fused" in reason and "\n" not in reason


def scaled_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                poison: bool = False) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = model(torch.ones(2, 4)).square().mean()
    scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
    scaler.step(optimizer)
    scaler.update()


def test_fused_sgd_steps_under_the_grad_scaler_without_reading_the_device(monkeypatch):
    """The step a plain SGD would take, taken without Tensor.item (a GPU sync on CUDA)."""
    model, reference = small_model(), small_model()
    optimizer, _ = build_sgd(model.parameters(), default_cfg.optim, CUDA)
    reference_optimizer, _ = build_sgd(reference.parameters(), default_cfg.optim, CPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    real_item = torch.Tensor.item

    def no_item(self):
        raise AssertionError("GradScaler.step read a value from the device")

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(model(torch.ones(2, 4)).square().mean()).backward()
    monkeypatch.setattr(torch.Tensor, "item", no_item)
    scaler.step(optimizer)
    monkeypatch.setattr(torch.Tensor, "item", real_item)
    scaler.update()
    reference(torch.ones(2, 4)).square().mean().backward()
    reference_optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)

    before = [p.detach().clone() for p in model.parameters()]
    scaled_step(model, optimizer, scaler, poison=True)  # an overflow: the step is skipped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 512.0


def test_fused_sgd_with_unscaled_clipped_gradients():
    """The grad-clip path: unscale_, clip, step; an overflow still skips the step."""
    model, reference = small_model(), small_model()
    optimizer, _ = build_sgd(model.parameters(), default_cfg.optim, CUDA)
    reference_optimizer, _ = build_sgd(reference.parameters(), default_cfg.optim, CPU)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for poison in (False, True):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad(set_to_none=True)
        loss = model(torch.ones(2, 4)).square().mean()
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        scaler.step(optimizer)
        scaler.update()
        if poison:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        else:
            reference(torch.ones(2, 4)).square().mean().backward()
            nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
            reference_optimizer.step()
            for p, q in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(p, q)


@pytest.mark.parametrize("saved_on, resumed_on",
                         [("fused", "foreach"), ("foreach", "fused"), ("cpu", "fused")])
def test_optimizer_state_loads_across_sgd_kernels(saved_on, resumed_on, monkeypatch, tmp_path):
    """Momentum comes back; the kernels stay those the resumed optimizer was built with."""
    def build(kernels: str) -> tuple[nn.Module, torch.optim.Optimizer]:
        with monkeypatch.context() as patch:
            if kernels == "foreach":
                patch.setattr(device_module, "fused_sgd_unavailable", lambda params: "test")
            model = small_model()
            device = CPU if kernels == "cpu" else CUDA
            return model, build_sgd(model.parameters(), default_cfg.optim, device)[0]

    model, optimizer = build(saved_on)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scaled_step(model, optimizer, scaler)
    path = str(tmp_path / "optimizer.pth")
    atomic_save(optimizer.state_dict(), path)

    resumed_model, resumed = build(resumed_on)
    built_with = copy.deepcopy([(g["fused"], g["foreach"]) for g in resumed.param_groups])
    load_optimizer_state(resumed, torch.load(path, weights_only=True))
    assert [(g["fused"], g["foreach"]) for g in resumed.param_groups] == built_with
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(optimizer.state[p]["momentum_buffer"],
                           resumed.state[q]["momentum_buffer"])
    # an fp16 step runs
    scaled_step(resumed_model, resumed, torch.amp.GradScaler("cpu", init_scale=1024.0))


@pytest.fixture()
def backend_flags(monkeypatch):
    """Restore the global cuDNN and determinism settings a test changes."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
    torch.utils.deterministic.fill_uninitialized_memory = saved[4]


def test_seeded_cuda_runs_are_deterministic_without_filling_new_memory(backend_flags):
    torch.utils.deterministic.fill_uninitialized_memory = True
    configure_backends(CUDA, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    assert torch.utils.deterministic.fill_uninitialized_memory is False


def test_unseeded_cuda_runs_let_cudnn_pick_algorithms(backend_flags):
    torch.backends.cudnn.benchmark = False
    configure_backends(CUDA, deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def test_cpu_leaves_the_backends_alone(backend_flags):
    torch.backends.cudnn.benchmark = False
    configure_backends(CPU, deterministic=True)
    assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


def fp16_steps_after_a_first_overflow(optimizer_of: Callable[[nn.Module], torch.optim.Optimizer],
                                      monkeypatch) -> tuple[list[torch.Tensor], float]:
    """A small fp16 model's parameters after three scaled steps, the first an overflow, and the
    scale after them.

    New tensors from ``torch.empty_like`` hold a huge value, as CUDA's caching allocator hands
    back old activations. The scale 2**40 overflows fp16 gradients; backoff then drops it to
    2**10, where the next two steps are finite.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = optimizer_of(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-30)
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like",
                        lambda *args, **kwargs: real_empty_like(*args, **kwargs).fill_(1e29))
    inputs = torch.linspace(-1, 1, 12).reshape(3, 4)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(inputs).float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return [p.detach().clone() for p in model.parameters()], scaler.get_scale()


def test_a_skipped_first_fused_step_leaves_momentum_as_plain_sgd_does(monkeypatch):
    """fp16 with fused SGD: after a first step the grad scaler skips, the momentum buffers are
    those foreach SGD would have, not the memory fused SGD's first step left unfilled."""
    def fused(model: nn.Module) -> torch.optim.Optimizer:
        return build_sgd(model.parameters(), default_cfg.optim, CUDA)[0]  # fused, on CPU tensors

    def foreach(model: nn.Module) -> torch.optim.Optimizer:
        settings = default_cfg.optim
        return torch.optim.SGD(model.parameters(), lr=settings.init_lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay, nesterov=settings.nesterov,
                               foreach=True)

    assert build_sgd(nn.Linear(1, 1).parameters(), default_cfg.optim, CUDA)[1] == "fused SGD"
    expected, scale = fp16_steps_after_a_first_overflow(foreach, monkeypatch)
    assert scale == 2.0**10  # the first step overflowed, the next two did not
    assert all(torch.isfinite(p).all() for p in expected)
    for p, q in zip(fp16_steps_after_a_first_overflow(fused, monkeypatch)[0], expected):
        torch.testing.assert_close(p, q)


def test_an_optimizer_state_without_buffers_loads_as_zero_momentum():
    """A state saved before any step holds no momentum buffers; the loaded optimizer gets zeros."""
    model = small_model()
    optimizer, _ = build_sgd(model.parameters(), default_cfg.optim, CUDA)
    empty = torch.optim.SGD(small_model().parameters(), lr=0.1, momentum=0.9).state_dict()
    load_optimizer_state(optimizer, empty)
    for p in model.parameters():
        assert torch.equal(optimizer.state[p]["momentum_buffer"], torch.zeros_like(p))


@pytest.fixture()
def cuda_devices(monkeypatch):
    """Pretend this process sees n CUDA devices: cuda_devices(n); records set_device calls."""
    current: list[int] = []

    def see(count: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", current.append)
        return current
    for key in ("SLURM_GPUS_PER_TASK", "SLURM_LOCALID", "SLURM_STEP_GPUS"):
        monkeypatch.delenv(key, raising=False)
    return see


def test_each_process_takes_its_local_rank_when_it_sees_every_device(cuda_devices):
    current = cuda_devices(8)
    assert select_device(5, local_world_size=8) == torch.device("cuda", 5)
    assert current == [5]


def test_slurm_gpus_per_task_gives_each_task_the_one_device_it_sees(cuda_devices, monkeypatch):
    """srun --ntasks-per-node=8 --gpus-per-task=1: LOCAL_RANK runs 0..7, each task sees one GPU."""
    current = cuda_devices(1)
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "1")
    monkeypatch.setenv("SLURM_LOCALID", "6")
    check_device_count(nprocs=0, local_world_size=8)  # accepted: each task has its own GPU
    assert select_device(6, local_world_size=8) == torch.device("cuda", 0)
    assert current == [0]


def test_two_gpus_per_task_split_the_tasks_between_them(cuda_devices, monkeypatch):
    cuda_devices(2)
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "2")
    check_device_count(nprocs=0, local_world_size=8)
    assert select_device(3, local_world_size=4) == torch.device("cuda", 1)


def test_more_processes_than_devices_without_a_per_task_split_is_a_config_error(cuda_devices):
    cuda_devices(4)
    with pytest.raises(ConfigError, match=r"--nproc_per_node=4 or fewer"):
        check_device_count(nprocs=0, local_world_size=8)
    with pytest.raises(ConfigError, match=r"dist.nprocs=6 but this machine has 4 CUDA devices"):
        check_device_count(nprocs=6)
    check_device_count(nprocs=4, local_world_size=4)


def test_without_cuda_the_device_is_the_cpu_and_any_count_is_fine(cuda_devices):
    current = cuda_devices(0)
    assert select_device(3, local_world_size=4) == CPU and current == []
    check_device_count(nprocs=4, local_world_size=4)


def test_a_small_dev_shm_gives_one_line_naming_the_docker_options(monkeypatch):
    batch = 32 * 3 * 224 * 224  # one uint8 batch of the per-GPU size
    warning = shm_warning(14, 2, batch, shm_size=64 * 2**20)
    assert "\n" not in warning and "64 MiB" in warning and "129 MiB" in warning
    assert "--shm-size" in warning and "--ipc=host" in warning
    assert shm_warning(14, 2, batch, shm_size=8 * 2**30) == ""
    assert shm_warning(0, 2, batch, shm_size=1) == ""  # no workers, no shared memory
    monkeypatch.setattr(device_module, "shm_bytes", lambda path="/dev/shm": 2**20)
    assert "1 MiB" in shm_warning(2, 2, batch)
