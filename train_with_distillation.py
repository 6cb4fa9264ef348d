"""Distil a frozen teacher into a student on ImageNet with weighted soft labels (WSLD, ICLR 2021).

    python3 train_with_distillation.py data.data_path=/data/imagenet          # every visible GPU
    torchrun --nproc_per_node=8 train_with_distillation.py data.data_path=/data/imagenet
    python3 train_with_distillation.py --cfg my_cfg.py optim.init_lr=0.2     # another config module

The config, the data and the weights are checked before any process starts: a mistake costs
one line and a second, not a traceback per process.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dataset.checks import check_data
from dataset.demo_data import prepare_demo_data
from dataset.imagenet_data import batches_in_every_shard, open_imagenet
from dataset.prefetch_data import DevicePrefetcher, on_device
from knowledge_distiller import WSLDistiller, build_distiller, build_loss, build_teacher
from models import build_model, load_weights, teacher_student_names
from utils import distributed
from utils.checkpoint import (
    CHECKPOINT_NAME,
    Progress,
    checkpoint_space_warning,
    load_checkpoint,
    resolve_resume_path,
    restore_training,
    save_checkpoint,
    training_checkpoint,
)
from utils.compile import backend_of, compile_failures_as_errors, compile_in_place
from utils.config import AttrDict, apply_overrides, load_config_file
from utils.demo import DEMO_CONFIG, run_demo
from utils.device import (
    build_sgd,
    check_amp,
    check_device_count,
    choose_precision,
    configure_backends,
    configure_process,
    memory_format_for,
    peak_memory_gib,
    reset_peak_memory,
    select_device,
    shm_warning,
)
from utils.errors import ConfigError, UserError, one_line
from utils.files import atomic_write_text
from utils.logger import RunLogger, describe_validation, print_error
from utils.lr_schedule import build_scheduler, check_schedule
from utils.metrics import SUM_NAMES, StepMeter, error_percent, non_finite, topk_correct
from utils.preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption
from utils.seeding import epoch_seed, run_seed, seed_everything

CONFIG_NAME = "config.json"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_train_cfg.py")


# ----------------------------------------------------------------------------- entry and launch

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
                        help="evaluate a student checkpoint (or 'teacher', the configured "
                             "teacher) on the validation set in one process, then exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_intermixed_args(argv)
    try:
        if args.methods and not args.demo:
            raise ConfigError("--methods adds rows to --demo; add --demo")
        if args.demo:
            run_demo(launch_job, args.overrides, args.cfg or DEMO_CONFIG,
                     prepare=prepare_demo_data, methods=args.methods)
            return 0
        cfg = load_config(args)
        if args.evaluate:
            cfg = resolve_config(cfg)
            check_config(cfg, world_size=1)
            stats = evaluate(cfg, None if args.evaluate == "teacher" else args.evaluate)
            print(f"Evaluation of {args.evaluate}: {describe_validation(stats)}")
            print(json.dumps({"checkpoint": args.evaluate, **stats}))
            return 0
        launch_job(cfg)
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


def load_config(args: argparse.Namespace) -> AttrDict:
    """--cfg's module, else imagenet_train_cfg.py beside this script, loaded as recipes load it."""
    return apply_overrides(load_config_file(args.cfg or DEFAULT_CONFIG), args.overrides)


def resolve_config(cfg: AttrDict) -> AttrDict:
    """A copy of cfg with the networks and the output folder derived from net_type, once."""
    cfg = copy.deepcopy(cfg)
    cfg.model.teacher, cfg.model.student = teacher_student_names(
        cfg.net_type, cfg.model.teacher, cfg.model.student)
    if not cfg.train_params.output_dir:
        cfg.train_params.output_dir = os.path.join("output", cfg.net_type)
    return cfg


