"""Distil a frozen teacher into a student on ImageNet with weighted soft labels (WSLD, ICLR 2021).

    python3 train_with_distillation.py data.data_path=/data/imagenet          # every visible GPU
    torchrun --nproc_per_node=8 train_with_distillation.py data.data_path=/data/imagenet
    python3 train_with_distillation.py --cfg my_cfg.py optim.init_lr=0.2       # another config module
    python3 train_with_distillation.py --evaluate output/resnet/model_best.pth.tar data.data_path=...

Defaults come from imagenet_train_cfg.py; ``key.sub=value`` arguments override any key. The
configuration is checked, and the data and weights looked for, before any process starts, so
a mistake costs one line and a second rather than a traceback per process.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dataset.demo_data import prepare_demo_data
from dataset.imagenet_data import AUGMENTATIONS, DATA_TYPES, DECODERS, ImageNet12, ShardSampler
from dataset.prefetch_data import DevicePrefetcher
from knowledge_distiller import LOSS_METHODS, WSLDistiller, build_loss, freeze
from models import MODEL_NAMES, NET_TYPES, build_model, load_weights, teacher_student_names
from utils import distributed
from utils.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    resolve_resume_path,
    restore_rng_state,
    save_checkpoint,
)
from utils.compile import backend_of, compile_failures_as_errors, compile_in_place
from utils.config import AttrDict, ConfigError, apply_overrides, load_config_file, require_choice
from utils.data_wait import DataWaitTimer, wait_share
from utils.demo import DEMO_CONFIG, run_demo
from utils.device import build_sgd, choose_precision, configure_backends, load_optimizer_state
from utils.errors import DataError, UserError, one_line
from utils.files import atomic_write_text
from utils.logger import RunLogger, print_error
from utils.metrics import all_reduce_sums, error_percent, topk_correct
from utils.preemption import PREEMPTED_EXIT_CODE, Preempted, StepAgreement

AMP_MODES = ("auto", "bf16", "fp16", "off")
LR_SCHEDULES = ("step", "cosine")
CONFIG_NAME = "config.json"


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the message is one line."""


# ----------------------------------------------------------------------------- configuration

def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Weighted soft label distillation (WSLD) on ImageNet.",
        epilog="Overrides: any key of the config as key.sub=value, e.g. optim.init_lr=0.2 "
               "data.data_path=/data/imagenet dist.nprocs=2.")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config values to change (Python literals, else strings)")
    parser.add_argument("--cfg", metavar="FILE.py", default="",
                        help="config module to use instead of imagenet_train_cfg.py")
    parser.add_argument("--demo", action="store_true",
                        help="train the paper's three rows in miniature on bundled digit images "
                             "(configs/demo_cfg.py; overrides apply to every row)")
    parser.add_argument("--methods", metavar="M,M", default="",
                        help="with --demo: add a student row per distill.method, e.g. kd,dkd,dist")
    parser.add_argument("--evaluate", metavar="CKPT", default="",
                        help="evaluate a student checkpoint (or 'teacher', the configured teacher) "
                             "on the validation set in one process, then exit")
    return parser


def load_config(args: argparse.Namespace) -> AttrDict:
    """The effective config: the defaults or --cfg's module, then the command-line overrides."""
    if args.cfg:
        cfg = load_config_file(args.cfg)
    else:
        from imagenet_train_cfg import cfg as defaults

        cfg = copy.deepcopy(defaults)
    return apply_overrides(cfg, args.overrides)


def resolve_config(cfg: AttrDict) -> AttrDict:
    """A copy of cfg with the values it derives from others filled in, once.

    The teacher and student names follow net_type unless set, and the output folder defaults
    to ./output/<net_type>; everything downstream reads the resolved values. The caller's cfg
    is left as it was given.
    """
    require_choice("net_type", cfg.net_type, NET_TYPES)
    cfg = copy.deepcopy(cfg)
    cfg.model.teacher, cfg.model.student = teacher_student_names(cfg.net_type, cfg.model.teacher,
                                                                 cfg.model.student)
    if not cfg.train_params.output_dir:
        cfg.train_params.output_dir = os.path.join("output", cfg.net_type)
    return cfg


