"""The CUDA path, each case checked against the CPU's result: run by ``pytest -m cuda`` (and by
benchmarks/gpu_check.py); skipped, with the reason, where CUDA is not available.

TF32 is switched off for these tests (an autouse fixture), so that float32 on the GPU can be
compared with float32 on the CPU at float32's own tolerances.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torchvision

import train_with_distillation as script
from dataset.demo_data import prepare_demo_data
from dataset.prefetch_data import DevicePrefetcher, on_device
from imagenet_train_cfg import cfg as default_cfg
from knowledge_distiller import WSLDistiller, build_distiller, build_loss
from models import load_weights
from utils import distributed
from utils.checkpoint import (
    CHECKPOINT_NAME,
    Progress,
    load_checkpoint,
    restore_training,
    save_checkpoint,
    training_checkpoint,
)
from utils.config import AttrDict
from utils.logger import METRICS_NAME, read_metrics
from utils.lr_schedule import build_scheduler
from utils.metrics import StepMeter, all_reduce_sums

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs CUDA (torch.cuda.is_available() is False)"),
]

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
NUM_CLASSES = 10
CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 matmuls and convolutions in float32 on the GPU, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def uint8_batches(count: int, batch: int = 8, size: int = 64,
                  seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches as the loaders deliver them: uint8 images in pinned memory, int64 labels."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 3, size, size)
    return [(torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).pin_memory(),
             torch.randint(0, NUM_CLASSES, (batch,), generator=generator).pin_memory())
            for _ in range(count)]


def small_config() -> AttrDict:
    """The defaults with ResNet-18 teacher and student over 10 classes, both random."""
    cfg = copy.deepcopy(default_cfg)
    cfg.model.teacher = cfg.model.student = "resnet18"
    cfg.model.num_classes = NUM_CLASSES
    cfg.model.teacher_weights = ""
    return cfg


def distiller_pair(device: torch.device, seed: int = 0) -> WSLDistiller:
    """ResNet-18 teacher and student (10 classes), WSLD loss (T 2, alpha 2.5), built and laid
    out on device by the script's own build_distiller."""
    cfg = small_config()
    torch.manual_seed(seed)
    return build_distiller(cfg, build_loss(cfg), device)


def epoch_meter(device: torch.device, steps: int, lines: list[str]) -> StepMeter:
    """A one-epoch meter whose print_freq is past the end: one read of the device, at the end
    of the pass; its log lines go to lines."""
    return StepMeter(device, 0, 1, steps, print_freq=1000, log=lines.append, lr=0.05)


def sgd(module: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                           weight_decay=1e-4)