def check_config(cfg: AttrDict, world_size: int) -> nn.Module:
    """ConfigError now for what would fail later in every process. Fixed choices are checked by
    the modules that use them; returns the loss, which checks its own settings."""
    tp, batch = cfg.train_params, cfg.data.batch_size
    rules = (
        (isinstance(batch, int) and batch > 0,
         f"data.batch_size must be a positive integer, got {batch!r}"),
        (isinstance(batch, int) and batch % world_size == 0,
         f"data.batch_size={batch} (the global batch) does not divide among {world_size} "
         f"processes; use a multiple of {world_size}"),
        (isinstance(tp.epochs, int) and tp.epochs >= 0,
         f"train_params.epochs must be a non-negative integer, got {tp.epochs!r}"),
        (tp.print_freq > 0, "train_params.print_freq must be positive"),
        (tp.checkpoint_every_min >= 0, "train_params.checkpoint_every_min must be 0 "
                                       "(checkpoints at epoch ends only) or positive"),
        (len(cfg.data.input_size) == 3,
         f"data.input_size must be (3, H, W), got {cfg.data.input_size!r}"),
        (cfg.dist.timeout_s > 0, "dist.timeout_s must be positive"),
    )
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    distributed.loader_workers_per_process(cfg.data.num_workers, 1)  # 'auto' or a count
    check_amp(tp.amp)
    check_schedule(cfg.optim)
    backend_of(tp.compile)  # ConfigError for an unknown backend
    torchrun = distributed.torchrun_process()
    check_device_count(cfg.dist.nprocs, torchrun.local_world_size if torchrun else None)
    return build_loss(cfg)


def check_inputs(cfg: AttrDict, loss: nn.Module) -> None:
    """Look for the data, the networks and the checkpoint to resume, once per machine, before
    training. Building the teacher here also fetches official weights once, not per process."""
    data = open_imagenet(cfg.data, num_workers=0)
    if loss.needs_teacher or cfg.train_params.eval_teacher:
        build_teacher(cfg)
    # LMDBs whole, lists in step with them, classes within the classifiers: before any read.
    check_data(data, cfg.model.num_classes)
    data.train_set()[0]  # opens the LMDB or folder and decodes an image: the data is there
    data.val_set()[0]
    build_model(cfg.model.student, cfg.model.num_classes, cfg.model.student_weights or None)
    output_dir = cfg.train_params.output_dir
    resume = resolve_resume_path(cfg.optim.if_resume, cfg.optim.resume_path, output_dir)
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        if "optimizer" not in checkpoint or "epoch" not in checkpoint:
            raise UserError(f"'{resume}' holds weights but no training state; resume from a "
                            f"checkpoint.pth.tar this script wrote, or pass it as "
                            f"model.student_weights")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create train_params.output_dir '{output_dir}' "
                          f"({exc.strerror}); choose a writable folder") from None


def launch_job(cfg: AttrDict) -> None:
    """Check the config and, unless torchrun started this process (see set_up), the inputs;
    then train in as many processes as the config asks for."""
    cfg = resolve_config(cfg)
    loss = check_config(cfg, distributed.planned_world_size(cfg.dist.nprocs))
    if distributed.torchrun_process() is None:
        check_inputs(cfg, loss)
    distributed.launch(run_process, (cfg, loss), nprocs=cfg.dist.nprocs)


# ----------------------------------------------------------------------------- one process

@dataclass
class Run:
    """One process's training: what the epoch loop drives and a checkpoint saves."""

    cfg: AttrDict
    proc: distributed.ProcessInfo
    device: torch.device
    log: RunLogger
    preemption: Preemption
    distiller: WSLDistiller
    model: nn.Module  # the distiller, inside DDP when there are several processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_data: DevicePrefetcher
    val_data: DevicePrefetcher
    progress: Progress
    batch_size: int  # per process


def run_process(proc: distributed.ProcessInfo, cfg: AttrDict, loss: nn.Module) -> None:
    """The whole training job as seen by one process."""
    tp = cfg.train_params
    log = RunLogger(tp.output_dir, enabled=proc.is_main, quiet=tp.quiet, curves=tp.curves)
    # The signal handlers first: a signal during start-up stops the run after its first step.
    with Preemption(tp.checkpoint_every_min, cfg.dist.timeout_s, log) as preemption:
        stopped = None
        try:
            with compile_failures_as_errors():
                run_epochs(set_up(proc, cfg, loss, log, preemption))
        except UserError as exc:
            log.to_file(f"error: {one_line(exc)}")  # printed once, by whoever launched the job
            raise
        except Preempted as exc:
            stopped = Preempted(exc.message)  # without the traceback, which holds the loaders
        finally:
            log.close()
            distributed.cleanup()
        if stopped is not None:
            # The loaders, freed with the frames above, end their workers now: left to the exit
            # handlers, workers killed while the process ends would fail it.
            gc.collect()
            raise stopped