def check_config(cfg: AttrDict, world_size: int) -> None:
    """Raise ConfigError for values that would fail later, inside every process."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for key, value, choices in (
            ("train_params.amp", cfg.train_params.amp, AMP_MODES),
            ("optim.lr_schedule", cfg.optim.lr_schedule, LR_SCHEDULES),
            ("distill.method", cfg.distill.method, LOSS_METHODS),
            ("data.train_data_type", cfg.data.train_data_type, DATA_TYPES),
            ("data.val_data_type", cfg.data.val_data_type, DATA_TYPES),
            ("data.type_of_data_aug", cfg.data.type_of_data_aug, AUGMENTATIONS),
            ("data.decoder", cfg.data.decoder, DECODERS),
            ("net_type", cfg.net_type, NET_TYPES)):
        require_choice(key, value, choices)
    for role in ("teacher", "student"):  # '' follows net_type
        if cfg.model[role]:
            require_choice(f"model.{role}", cfg.model[role], MODEL_NAMES)

    batch = cfg.data.batch_size
    require(isinstance(batch, int) and batch > 0, f"data.batch_size must be a positive integer, got {batch!r}")
    require(batch % world_size == 0,
            f"data.batch_size={batch} (the global batch) does not divide among {world_size} processes; "
            f"use a multiple of {world_size}")
    require(cfg.optim.init_lr > 0, f"optim.init_lr must be positive, got {cfg.optim.init_lr}")
    require(cfg.optim.lr_step_epochs > 0, f"optim.lr_step_epochs must be positive, got {cfg.optim.lr_step_epochs}")
    restart = cfg.optim.cosine.restart
    require(len(restart.lr_step) == len(restart.lr_period) > 0 and restart.lr_step[0] == 0
            and all(p > 0 for p in restart.lr_period),
            "optim.cosine.restart needs lr_step (starting at 0) and positive lr_period of the same length")
    require(isinstance(cfg.train_params.epochs, int) and cfg.train_params.epochs >= 0,
            f"train_params.epochs must be a non-negative integer, got {cfg.train_params.epochs!r}")
    require(cfg.train_params.print_freq > 0, "train_params.print_freq must be positive")
    workers = cfg.data.num_workers
    require(workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0),
            f"data.num_workers must be 'auto' or a non-negative integer, got {workers!r}")
    require(cfg.train_params.checkpoint_every_min >= 0,
            "train_params.checkpoint_every_min must be 0 (checkpoints at epoch ends only) or positive")
    require(len(cfg.data.input_size) == 3, f"data.input_size must be (3, H, W), got {cfg.data.input_size!r}")
    require(cfg.dist.timeout_s > 0, "dist.timeout_s must be positive")
    backend_of(cfg.train_params.compile)  # ConfigError for an unknown backend
    devices = torch.cuda.device_count()
    require(not (devices and cfg.dist.nprocs > devices),
            f"dist.nprocs={cfg.dist.nprocs} but this machine has {devices} CUDA devices; use at most {devices} "
            f"(0 means one process per device)")
    torchrun = distributed.torchrun_process()
    require(not (devices and torchrun is not None and torchrun.local_world_size > devices),
            f"torchrun started {torchrun.local_world_size if torchrun else 0} processes on a machine with {devices} "
            f"CUDA devices; use --nproc_per_node={devices} or fewer")
    make_loss(cfg)  # ConfigError for a bad temperature or alpha


def check_inputs(cfg: AttrDict) -> None:
    """Look for the data, the weights and the checkpoint to resume, once per machine, before training.

    Loading the teacher here also fetches official weights once rather than in every process.
    """
    data = open_data(cfg, num_workers=0)
    data.train_set()[0]  # opens the LMDB or folder and decodes an image: the data is really there
    data.val_set()[0]
    if needs_teacher(cfg):
        build_model(cfg.model.teacher, cfg.model.num_classes, cfg.model.teacher_weights)
    if cfg.model.student_weights:
        build_model(cfg.model.student, cfg.model.num_classes, cfg.model.student_weights)
    output_dir = cfg.train_params.output_dir
    resume = resolve_resume_path(cfg.optim.if_resume, cfg.optim.resume_path, output_dir)
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        if "optimizer" not in checkpoint or "epoch" not in checkpoint:
            raise CheckpointError(f"'{resume}' holds weights but no training state; resume from a "
                                  f"checkpoint.pth.tar this script wrote, or pass it as model.student_weights")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create train_params.output_dir '{output_dir}' ({exc.strerror}); "
                          "choose a writable folder") from None


# ----------------------------------------------------------------------------- building blocks

def make_loss(cfg: AttrDict) -> nn.Module:
    smoothing = cfg.optim.smooth_alpha if cfg.optim.label_smooth else 0.0
    return build_loss(cfg.distill.method, cfg.distill.temperature, cfg.distill.alpha,
                      cfg.model.num_classes, smoothing)


def needs_teacher(cfg: AttrDict, loss: nn.Module | None = None) -> bool:
    """Whether a teacher is built: the loss needs one, or its evaluation is asked for."""
    return (loss or make_loss(cfg)).needs_teacher or bool(cfg.train_params.eval_teacher)


def memory_format_for(device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA, where convolutions run faster in it; the default elsewhere."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def reset_peak_memory(device: torch.device) -> None:
    """Start peak_memory_gib's count afresh (each epoch), so that warm-up does not hide in it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory tensors have held on a CUDA device since reset_peak_memory; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def on_device(loader: Any, device: torch.device, cfg: AttrDict) -> DevicePrefetcher:
    """loader's batches moved to device and normalised there, in the networks' memory format."""
    return DevicePrefetcher(loader, device, cfg.data.mean, cfg.data.std,
                            memory_format_for(device) == torch.channels_last)