def cpu_loss(batch: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> float:
    """The float32 CPU loss of the first batch, from distiller_pair(seed)'s weights."""
    cpu = torch.device("cpu")
    images, labels = next(iter(script_prefetcher([batch], cpu)))
    with torch.no_grad():
        return distiller_pair(cpu, seed)(images, labels)[1].item()


def script_prefetcher(batches: list, device: torch.device) -> DevicePrefetcher:
    """The batches on device as the script's loaders give them (on_device)."""
    return on_device(batches, device, MEAN, STD)


# ----------------------------------------------------------------------------- the prefetcher

def test_prefetcher_gives_the_cpu_tensors_while_the_gpu_is_busy():
    """Over three passes, with a large matmul queued on the compute stream before each batch is
    used and the batch dropped right after its use is queued: the values, channels-last strides
    and int64 labels are the CPU path's. A missing stream wait reads a batch before its copy
    lands; a missing record_stream lets the next copy overwrite it before the queued use."""
    batches = uint8_batches(6)
    expected = [(images.clone(), labels.clone()) for images, labels in
                DevicePrefetcher(batches, "cpu", MEAN, STD, channels_last=True)]
    busy = torch.randn(4096, 4096, device=CUDA)
    prefetcher = DevicePrefetcher(batches, CUDA, MEAN, STD, channels_last=True)
    for _ in range(3):
        used = []
        for images, labels in prefetcher:
            assert images.device == CUDA and labels.dtype == torch.int64
            assert images.is_contiguous(memory_format=torch.channels_last)
            for _ in range(4):
                busy = busy @ busy / 4096  # keeps the compute stream busy for a while
            used.append((images * 1, labels.clone(), images.stride()))  # queued behind the matmuls
            del images, labels
        torch.cuda.synchronize(CUDA)
        assert len(used) == len(expected)
        for (images, labels, stride), (cpu_images, cpu_labels) in zip(used, expected):
            assert stride == cpu_images.stride()
            # About 1 ulp.
            torch.testing.assert_close(images.cpu(), cpu_images, rtol=1.2e-7, atol=1e-6)
            assert torch.equal(labels.cpu(), cpu_labels)


# ----------------------------------------------------------------------------- precision

def test_bf16_channels_last_steps_keep_the_teacher_and_move_the_student():
    batches = uint8_batches(5)
    distiller = distiller_pair(CUDA)
    data = script_prefetcher(batches, CUDA)
    images, labels = next(iter(data))
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.bfloat16):
        loss = distiller(images, labels)[1].item()
    reference = cpu_loss(batches[0])
    assert abs(loss - reference) <= 0.02 * abs(reference), (loss, reference)

    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    optimizer = sgd(distiller)
    scaler = torch.amp.GradScaler(CUDA.type, enabled=False)
    lines: list[str] = []
    meter = epoch_meter(CUDA, len(batches), lines)
    script.train_one_epoch(distiller, data, optimizer, scaler, torch.bfloat16, meter)
    stats = meter.summary()
    assert len(lines) == 1  # the pass's one read, at its last step
    assert stats["images"] == 40 and torch.isfinite(torch.tensor(stats["loss"]))
    for key, value in distiller.teacher.state_dict().items():  # weights and BatchNorm buffers
        assert torch.equal(value, teacher_before[key]), key
    student_after = distiller.student.state_dict()
    assert not torch.equal(student_after["conv1.weight"], student_before["conv1.weight"])
    assert not torch.equal(student_after["bn1.running_mean"], student_before["bn1.running_mean"])


def test_fp16_with_grad_scaler_and_its_state_through_a_checkpoint(tmp_path):
    batches = uint8_batches(5)
    distiller = distiller_pair(CUDA)
    data = script_prefetcher(batches, CUDA)
    images, labels = next(iter(data))
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.float16):
        loss = distiller(images, labels)[1].item()
    reference = cpu_loss(batches[0])
    assert abs(loss - reference) <= 0.02 * abs(reference), (loss, reference)

    cfg = small_config()
    optimizer = sgd(distiller)
    scheduler = build_scheduler(optimizer, cfg.optim, 1)
    scaler = torch.amp.GradScaler(CUDA.type)
    meter = epoch_meter(CUDA, len(batches), [])
    script.train_one_epoch(distiller, data, optimizer, scaler, torch.float16, meter)
    assert torch.isfinite(torch.tensor(meter.summary()["loss"]))
    assert all(torch.isfinite(p).all() for p in distiller.student.parameters())

    # Saved and resumed as the script does: training_checkpoint, then load_weights and
    # restore_training.
    state = training_checkpoint(distiller.student, "resnet18", optimizer, scheduler, scaler,
                                Progress(epochs_done=1), cfg.to_dict())
    path = save_checkpoint(state, str(tmp_path / "out"), is_best=False)
    fresh = distiller_pair(CUDA, seed=1)
    fresh_optimizer = sgd(fresh)
    fresh_scaler = torch.amp.GradScaler(CUDA.type)
    checkpoint = load_checkpoint(path)
    load_weights(fresh.student, checkpoint, "resnet18")
    progress = restore_training(checkpoint, fresh_optimizer,
                                build_scheduler(fresh_optimizer, cfg.optim, 1), fresh_scaler,
                                restore_rng=False)
    assert progress.epochs_done == 1
    assert torch.equal(fresh.student.conv1.weight, distiller.student.conv1.weight)
    assert fresh_scaler.state_dict() == scaler.state_dict()
    assert fresh_scaler.get_scale() == scaler.get_scale()


# ----------------------------------------------------------------------------- NCCL