def set_up(proc: distributed.ProcessInfo, cfg: AttrDict, loss: nn.Module, log: RunLogger,
           preemption: Preemption) -> Run:
    """Device, process group, data, networks, optimizer and, when asked, the resumed state."""
    tp, started_by_torchrun = cfg.train_params, distributed.torchrun_process() is not None
    if started_by_torchrun and proc.local_rank == 0:
        check_inputs(cfg, loss)  # once per machine; its other processes wait at the barrier
    device = select_device(proc.local_rank, proc.local_world_size)
    configure_process(proc, device, tp.use_seed, cfg.dist.backend, cfg.dist.timeout_s)
    if started_by_torchrun:
        distributed.barrier()
    config_text = json.dumps(cfg.to_dict(), indent=2)
    log.info("Effective configuration:\n" + config_text)
    if proc.is_main:
        atomic_write_text(os.path.join(tp.output_dir, CONFIG_NAME), config_text + "\n")
    batch_size = cfg.data.batch_size // proc.world_size
    log.info(f"{proc.world_size} process(es) on {device.type}, {batch_size} images each per step")

    workers = distributed.loader_workers_per_process(cfg.data.num_workers, proc.local_world_size)
    data = open_imagenet(cfg.data, workers, seed=tp.seed)
    train_loader, val_loader = data.getTrainLoader(batch_size), data.getTestLoader(batch_size)
    log.info(f"JPEG decoding: {data.describe_decoder()}; {workers} loader workers per process")
    preemption.validation_polls = batches_in_every_shard(val_loader)
    precision = choose_precision(tp.amp, device)
    shm = shm_warning(workers, 2, batch_size * math.prod(cfg.data.input_size))  # uint8 batches
    for warning in (shm, precision.warning):
        if warning:
            log.summary(f"warning: {warning}")

    if tp.use_seed:
        seed_everything(tp.seed)  # the same initial weights in every process and every run
    distiller = build_distiller(cfg, loss, device)
    teacher = distiller.teacher  # evaluated before training, alone if the loss needs none
    if teacher is None and tp.eval_teacher:
        teacher = build_teacher(cfg).to(device, memory_format=memory_format_for(device))
    log.info(f"Teacher {cfg.model.teacher if distiller.teacher is not None else '(none)'}, "
             f"student {cfg.model.student}, loss {distiller.loss}")
    backend = backend_of(tp.compile)
    if backend is not None:  # in place: checkpoints keep torchvision's keys
        compile_in_place([distiller.student, distiller.teacher], backend)
        log.info(f"torch.compile ({backend}): the student and the teacher's forward, "
                 f"at their first steps")
    optimizer, kernels = build_sgd(distiller.student.parameters(), cfg.optim, device)
    space_warning = checkpoint_space_warning(tp.output_dir, distiller.student)
    if space_warning:
        log.summary(f"warning: {space_warning}")
    log.info(f"Precision {precision.describe()}; optimizer {kernels}")
    scheduler = build_scheduler(optimizer, cfg.optim, tp.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
    progress = Progress(seed=run_seed(tp.use_seed, tp.seed, device))
    resume_path = resolve_resume_path(cfg.optim.if_resume, cfg.optim.resume_path, tp.output_dir)
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path)
        load_weights(distiller.student, checkpoint, cfg.model.student)
        # Only the main process's generators were saved; seeded runs reseed every epoch anyway.
        progress = restore_training(checkpoint, optimizer, scheduler, scaler, proc.is_main)
        log.info(f"Resumed from '{resume_path}' at epoch {progress.epochs_done + 1}, "
                 f"step {progress.step}")
    train_loader.sampler.seed = progress.seed
    log.start_metrics(progress.epochs_done)

    model: nn.Module = distiller
    if distributed.is_distributed():
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(distiller, device_ids=device_ids)
    train_data, val_data = (on_device(loader, device, cfg.data.mean, cfg.data.std)
                            for loader in (train_loader, val_loader))
    if tp.eval_teacher:
        teacher_stats = validate(teacher, val_data, precision.dtype)
        log.info(f"Teacher network performance: {describe_validation(teacher_stats)}")
    return Run(cfg, proc, device, log, preemption, distiller, model, optimizer, scheduler, scaler,
               precision.dtype, train_data, val_data, progress, batch_size)


def after_step(run: Run, epoch: int, meter: StepMeter, step: int) -> None:
    """Where a signal stops the run and a timed checkpoint is written (see Preemption)."""
    save = functools.partial(save_position, run, epoch, step, meter)
    run.preemption.after_step(epoch, step, meter.steps, save)