def open_data(cfg: AttrDict, num_workers: int) -> ImageNet12:
    """The train and validation data of cfg.data, read by num_workers loader processes each."""
    root = cfg.data.data_path
    if not os.path.isdir(root):
        raise DataError(f"data.data_path '{root}' is not a folder; point it at the folder that "
                        f"holds train/, val/ and the list files")
    return ImageNet12(os.path.join(root, "train"), os.path.join(root, "val"), num_workers,
                      cfg.data.type_of_data_aug, cfg.data, seed=cfg.train_params.seed)


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train_params.amp on device (see utils.device.choose_precision)."""
    return choose_precision(setting, device).dtype


def lr_at_epoch(epoch: int, optim_cfg: AttrDict, epochs: int) -> float:
    """The learning rate of a 0-based epoch: step decay, cosine, or cosine with warm restarts."""
    init_lr, min_lr = optim_cfg.init_lr, optim_cfg.min_lr
    if optim_cfg.lr_schedule == "step":
        return init_lr * optim_cfg.lr_decay ** (epoch // optim_cfg.lr_step_epochs)
    if optim_cfg.cosine.use_restart:
        restart = optim_cfg.cosine.restart
        cycle = max(i for i, start in enumerate(restart.lr_step) if start <= epoch)
        progress = min(1.0, (epoch - restart.lr_step[cycle]) / restart.lr_period[cycle])
    else:
        progress = epoch / max(1, epochs)
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: AttrDict, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """An epoch-based schedule, stepped once per epoch; its state is plain numbers."""
    def factor(epoch: int) -> float:
        return lr_at_epoch(epoch, optim_cfg, epochs) / optim_cfg.init_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def run_seed(cfg: AttrDict, device: torch.device) -> int:
    """train_params.seed in a seeded run; otherwise a fresh one drawn by rank 0 for every process,
    so that unseeded runs differ from one another yet all processes shuffle alike."""
    if cfg.train_params.use_seed:
        return int(cfg.train_params.seed)
    drawn = random.SystemRandom().randrange(2 ** 62) if distributed.get_rank() == 0 else 0
    return int(distributed.all_reduce_sum(torch.tensor(drawn, dtype=torch.int64, device=device)).item())


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Distinct for every (epoch, rank) pair of jobs with fewer than 10,000 processes."""
    return seed + 10_000 * (epoch + 1) + rank


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


# ----------------------------------------------------------------------------- training and validation

# Called after each training step with (steps done, steps in the epoch, a function returning this
# process's running sums): where a signal stops the run and a time-based checkpoint is written.
StepHook = Callable[[int, int, Callable[[], list[float]]], None]
NO_SUMS = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # loss, top-1 and top-5 correct, images, seconds, data wait