def test_single_process_nccl_group_gives_the_single_process_numbers():
    """utils/distributed.py's process group on NCCL, world size 1: an all-reduce through NCCL,
    all_reduce_sums and validate give what one process without a group gives."""
    model = distiller_pair(CUDA).student
    batches = uint8_batches(4)
    alone = script.validate(model, script_prefetcher(batches, CUDA), None)
    on_cpu = script.validate(distiller_pair(torch.device("cpu")).student,
                             script_prefetcher(batches, torch.device("cpu")), None)
    proc = distributed.ProcessInfo(init_method=f"tcp://127.0.0.1:{distributed.find_free_port()}")
    distributed.init_process_group(proc, "nccl", timeout_s=60, device=CUDA)
    try:
        assert dist.get_backend() == "nccl"
        summed = torch.tensor([1.5, 2.0], device=CUDA)
        dist.all_reduce(summed)
        assert summed.tolist() == [1.5, 2.0]
        sums = all_reduce_sums({"a": 3, "b": torch.tensor(0.25, device=CUDA)}, CUDA)
        assert sums == {"a": 3.0, "b": 0.25}
        grouped = script.validate(model, script_prefetcher(batches, CUDA), None)
    finally:
        distributed.cleanup()
    # cuDNN may pick other kernels for the second pass (benchmark mode): the same images, and
    # errors and loss within what those kernels' rounding moves.
    assert grouped["images"] == alone["images"]
    for key in ("top1_err", "top5_err"):
        assert abs(grouped[key] - alone[key]) <= 100 / 32, key  # one image, at most, flips
    assert grouped["loss"] == pytest.approx(alone["loss"], rel=1e-4)
    assert grouped["images"] == on_cpu["images"] == 32
    assert abs(grouped["top1_err"] - on_cpu["top1_err"]) <= 100 / 32  # one image, at most, flips
    assert grouped["loss"] == pytest.approx(on_cpu["loss"], rel=1e-3)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_written_from_cuda_loads_on_the_cpu_into_torchvision(tmp_path):
    cfg = small_config()
    distiller = distiller_pair(CUDA)
    optimizer = sgd(distiller)
    state = training_checkpoint(distiller.student, "resnet18", optimizer,
                                build_scheduler(optimizer, cfg.optim, 1),
                                torch.amp.GradScaler(CUDA.type, enabled=False), Progress(),
                                cfg.to_dict())
    path = save_checkpoint(state, str(tmp_path), is_best=False)
    loaded = load_checkpoint(path)  # weights_only=True, onto the CPU
    assert all(t.device.type == "cpu" for t in loaded["state_dict"].values())
    student = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    student.load_state_dict(loaded["state_dict"], strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x_cuda = x.to(CUDA, memory_format=torch.channels_last)
        expected = distiller.student.eval()(x_cuda).cpu()
        torch.testing.assert_close(student.eval()(x), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- runs of the script

@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, str]:
    """The demo's digits, packed, and a teacher weights file for them."""
    root = tmp_path_factory.mktemp("cuda_demo")
    data = str(root / "demo_data")
    prepare_demo_data(data)
    torch.manual_seed(0)
    teacher = str(root / "teacher.pth")
    torch.save(torchvision.models.resnet18(num_classes=NUM_CLASSES).state_dict(), teacher)
    return {"data": data, "teacher": teacher, "root": str(root)}


def demo_overrides(demo: dict[str, str], output_dir: str, **changes: object) -> list[str]:
    values: dict[str, object] = {
        "data.data_path": demo["data"], "data.input_size": (3, 32, 32), "data.batch_size": 64,
        "data.num_workers": 2, "model.num_classes": NUM_CLASSES, "model.teacher": "resnet18",
        "model.teacher_weights": demo["teacher"], "train_params.epochs": 2,
        "train_params.print_freq": 10, "train_params.use_seed": True,
        "train_params.eval_teacher": False, "train_params.output_dir": output_dir,
        # A small step and soft term keep training stable: with the random teacher, lr 0.05 and
        # alpha * T^2 = 10 the loss climbs, and a run that chaotic magnifies any rounding.
        "optim.init_lr": 0.005, "distill.alpha": 1.0, "dist.nprocs": 1,
    }
    values.update({key.replace("__", "."): value for key, value in changes.items()})
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def cuda_run(demo) -> str:
    """A seeded 2-epoch run on one GPU (bf16, channels-last: the defaults there)."""
    out = os.path.join(demo["root"], "run")
    assert script.main(demo_overrides(demo, out)) == 0
    return out


def evaluate_json(argv: list[str], capsys) -> dict:
    assert script.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_on_cuda_and_on_the_cpu_agree(cuda_run, demo, capsys, monkeypatch):
    """One checkpoint, --evaluate on the GPU (bf16) and on the CPU (float32): top-1 errors
    within 0.5 points on the demo's validation set, give or take two images whose top two
    logits are closer than bf16 resolves (the barely trained network has many such margins)."""
    argv = ["--evaluate", os.path.join(cuda_run, CHECKPOINT_NAME), *demo_overrides(demo, cuda_run)]
    on_gpu = evaluate_json(argv, capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = evaluate_json(argv, capsys)
    assert on_gpu["images"] == on_cpu["images"] > 300
    allowed = max(0.5, 300 / on_gpu["images"])
    assert abs(on_gpu["top1_err"] - on_cpu["top1_err"]) <= allowed, (on_gpu, on_cpu)
    logged = read_metrics(os.path.join(cuda_run, METRICS_NAME))[-1]["val_top1_err"]
    assert abs(on_gpu["top1_err"] - logged) <= 100 / on_gpu["images"]  # the run's own validation


def test_resumed_cuda_run_ends_where_the_uninterrupted_one_ends(cuda_run, demo, tmp_path):
    """Stopped after epoch 1 and resumed on the GPU, a seeded run ends with the uninterrupted
    run's weights, to within 1% of how far epoch 2 moved them.

    Why not to the bit: seeded runs pick deterministic cuDNN kernels, but a few kernels have no
    deterministic CUDA version and run anyway under warn_only (adaptive average pooling's
    backward adds with atomics), so two runs differ by roundings that training carries along. Losing
    the optimizer's momentum, the schedule or the generators' state on resume would move the
    weights by a sizeable part of a whole epoch's update instead.
    """
    out = str(tmp_path / "resumed")
    assert script.main(demo_overrides(demo, out, train_params__epochs=1)) == 0
    after_epoch_1 = load_checkpoint(os.path.join(out, CHECKPOINT_NAME))["state_dict"]
    assert script.main(demo_overrides(demo, out, optim__resume_path="auto")) == 0
    resumed = load_checkpoint(os.path.join(out, CHECKPOINT_NAME))
    expected = load_checkpoint(os.path.join(cuda_run, CHECKPOINT_NAME))
    assert resumed["epoch"] == expected["epoch"] == 2

    def flat(state: dict, keys: list[str]) -> torch.Tensor:
        return torch.cat([state[key].double().flatten() for key in keys])

    keys = [k for k, v in expected["state_dict"].items() if v.is_floating_point()]
    end, start = flat(expected["state_dict"], keys), flat(after_epoch_1, keys)
    difference = (flat(resumed["state_dict"], keys) - end).norm().item()
    epoch_2_update = (end - start).norm().item()
    assert epoch_2_update > 0
    assert difference <= 0.01 * epoch_2_update, (difference, epoch_2_update)
    for key, value in expected["state_dict"].items():
        if not value.is_floating_point():  # BatchNorm's batch counts
            assert torch.equal(resumed["state_dict"][key], value), key
    records, reference = (read_metrics(os.path.join(d, METRICS_NAME)) for d in (out, cuda_run))
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["lr"] for r in records] == [r["lr"] for r in reference]
    assert abs(records[1]["val_top1_err"] - reference[1]["val_top1_err"]) <= 1.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA devices")
def test_two_nccl_processes_validate_as_evaluate_does(demo, tmp_path, capsys):
    """The spawn launcher, 2 NCCL processes, end to end; their validation is --evaluate's."""
    out = str(tmp_path / "two")
    argv = demo_overrides(demo, out, dist__nprocs=2, train_params__epochs=1)
    assert script.main(argv) == 0
    last = read_metrics(os.path.join(out, METRICS_NAME))[-1]
    evaluated = evaluate_json(["--evaluate", os.path.join(out, CHECKPOINT_NAME), *argv], capsys)
    assert evaluated["images"] == last["val_images"]
    # bf16 logits from other batch compositions can flip an image whose top two are a tie.
    assert abs(evaluated["top1_err"] - last["val_top1_err"]) <= 100 / evaluated["images"]
    assert evaluated["loss"] == pytest.approx(last["val_loss"], rel=1e-2)


# ----------------------------------------------------------------------------- fused SGD in fp16

def test_a_skipped_first_fused_fp16_step_leaves_momentum_as_foreach_sgd_does(monkeypatch):
    """build_sgd's fused SGD, fp16 under a grad scaler whose first step overflows, with new
    tensors holding a huge value (as reused allocator memory may): after two finite steps the
    parameters are foreach SGD's."""
    from torch import nn

    from utils.device import build_sgd

    def run(kernels: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(CUDA)
        if kernels == "fused":
            optimizer, described = build_sgd(model.parameters(), default_cfg.optim, CUDA)
            assert described == "fused SGD"
        else:
            o = default_cfg.optim
            optimizer = torch.optim.SGD(model.parameters(), lr=o.init_lr, momentum=o.momentum,
                                        weight_decay=o.weight_decay, nesterov=o.nesterov,
                                        foreach=True)
        scaler = torch.amp.GradScaler(CUDA.type, init_scale=2.0**40, backoff_factor=2.0**-30)
        real_empty_like = torch.empty_like
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty_like",
                          lambda *a, **k: real_empty_like(*a, **k).fill_(1e29))
            inputs = torch.linspace(-1, 1, 8 * 64, device=CUDA).reshape(8, 64)
            for _ in range(3):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(CUDA.type, dtype=torch.float16):
                    loss = model(inputs).float().square().mean()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        assert scaler.get_scale() == 2.0**10  # the first step overflowed, the next two did not
        return [p.detach().cpu() for p in model.parameters()]

    for p, q in zip(run("fused"), run("foreach")):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the distributed path

def test_the_distributed_path_runs_on_one_gpu_in_a_one_process_nccl_group(demo, tmp_path,
                                                                           monkeypatch):
    """A 1-rank NCCL group makes the script take its multi-process path on one GPU: the DDP
    wrap (the script calls DistributedDataParallel(distiller, device_ids=[0])), NCCL
    all-reduces of the sums, broadcast_buffers, barriers, the stop agreement over its own gloo
    group, and a mid-epoch checkpoint at each of its polls (checkpoint_every_min tiny). The
    run ends as the run without a group does, to within cuDNN's rounding."""
    wrapped = []
    real_ddp = script.DistributedDataParallel

    def counting_ddp(module, *args, **kwargs):
        wrapped.append(kwargs.get("device_ids"))
        return real_ddp(module, *args, **kwargs)

    monkeypatch.setattr(script, "DistributedDataParallel", counting_ddp)
    out = str(tmp_path / "grouped")
    argv = demo_overrides(demo, out, train_params__epochs=1,
                          train_params__checkpoint_every_min=1e-9)
    proc = distributed.ProcessInfo(init_method=f"tcp://127.0.0.1:{distributed.find_free_port()}")
    distributed.init_process_group(proc, "nccl", timeout_s=60, device=CUDA)
    try:
        assert distributed.is_distributed()
        assert script.main(argv) == 0
    finally:
        distributed.cleanup()  # the script cleans up too; this covers a failure before that
    assert wrapped == [[0]]
    with open(os.path.join(out, "log.txt"), encoding="utf-8") as log:
        assert any(line.startswith("Checkpoint at epoch 1, step") for line in log)
    grouped = read_metrics(os.path.join(out, METRICS_NAME))[-1]
    alone_out = str(tmp_path / "alone")
    assert script.main(demo_overrides(demo, alone_out, train_params__epochs=1)) == 0
    alone = read_metrics(os.path.join(alone_out, METRICS_NAME))[-1]
    assert grouped["val_images"] == alone["val_images"]
    assert abs(grouped["val_top1_err"] - alone["val_top1_err"]) <= 1.0
    assert grouped["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-2)