def save_position(run: Run, epoch: int, step: int, meter: StepMeter) -> str:
    """A checkpoint inside 0-based epoch after step steps, with every process's running sums.
    Collective: every process calls it at the same step."""
    rows = torch.zeros((run.proc.world_size, len(SUM_NAMES)), dtype=torch.float64,
                       device=run.device)
    rows[run.proc.rank] = torch.tensor(meter.running_sums(), dtype=torch.float64)
    run.progress.epochs_done, run.progress.step = epoch, step
    run.progress.epoch_sums = tuple(map(tuple, distributed.all_reduce_sum(rows).tolist()))
    return save_training(run, is_best=False)


def save_training(run: Run, is_best: bool) -> str:
    """The main process writes the checkpoint; the others wait until the file is complete."""
    path = os.path.join(run.cfg.train_params.output_dir, CHECKPOINT_NAME)
    if run.proc.is_main:
        state = training_checkpoint(run.distiller.student, run.cfg.model.student, run.optimizer,
                                    run.scheduler, run.scaler, run.progress, run.cfg.to_dict())
        save_checkpoint(state, run.cfg.train_params.output_dir, is_best)
    distributed.barrier()
    return path


# ----------------------------------------------------------------------------- the epoch loop

def run_epochs(run: Run) -> None:
    """Train, validate, record and checkpoint each epoch, from where the run stands."""
    tp, progress, proc = run.cfg.train_params, run.progress, run.proc
    first_epoch, val_stats = progress.epochs_done, None
    for epoch in range(first_epoch, tp.epochs):
        resumed = epoch == first_epoch and progress.step > 0
        start_step = progress.step if resumed else 0
        if tp.use_seed:
            seed_everything(epoch_seed(tp.seed, epoch, proc.rank))
        run.train_data.loader.sampler.set_epoch(epoch, skip=start_step * run.batch_size)
        run.distiller.set_epoch(epoch + 1)  # 1-based, as the methods' official code counts
        steps = len(run.train_data) + start_step
        if tp.max_steps_per_epoch > 0:
            steps = min(steps, tp.max_steps_per_epoch)
        start_sums = progress.sums_of_rank(proc.rank, proc.world_size) if resumed else ()
        meter = StepMeter(run.device, epoch, tp.epochs, steps, tp.print_freq, run.log.info,
                          lr=run.optimizer.param_groups[0]["lr"], world_size=proc.world_size,
                          start_step=start_step, start_sums=start_sums)
        reset_peak_memory(run.device)
        clip = run.cfg.optim.grad_clip if run.cfg.optim.use_grad_clip else None
        train_one_epoch(run.model, run.train_data, run.optimizer, run.scaler, run.amp_dtype, meter,
                        clip, functools.partial(after_step, run, epoch, meter))
        train_stats = meter.summary()
        distributed.broadcast_buffers(run.distiller.student)  # validate what rank 0 saves
        val_stats = validate(run.distiller.student, run.val_data, run.amp_dtype,
                             run.preemption.stop_in_validation)
        if val_stats is None:  # stopped during validation: the epoch's training is kept
            run.preemption.stop(save_position(run, epoch, steps, meter), epoch, steps, steps)
        if not math.isfinite(val_stats["loss"]):
            raise non_finite(f"validation loss after epoch {epoch + 1}")
        run.scheduler.step()
        run.log.summary(f"Validation epoch [{epoch + 1}/{tp.epochs}]  "
                        f"{describe_validation(val_stats)}")

        is_best = val_stats["top1_err"] < progress.best_top1_err
        progress.epochs_done, progress.step, progress.epoch_sums = epoch + 1, 0, ()
        if is_best:
            progress.best_top1_err, progress.best_top5_err, progress.best_epoch = (
                val_stats["top1_err"], val_stats["top5_err"], epoch + 1)
        # The record first: a kill between the two leaves a record that a resume drops.
        run.log.log_epoch(epoch_record(epoch, meter.lr, train_stats, val_stats, progress,
                                       peak_memory_gib(run.device)))
        path = save_training(run, is_best)
        run.preemption.after_epoch(epoch, path)
    distributed.barrier()  # nobody leaves while the main process is still writing
    run.log.summary(final_line(progress, val_stats))