def train_one_epoch(model: nn.Module, loader: DevicePrefetcher, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, epoch: int, epochs: int,
                    cfg: AttrDict, log: RunLogger, start_step: int = 0, start_sums: Sequence[float] = NO_SUMS,
                    at_step_end: StepHook | None = None) -> dict[str, Any]:
    """One pass over the training data; returns the epoch's loss and errors summed over all processes.

    Per-step numbers stay on the device and are read every print_freq steps, so the GPU is not
    made to wait for the CPU each step. Every step's loss is checked for finiteness on the
    device, and the first bad step is reported at the next read, before any checkpoint is written.
    The time spent waiting for batches is the host's (utils/data_wait.py), read at the same points.
    A resumed epoch starts at start_step (the loader yields only the steps left) with this
    process's running sums as they were saved.
    """
    model.train()
    device = next(model.parameters()).device
    parameters = [p for p in model.parameters() if p.requires_grad]
    steps = len(loader) + start_step
    if cfg.train_params.max_steps_per_epoch > 0:
        steps = min(steps, cfg.train_params.max_steps_per_epoch)
    world_size = distributed.get_world_size()
    print_freq = cfg.train_params.print_freq
    clip = cfg.optim.grad_clip if cfg.optim.use_grad_clip else None

    loss_sum, top1_sum, top5_sum = (torch.tensor(v, dtype=torch.float64, device=device) for v in start_sums[:3])
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    images_seen = int(start_sums[3])
    last, last_images, last_step = list(start_sums[:3]), images_seen, start_step  # at the previous log line
    batches = DataWaitTimer(itertools.islice(loader, steps - start_step))
    batches.seconds = last_wait = start_sums[5]
    window_start = time.perf_counter()
    start = window_start - start_sums[4]

    def running_sums() -> list[float]:
        """This process's sums so far (one read of the device), after the loss check."""
        *totals, bad_step = torch.stack([loss_sum, top1_sum, top5_sum, first_bad_step.double()]).tolist()
        raise_if_non_finite(int(bad_step), epoch)
        return [*totals, float(images_seen), time.perf_counter() - start, batches.seconds]

    for step, (images, target) in enumerate(batches, start=start_step):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, loss = model(images, target)
        bad = ~torch.isfinite(loss.detach())
        first_bad_step = torch.where(bad & (first_bad_step < 0), step, first_bad_step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        scaler.step(optimizer)
        scaler.update()

        batch = target.shape[0]
        correct1, correct5 = topk_correct(logits.detach(), target)
        loss_sum += loss.detach().double() * batch
        top1_sum += correct1
        top5_sum += correct5
        images_seen += batch

        if (step + 1) % print_freq == 0 or step + 1 == steps:
            # One read of the device for the sums and the loss check.
            *totals, bad_step = torch.stack([loss_sum, top1_sum, top5_sum, first_bad_step.double()]).tolist()
            raise_if_non_finite(int(bad_step), epoch)
            now = time.perf_counter()
            n = images_seen - last_images
            speed = n * world_size / max(now - window_start, 1e-9)
            per_step = (now - start) / (step + 1)
            epoch_eta = per_step * (steps - step - 1)
            run_eta = epoch_eta + per_step * steps * (epochs - epoch - 1)
            wait = batches.seconds - last_wait  # host time in next(): no device sync needed
            log.info(f"Epoch: [{epoch + 1}/{epochs}][{step + 1}/{steps}]  speed {speed:.1f} img/s  "
                     f"data wait {1000 * wait / (step + 1 - last_step):.1f} ms/step "
                     f"({100 * wait_share(wait, now - window_start):.0f}%)  "
                     f"loss {(totals[0] - last[0]) / n:.4f} ({totals[0] / images_seen:.4f})  "
                     f"top-1 err {error_percent(totals[1] - last[1], n):.2f} "
                     f"({error_percent(totals[1], images_seen):.2f})  "
                     f"top-5 err {error_percent(totals[2] - last[2], n):.2f} "
                     f"({error_percent(totals[2], images_seen):.2f})  "
                     f"lr {optimizer.param_groups[0]['lr']:.6g}  "
                     f"ETA {format_duration(epoch_eta)} (run {format_duration(run_eta)})")
            last, last_images, last_step, last_wait = totals, images_seen, step + 1, batches.seconds
            window_start = now
        if at_step_end is not None:
            at_step_end(step + 1, steps, running_sums)

    local_sums = running_sums()
    seconds = local_sums[4]
    sums = all_reduce_sums({"loss": loss_sum, "top1": top1_sum, "top5": top5_sum,
                            "images": images_seen, "seconds": seconds, "wait": batches.seconds}, device)
    return {"loss": sums["loss"] / max(sums["images"], 1),
            "top1_err": error_percent(sums["top1"], sums["images"]),
            "top5_err": error_percent(sums["top5"], sums["images"]),
            "images": sums["images"], "seconds": seconds,
            "data_wait_share": wait_share(sums["wait"], sums["seconds"]),
            "images_per_second": sums["images"] / max(sums["seconds"] / world_size, 1e-9),
            "steps": steps, "local_sums": local_sums}


def raise_if_non_finite(first_bad_step: int, epoch: int) -> None:
    """first_bad_step: the 0-based step of the epoch whose loss was not finite, or -1."""
    if first_bad_step >= 0:
        raise non_finite(f"loss at epoch {epoch + 1}, step {first_bad_step + 1}")


def non_finite(what: str) -> TrainingError:
    return TrainingError(f"non-finite {what}; training stopped and the last checkpoint was kept. "
                         "Lower optim.init_lr or enable optim.use_grad_clip")


@torch.inference_mode()
def validate(model: nn.Module, loader: DevicePrefetcher, amp_dtype: torch.dtype | None,
             stop_requested: Callable[[int], bool] | None = None) -> dict[str, float] | None:
    """Loss and top-1/top-5 error over the whole validation set, exactly, under any number of processes.

    Each process sees a disjoint shard with no padding; summed losses, correct counts and image
    counts are all-reduced, so the result is the one a single process gets. stop_requested(i)
    is asked after batch i; True abandons validation and returns None.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    images = 0
    for i, (batch_images, target) in enumerate(loader):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch_images)
        loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").double()
        correct1, correct5 = topk_correct(logits, target)
        top1 += correct1
        top5 += correct5
        images += target.shape[0]
        if stop_requested is not None and stop_requested(i):
            model.train(was_training)
            return None
    model.train(was_training)
    sums = all_reduce_sums({"loss": loss_sum, "top1": top1, "top5": top5, "images": images}, device)
    count = sums["images"]
    return {"loss": sums["loss"] / count if count else float("nan"),
            "top1_err": error_percent(sums["top1"], count),
            "top5_err": error_percent(sums["top5"], count), "images": int(count)}


def describe(stats: dict[str, float]) -> str:
    return (f"top-1 err {stats['top1_err']:.3f}  top-5 err {stats['top5_err']:.3f}  "
            f"loss {stats['loss']:.4f}  ({stats['images']} images)")


# ----------------------------------------------------------------------------- one process of the job

def select_device(proc: distributed.ProcessInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(proc.local_rank)
        return torch.device("cuda", proc.local_rank)
    return torch.device("cpu")


def configure_process(proc: distributed.ProcessInfo, cfg: AttrDict, device: torch.device) -> None:
    """Threads, cuDNN and determinism settings, then the process group."""
    if device.type == "cpu":
        torch.set_num_threads(distributed.cpu_threads_per_process(proc.local_world_size))
    configure_backends(device, deterministic=cfg.train_params.use_seed)
    backend = cfg.dist.backend or distributed.default_backend(device)
    distributed.init_process_group(proc, backend, cfg.dist.timeout_s)


def training_process(proc: distributed.ProcessInfo, cfg: AttrDict) -> None:
    """The whole training job as seen by one process."""
    started_by_torchrun = distributed.torchrun_process() is not None
    # The signal handlers first: a signal during start-up stops the run after its first step.
    with StepAgreement(cfg.train_params.checkpoint_every_min) as agreement:
        if started_by_torchrun and proc.local_rank == 0:
            check_inputs(cfg)  # once per machine; the machine's other processes wait at the barrier
        device = select_device(proc)
        configure_process(proc, cfg, device)
        if started_by_torchrun:
            distributed.barrier()
        log = RunLogger(cfg.train_params.output_dir, enabled=proc.is_main, quiet=cfg.train_params.quiet)
        stopped = None
        try:
            with compile_failures_as_errors():
                train(proc, cfg, device, log, agreement)
        except UserError as exc:
            log.to_file(f"error: {one_line(exc)}")  # printed once, by whoever launched the job
            raise
        except Preempted as exc:
            stopped = Preempted(exc.message)  # without the traceback, which holds the loaders
        finally:
            log.close()
            distributed.cleanup()
        if stopped is not None:
            # The loaders, freed with train()'s frames, end their workers now: left to the exit
            # handlers, workers killed while the process ends would fail it.
            gc.collect()
            raise stopped


@dataclass
class Progress:
    """Where training stands: what a checkpoint carries besides weights and optimizer state."""

    epochs_done: int = 0
    best_top1_err: float = math.inf
    best_top5_err: float = math.inf  # at the epoch of the best top-1, as the original reports it
    step: int = 0  # steps done in the next epoch (0 at an epoch's end)
    seed: int = 0  # the run's seed: the data order and every augmentation come from it
    epoch_sums: tuple[tuple[float, ...], ...] = ()  # each process's running sums at that step


def build_networks(cfg: AttrDict, device: torch.device) -> tuple[nn.Module | None, WSLDistiller]:
    """The teacher (None when neither the loss nor its evaluation needs it) and the distiller."""
    memory_format = memory_format_for(device)
    loss = make_loss(cfg)
    teacher = None
    if needs_teacher(cfg, loss):
        teacher = build_model(cfg.model.teacher, cfg.model.num_classes, cfg.model.teacher_weights)
        teacher = freeze(teacher.to(device, memory_format=memory_format))
    student = build_model(cfg.model.student, cfg.model.num_classes, cfg.model.student_weights or None)
    distiller = WSLDistiller(teacher if loss.needs_teacher else None, student, loss)
    return teacher, distiller.to(device, memory_format=memory_format)


def resume(path: str, student: nn.Module, arch: str, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
           restore_rng: bool) -> Progress:
    """Restore everything a checkpoint of this script holds; returns where training stands."""
    checkpoint = load_checkpoint(path)
    load_weights(student, checkpoint, arch)
    load_optimizer_state(optimizer, checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler.is_enabled() and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    # An empty scaler state comes from a bf16 or full-precision run: resumed in fp16, the scaler
    # starts afresh.
    if restore_rng:
        restore_rng_state(checkpoint["rng"])
    sums = checkpoint.get("epoch_sums")
    return Progress(int(checkpoint["epoch"]), float(checkpoint["best_top1_err"]),
                    float(checkpoint["best_top5_err"]), int(checkpoint.get("step", 0)),
                    int(checkpoint.get("seed", 0)), tuple(map(tuple, sums.tolist())) if sums is not None else ())


def checkpoint_state(student: nn.Module, arch: str, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                     progress: Progress, cfg: AttrDict) -> dict[str, Any]:
    """A checkpoint as the original laid it out (weights under 'state_dict'), plus all resume needs."""
    return {"state_dict": student.state_dict(), "arch": arch, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": progress.epochs_done,
            "best_top1_err": progress.best_top1_err, "best_top5_err": progress.best_top5_err,
            "step": progress.step, "seed": progress.seed,
            "epoch_sums": torch.tensor(progress.epoch_sums, dtype=torch.float64).reshape(-1, len(NO_SUMS)),
            "config": cfg.to_dict(), "rng": capture_rng_state()}


def sums_of_rank(epoch_sums: Sequence[Sequence[float]], rank: int, world_size: int) -> Sequence[float]:
    """A process's saved running sums; under another process count, rank 0 takes the totals
    (the epoch's metrics stay right; its batches are then not exactly the interrupted run's)."""
    if len(epoch_sums) == world_size:
        return epoch_sums[rank]
    return [sum(column) for column in zip(*epoch_sums)] if rank == 0 and epoch_sums else NO_SUMS


def write_config(cfg: AttrDict, output_dir: str) -> None:
    atomic_write_text(os.path.join(output_dir, CONFIG_NAME), json.dumps(cfg.to_dict(), indent=2) + "\n")


def train(proc: distributed.ProcessInfo, cfg: AttrDict, device: torch.device, log: RunLogger,
          agreement: StepAgreement) -> None:
    tp, world_size = cfg.train_params, max(1, proc.world_size)
    log.info("Effective configuration:\n" + json.dumps(cfg.to_dict(), indent=2))
    if proc.is_main:
        write_config(cfg, tp.output_dir)
    batch_size = cfg.data.batch_size // world_size
    log.info(f"{world_size} process(es) on {device.type}, {batch_size} images each per step")

    data = open_data(cfg, distributed.loader_workers_per_process(cfg.data.num_workers, proc.local_world_size))
    # Augmentations draw from per-sample generators (dataset.sampling), not the workers' own.
    train_loader = data.getTrainLoader(batch_size)
    log.info(f"JPEG decoding: {data.describe_decoder()}; {data.num_workers} loader workers per process")
    train_data, val_data = on_device(train_loader, device, cfg), on_device(data.getTestLoader(batch_size), device, cfg)
    precision = choose_precision(tp.amp, device)
    if precision.warning:
        log.summary(f"warning: {precision.warning}")
    amp_dtype = precision.dtype

    if tp.use_seed:
        seed_everything(tp.seed)  # the same initial weights in every process and every run
    teacher, distiller = build_networks(cfg, device)
    student, student_name = distiller.student, cfg.model.student
    log.info(f"Teacher {cfg.model.teacher if distiller.teacher is not None else '(none)'}, student {student_name}, "
             f"loss {distiller.loss}")
    backend = backend_of(tp.compile)
    if backend is not None:  # in place: checkpoints keep torchvision's keys
        compile_in_place([student, distiller.teacher], backend)
        log.info(f"torch.compile ({backend}): the student and the teacher's forward, at their first steps")
    optimizer, kernels = build_sgd(student.parameters(), cfg.optim, device)
    log.info(f"Precision {precision.describe()}; optimizer {kernels}")
    scheduler = make_scheduler(optimizer, cfg.optim, tp.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    progress = Progress(seed=run_seed(cfg, device))
    resume_path = resolve_resume_path(cfg.optim.if_resume, cfg.optim.resume_path, tp.output_dir)
    if resume_path is not None:
        # Only the main process's generators were saved; seeded runs reseed every epoch anyway.
        progress = resume(resume_path, student, student_name, optimizer, scheduler, scaler, restore_rng=proc.is_main)
        log.info(f"Resumed from '{resume_path}' at epoch {progress.epochs_done + 1}, step {progress.step}")
    train_loader.sampler.seed = progress.seed
    log.start_metrics(progress.epochs_done)

    model: nn.Module = distiller
    if distributed.is_distributed():
        model = DistributedDataParallel(distiller, device_ids=[device.index] if device.type == "cuda" else None)

    if tp.eval_teacher and teacher is not None:
        log.info(f"Teacher network performance: {describe(validate(teacher, val_data, amp_dtype))}")
    teacher = None  # the distiller keeps it when the loss needs it

    def save_position(epoch: int, step: int, sums: list[float]) -> str:
        """A checkpoint inside epoch after step steps, with every process's running sums."""
        rows = torch.zeros((world_size, len(NO_SUMS)), dtype=torch.float64, device=device)
        rows[proc.rank] = torch.tensor(sums, dtype=torch.float64)
        progress.epochs_done, progress.step = epoch, step
        progress.epoch_sums = tuple(map(tuple, distributed.all_reduce_sum(rows).tolist()))
        path = os.path.join(tp.output_dir, CHECKPOINT_NAME)
        if proc.is_main:
            save_checkpoint(checkpoint_state(student, student_name, optimizer, scheduler, scaler, progress, cfg),
                            tp.output_dir, is_best=False)
        distributed.barrier()  # nobody stops before the file is complete
        agreement.checkpoint_written()
        return path

    def stop(epoch: int, step: int, steps: int) -> None:
        where = f"after epoch {epoch}" if step == 0 else f"at epoch {epoch + 1}, step {step}/{steps}"
        message = (f"Stopped by {agreement.signal_name} {where}; checkpoint saved in "
                   f"'{os.path.join(tp.output_dir, CHECKPOINT_NAME)}'. To resume, run the same command with "
                   f"optim.resume_path=auto (exit status {PREEMPTED_EXIT_CODE})")
        log.summary(message)
        raise Preempted(message)

    def at_step_end(epoch: int, step: int, steps: int, sums: Callable[[], list[float]]) -> None:
        decision = agreement.poll(checkpoints=step < steps)  # an epoch's end has its own checkpoint
        if decision.stop or decision.checkpoint:
            path = save_position(epoch, step, sums())
            if not decision.stop:
                log.info(f"Checkpoint at epoch {epoch + 1}, step {step}/{steps}: '{path}'")
        if decision.stop:
            stop(epoch, step, steps)

    # The smallest validation shard's batch count: every process polls after as many batches.
    val_polls = math.ceil(len(ShardSampler(data.test_num_examples or 0, world_size, world_size - 1)) / batch_size)
    first_epoch = progress.epochs_done
    for epoch in range(first_epoch, tp.epochs):
        resumed = epoch == first_epoch and progress.step > 0
        start_step = progress.step if resumed else 0
        start_sums = sums_of_rank(progress.epoch_sums, proc.rank, world_size) if resumed else NO_SUMS
        if tp.use_seed:
            seed_everything(epoch_seed(tp.seed, epoch, proc.rank))
        train_loader.sampler.set_epoch(epoch, skip=start_step * batch_size)
        lr = optimizer.param_groups[0]["lr"]
        reset_peak_memory(device)
        train_stats = train_one_epoch(model, train_data, optimizer, scaler, amp_dtype, epoch, tp.epochs, cfg, log,
                                      start_step, start_sums, functools.partial(at_step_end, epoch))
        distributed.broadcast_buffers(student)  # validate, everywhere, the weights rank 0 saves
        val_stats = validate(student, val_data, amp_dtype, lambda i: i < val_polls and agreement.poll(False).stop)
        if val_stats is None:  # stopped during validation: the epoch's training is kept
            save_position(epoch, train_stats["steps"], train_stats["local_sums"])
            stop(epoch, train_stats["steps"], train_stats["steps"])
        if not math.isfinite(val_stats["loss"]):
            raise non_finite(f"validation loss after epoch {epoch + 1}")
        scheduler.step()
        log.summary(f"Validation epoch [{epoch + 1}/{tp.epochs}]  {describe(val_stats)}")

        is_best = val_stats["top1_err"] < progress.best_top1_err
        progress.epochs_done, progress.step, progress.epoch_sums = epoch + 1, 0, ()
        if is_best:
            progress.best_top1_err, progress.best_top5_err = val_stats["top1_err"], val_stats["top5_err"]
        # The record first: a kill between the two leaves a record that a resume drops and rewrites.
        log.log_epoch({
            "epoch": epoch + 1, "lr": lr,
            "train_loss": train_stats["loss"], "train_top1_err": train_stats["top1_err"],
            "train_top5_err": train_stats["top5_err"],
            "val_loss": val_stats["loss"], "val_top1_err": val_stats["top1_err"],
            "val_top5_err": val_stats["top5_err"], "val_images": val_stats["images"],
            "epoch_seconds": train_stats["seconds"], "images_per_second": train_stats["images_per_second"],
            "data_wait_share": train_stats["data_wait_share"], "peak_memory_gib": peak_memory_gib(device),
        })
        if proc.is_main:
            state = checkpoint_state(student, student_name, optimizer, scheduler, scaler, progress, cfg)
            save_checkpoint(state, tp.output_dir, is_best)
        agreement.checkpoint_written()
        if agreement.poll(checkpoints=False).stop:  # also waits for the main process's write
            stop(epoch + 1, 0, 0)
    distributed.barrier()  # nobody leaves while the main process is still writing
    log.info(f"Best accuracy (top-1 and 5 error): {progress.best_top1_err:.3f} {progress.best_top5_err:.3f}")


# ----------------------------------------------------------------------------- evaluation only

def evaluate(cfg: AttrDict, checkpoint: str | None) -> dict[str, float]:
    """Validation error of a student checkpoint file, or of the configured teacher when
    checkpoint is None, in this one process."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    configure_backends(device, deterministic=cfg.train_params.use_seed)
    precision = choose_precision(cfg.train_params.amp, device)
    if precision.warning:
        print(f"warning: {precision.warning}", file=sys.stderr, flush=True)
    workers = distributed.loader_workers_per_process(cfg.data.num_workers, local_world_size=1)
    val_loader = open_data(cfg, workers).getTestLoader(cfg.data.batch_size)
    if checkpoint is None:
        model = build_model(cfg.model.teacher, cfg.model.num_classes, cfg.model.teacher_weights)
    else:
        model = load_weights(build_model(cfg.model.student, cfg.model.num_classes), checkpoint, cfg.model.student)
    model = model.to(device, memory_format=memory_format_for(device))
    return validate(model, on_device(val_loader, device, cfg), precision.dtype)


# ----------------------------------------------------------------------------- entry point

def launch_training(cfg: AttrDict) -> None:
    """Check the config and inputs, then train in as many processes as the config asks for.

    The inputs are checked here, before any process starts, unless torchrun started this
    process: then the first process of each machine checks them (see training_process).
    """
    cfg = resolve_config(cfg)
    check_config(cfg, distributed.planned_world_size(cfg.dist.nprocs))
    if distributed.torchrun_process() is None:
        check_inputs(cfg)
    distributed.launch(training_process, (cfg,), nprocs=cfg.dist.nprocs)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_intermixed_args(argv)
    try:
        if args.demo:
            run_demo(launch_training, args.overrides, args.cfg or DEMO_CONFIG,
                     prepare=prepare_demo_data, methods=args.methods)
            return 0
        cfg = load_config(args)
        if args.evaluate:
            cfg = resolve_config(cfg)
            check_config(cfg, world_size=1)
            stats = evaluate(cfg, None if args.evaluate == "teacher" else args.evaluate)
            print(f"Evaluation of {args.evaluate}: {describe(stats)}")
            print(json.dumps({"checkpoint": args.evaluate, **stats}))
            return 0
        launch_training(cfg)
    except distributed.LaunchError as exc:
        print_error(str(exc))
        return exc.exit_code
    except UserError as exc:
        print_error(one_line(exc))
        return 2
    except Preempted:  # the log's last line says where it stopped
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