def epoch_record(epoch: int, lr: float, train: dict[str, float], val: dict[str, float],
                 progress: Progress, peak_memory: float | None) -> dict[str, Any]:
    """One line of metrics.jsonl: this epoch's numbers, and the best epoch's so far."""
    trained = ("loss", "top1_err", "top5_err", "regularisation_share", "mean_weight")
    return {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": train[k] for k in trained if k in train},
            **{f"val_{k}": val[k] for k in ("loss", "top1_err", "top5_err", "images")},
            "best_top1_err": progress.best_top1_err, "best_top5_err": progress.best_top5_err,
            "best_epoch": progress.best_epoch, "epoch_seconds": train["seconds"],
            "images_per_second": train["images_per_second"],
            "data_wait_share": train["data_wait_share"], "peak_memory_gib": peak_memory}


def final_line(progress: Progress, last: dict[str, float] | None) -> str:
    """The best epoch's top-1 and top-5 error (what papers report) and the last epoch's."""
    line = (f"Best accuracy (top-1 and 5 error): {progress.best_top1_err:.3f} "
            f"{progress.best_top5_err:.3f} at epoch {progress.best_epoch}")
    if last is not None:
        line += (f"; last epoch {progress.epochs_done}: {last['top1_err']:.3f} "
                 f"{last['top5_err']:.3f}")
    return line


# ----------------------------------------------------------------------------- one training epoch

def train_one_epoch(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    amp_dtype: torch.dtype | None, meter: StepMeter, clip: float | None = None,
                    after_step: Callable[[int], None] | None = None) -> None:
    """One pass over the training data, from meter.start_step to meter.steps. Per-step numbers
    stay on the device (the meter reads them every print_freq steps): the GPU never waits for
    the CPU. after_step(steps done) is where the run may checkpoint or stop."""
    model.train()
    device_type = next(model.parameters()).device.type
    for step, (images, target) in meter.timed(loader):
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, loss, stats = model(images, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # frozen ones have no grad
        scaler.step(optimizer)
        scaler.update()
        meter.update(step, loss, logits, target, stats)
        if after_step is not None:
            after_step(step + 1)


# ----------------------------------------------------------------------------- validation

@torch.inference_mode()
def validate(model: nn.Module, loader: DevicePrefetcher, amp_dtype: torch.dtype | None,
             stop_requested: Callable[[int], bool] | None = None) -> dict[str, float] | None:
    """Loss and top-1/top-5 error over the whole validation set: every process sums over its
    own unpadded shard, so any number of processes gets what one does. stop_requested(i), asked
    after batch i, abandons validation (None) when True."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 and top-5 correct
    images = 0
    for i, (batch_images, target) in enumerate(loader):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch_images)
        loss = F.cross_entropy(logits.float(), target, reduction="sum")
        sums += torch.stack([loss.double(), *(c.double() for c in topk_correct(logits, target))])
        images += target.shape[0]
        if stop_requested is not None and stop_requested(i):
            model.train(was_training)
            return None
    model.train(was_training)
    total = distributed.all_reduce_sum(torch.cat([sums, sums.new_tensor([images])]))
    loss_sum, top1, top5, count = total.tolist()
    return {"loss": loss_sum / count if count else float("nan"),
            "top1_err": error_percent(top1, count), "top5_err": error_percent(top5, count),
            "images": int(count)}


# ----------------------------------------------------------------------------- evaluation only

def evaluate(cfg: AttrDict, checkpoint: str | None) -> dict[str, float]:
    """Validation error of a student checkpoint, or of the configured teacher (None), here."""
    device = select_device(0)
    configure_backends(device, deterministic=cfg.train_params.use_seed)
    precision = choose_precision(cfg.train_params.amp, device)
    if precision.warning:
        print(f"warning: {precision.warning}", file=sys.stderr, flush=True)
    workers = distributed.loader_workers_per_process(cfg.data.num_workers, local_world_size=1)
    val_loader = open_imagenet(cfg.data, workers).getTestLoader(cfg.data.batch_size)
    model = build_teacher(cfg) if checkpoint is None else load_weights(
        build_model(cfg.model.student, cfg.model.num_classes), checkpoint, cfg.model.student)
    model = model.to(device, memory_format=memory_format_for(device))
    val_data = on_device(val_loader, device, cfg.data.mean, cfg.data.std)
    return validate(model, val_data, precision.dtype)


if __name__ == "__main__":
    sys.exit(main())
