"""The one command for the first GPU machine: the CUDA tests, then the training loop's speed.

    python3 benchmarks/gpu_check.py            # one GPU, no internet, at most 10 minutes
    python3 benchmarks/gpu_check.py --smoke    # every stage on the CPU at tiny sizes (CI)

Stages, each in its own process so that a crash or a hang is recorded and the next one runs:

1. ``pytest -m cuda`` over tests/: the CUDA tests, counted.
2. An LMDB of ImageNet-like JPEGs (about 500 x 375, quality 75 to 95) cut from the bundled
   photos, packed by dataset/img2lmdb.py.
3. train_with_distillation.py itself: ResNet-34 to ResNet-18, 224 px, bf16, channels-last,
   ``data.num_workers='auto'`` (every core but the loop's), the per-GPU batch of the default 8-GPU
   run (256 / 8 = 32). The first epoch is warm-up (loader start, cuDNN autotuning); the later
   epochs are measured from metrics.jsonl: images/s, the share of time spent waiting for data, peak
   GPU memory. There is no synchronisation per step, as in training.
4. The compute ceiling: the same training step (the script's train_one_epoch) on one batch
   already on the GPU, no loader, after warm-up steps; at the per-GPU batch and at 256.
5. Stage 3 again with ``train_params.compile=True``.

The last line printed is one JSON object: the figures, the device and versions, the test
counts, and under "errors" the one-line error of each stage that failed (its figures null).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO_ROOT)

TRAIN_SCRIPT = os.path.join(REPO_ROOT, "train_with_distillation.py")
NUM_CLASSES = 10  # of the generated images; the networks keep ImageNet's 1000 outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="every stage on the CPU at tiny sizes, to check the script itself "
                             "(CI)")
    parser.add_argument("--work-dir", default="",
                        help="keep the data, logs and outputs here (default: a temporary folder, "
                             "removed)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget for all stages, each stopped at its share of it "
                             "(default 540: the GPU run fits in 10 minutes; 1200 with --smoke, "
                             "which needs under 3 on an idle machine: only a guard against a hang "
                             "on a busy CI machine)")
    return parser.parse_args(argv)


def settings(smoke: bool) -> dict[str, Any]:
    """Sizes for the real check, or tiny ones that run every stage on the CPU in seconds."""
    from utils.distributed import usable_cores

    cores = usable_cores()
    # Validation sets of whole batches: no odd-sized last batch for the compiled loop to recompile
    # for.
    if smoke:
        return {"train_images": 40, "val_images": 10, "batch": 4, "compute_batches": [4, 8],
                "size": 32,
                "epochs": 2, "max_steps": 2, "workers": min(2, cores), "amp": "auto",
                "compile": "eager",
                "compute_steps": 1, "print_freq": 1}
    return {"train_images": 20480, "val_images": 320, "batch": 32, "compute_batches": [32, 256],
            "size": 224,
            "epochs": 4, "max_steps": 0, "workers": "auto", "amp": "bf16", "compile": True,
            "compute_steps": 100,
            "print_freq": 100}


class Deadline:
    """Seconds left of the budget, shared out among the stages."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self, reserve_s: float = 0.0) -> float:
        return max(1.0, self.end - time.monotonic() - reserve_s)


def run_command(command: list[str], timeout_s: float, log_path: str,
                env: dict[str, str] | None = None) -> int:
    """Run a command with its output in log_path, in a session of its own so that a command
    that runs out of time is stopped with every process it started (loader workers, compiler
    workers). Returns its exit status; RuntimeError if it ran out of time."""
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                   start_new_session=True)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"stopped after {timeout_s:.0f} s (log: {log_path})") from None
        finally:  # also whatever the command left running
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_checked(command: list[str], timeout_s: float, log_path: str) -> None:
    """run_command; RuntimeError with the log's last line if the command fails."""
    status = run_command(command, timeout_s, log_path)
    if status != 0:
        raise RuntimeError(f"exit status {status}: {last_line(log_path)} (log: {log_path})")


def last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------- 1. the CUDA tests

def run_cuda_tests(work: str, timeout_s: float) -> dict[str, Any]:
    """pytest -m cuda over the whole tests/ folder; the counts come from its JUnit report, or
    from its log's result lines when it was stopped before writing one."""
    report = os.path.join(work, "cuda_tests.xml")
    log_path = os.path.join(work, "cuda_tests.log")
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-rs", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={report}",
               os.path.join(REPO_ROOT, "tests")]
    # Deterministic cuBLAS reads its workspace setting once, at the process's first cuBLAS call.
    try:
        run_command(command, timeout_s, log_path, env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    except RuntimeError as exc:  # out of time: count what ran
        counts = counts_from_log(log_path)
        if counts is None:
            raise
        return {**counts, "tests_summary": f"incomplete: {exc}"}
    if not os.path.isfile(report):
        raise RuntimeError(f"pytest wrote no report: {last_line(log_path)} (log: {log_path})")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in ET.parse(report).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = counts["failures"] + counts["errors"]
    return {"tests_passed": counts["tests"] - failed - counts["skipped"], "tests_failed": failed,
            "tests_skipped": counts["skipped"], "tests_summary": last_line(log_path)}


def counts_from_log(log_path: str) -> dict[str, int] | None:
    """Passed, failed and skipped tests from pytest -v's result lines; None if there are none."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            outcomes = re.findall(r"^\S+::\S+ (PASSED|FAILED|ERROR|SKIPPED)", f.read(),
                                  flags=re.MULTILINE)
    except OSError:
        return None
    if not outcomes:
        return None
    return {"tests_passed": outcomes.count("PASSED"),
            "tests_failed": outcomes.count("FAILED") + outcomes.count("ERROR"),
            "tests_skipped": outcomes.count("SKIPPED")}


# ----------------------------------------------------------------------------- 2. the data

def _write_class(args: tuple[str, int, int, int, int]) -> None:
    """One class's train and val photos, written where write_photo_tree puts class 0, then moved."""
    from dataset.demo_data import write_photo_tree

    root, index, train, val, seed = args
    scratch = os.path.join(root, f".class{index}")
    write_photo_tree(scratch, {"train": train, "val": val}, num_classes=1, side_range=(450, 550),
                     quality_range=(75, 95), seed=seed)
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        os.replace(os.path.join(scratch, split, "n00000000"),
                   os.path.join(root, split, f"n{index:08d}"))
    shutil.rmtree(scratch)


def build_data(work: str, config: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """JPEGs in work/images, written in parallel; lists and LMDBs in work/data by the project's
    tools."""
    start = time.perf_counter()
    images, data = os.path.join(work, "images"), os.path.join(work, "data")
    per_class = (-(-config["train_images"] // NUM_CLASSES), -(-config["val_images"] // NUM_CLASSES))
    # forkserver: the workers do not inherit this process's CUDA context (see environment()).
    from utils.distributed import usable_cores

    with ProcessPoolExecutor(max_workers=min(NUM_CLASSES, usable_cores()),
                             mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(_write_class, [(images, i, *per_class, i) for i in range(NUM_CLASSES)]))
    deadline = Deadline(timeout_s - (time.perf_counter() - start))
    run_checked([sys.executable, os.path.join(REPO_ROOT, "dataset", "mk_img_list.py"),
                 "--image_path", images,
                 "--output_path", data], deadline.left(), os.path.join(work, "mk_img_list.log"))
    for split in ("train", "val"):
        run_checked([sys.executable, os.path.join(REPO_ROOT, "dataset", "img2lmdb.py"),
                     "--image_path", images,
                     "--list_path", data, "--output_path", data, "--split", split,
                     "--workers", str(usable_cores())], deadline.left(),
                    os.path.join(work, f"pack_{split}.log"))
    return {"data_path": data, "train_images": per_class[0] * NUM_CLASSES,
            "data_seconds": round(time.perf_counter() - start, 1)}


# ----------------------------------------------------------------------------- 3 and 5. the
# training loop

def loop_overrides(data_path: str, output_dir: str, config: dict[str, Any],
                   compile_setting: Any) -> list[str]:
    """The training script's settings for the loop: real networks and sizes, nothing downloaded."""
    size = config["size"]
    return [f"data.data_path={data_path}", f"data.batch_size={config['batch']}",
            f"data.num_workers={config['workers']}", f"data.input_size=(3, {size}, {size})",
            # random weights: same speed, offline
            "model.teacher_weights=", "train_params.eval_teacher=False",
            f"train_params.amp={config['amp']}", f"train_params.epochs={config['epochs']}",
            f"train_params.max_steps_per_epoch={config['max_steps']}",
            f"train_params.print_freq={config['print_freq']}",
            f"train_params.output_dir={output_dir}",
            f"train_params.compile={compile_setting!r}", "dist.nprocs=1"]


def run_loop(name: str, work: str, data_path: str, config: dict[str, Any], compile_setting: Any,
             timeout_s: float) -> dict[str, Any]:
    """Train with the script itself; the epochs after the first are the steady state measured."""
    from utils.logger import read_metrics

    output_dir = os.path.join(work, name)
    stopped = None
    try:
        run_checked([sys.executable, TRAIN_SCRIPT,
                     *loop_overrides(data_path, output_dir, config, compile_setting)],
                    timeout_s, os.path.join(work, f"{name}.log"))
    except RuntimeError as exc:  # the epochs finished before it stopped still count
        stopped = exc
    metrics = os.path.join(output_dir, "metrics.jsonl")
    records = read_metrics(metrics)[1:] if os.path.isfile(metrics) else []
    if not records:
        raise stopped or RuntimeError(f"no epoch after the first in {metrics}")
    seconds = sum(r["epoch_seconds"] for r in records)
    images = sum(r["images_per_second"] * r["epoch_seconds"] for r in records)
    peak = [r.get("peak_memory_gib") for r in records if r.get("peak_memory_gib") is not None]
    with open(os.path.join(output_dir, "log.txt"), encoding="utf-8") as log:
        decoding = [line.split(":", 1)[1].strip() for line in log
                    if line.startswith("JPEG decoding:")]
    return {"jpeg_decoding": decoding[0] if decoding else None,
            "images_per_second": round(images / seconds, 1),
            "data_wait_share": round(sum(r["data_wait_share"] * r["epoch_seconds"]
                                         for r in records) / seconds, 4),
            "peak_memory_gib": round(max(peak), 2) if peak else None,
            "measured_steps": int(round(images / config["batch"])),
            **({"partial": f"{len(records)} epoch(s) measured, then {stopped}"} if stopped else {})}


# ----------------------------------------------------------------------------- 4. the compute
# ceiling

class RepeatedBatch:
    """One batch already on the device, given `steps` times: a loader that never makes the step
    wait."""

    def __init__(self, batch: tuple[Any, Any], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch


def compute_ceiling(overrides: list[str], batches: list[int], steps: int,
                    result_path: str) -> dict[str, Any]:
    """The training script's own step (train_one_epoch) on a batch already on the device.

    The first pass over `steps` steps is warm-up (cuDNN autotuning, allocator growth); the
    second is timed. train_one_epoch reads the device once at the end, so its seconds include
    all the queued work, and nothing else synchronises.
    """
    import torch

    from dataset.prefetch_data import on_device
    from imagenet_train_cfg import cfg as defaults
    from knowledge_distiller import build_distiller, build_loss
    from models import teacher_student_names
    from train_with_distillation import train_one_epoch
    from utils import distributed
    from utils.config import apply_overrides
    from utils.device import build_sgd, choose_precision, configure_process, select_device
    from utils.metrics import StepMeter

    cfg = apply_overrides(copy.deepcopy(defaults), overrides)
    cfg.model.teacher, cfg.model.student = teacher_student_names(
        cfg.net_type, cfg.model.teacher, cfg.model.student)
    device = select_device(0, 1)
    configure_process(distributed.ProcessInfo(), device, cfg.train_params.use_seed,
                      cfg.dist.backend, cfg.dist.timeout_s)
    amp_dtype = choose_precision(cfg.train_params.amp, device).dtype
    loss = build_loss(cfg)
    results: dict[str, Any] = {}
    for batch_size in batches:
        torch.manual_seed(0)
        distiller = build_distiller(cfg, loss, device)
        # As the training script builds them.
        optimizer, _ = build_sgd(distiller.student.parameters(), cfg.optim, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        size = cfg.data.input_size
        uint8 = torch.randint(0, 256, (batch_size, *size), dtype=torch.uint8)
        labels = torch.randint(0, NUM_CLASSES, (batch_size,))
        batch = next(iter(on_device([(uint8, labels)], device, cfg.data.mean, cfg.data.std)))
        for _ in range(2):  # warm-up, then measured; one read of the device, at the end
            meter = StepMeter(device, 0, 1, steps, print_freq=10 * steps, log=print, lr=0.0)
            train_one_epoch(distiller, RepeatedBatch(batch, steps), optimizer, scaler, amp_dtype,
                            meter)
            stats = meter.summary()
        results[f"batch_{batch_size}"] = round(stats["images_per_second"], 1)
        # After each size: kept if the next runs out of time.
        with open(result_path, "w", encoding="utf-8") as f:
            json.dump(results, f)
        del distiller, optimizer, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def run_compute(work: str, data_path: str, config: dict[str, Any],
                timeout_s: float) -> dict[str, Any]:
    output_dir = os.path.join(work, "compute")
    result_path = os.path.join(work, "compute.json")
    overrides = loop_overrides(data_path, output_dir, config, False)
    stopped = None
    try:
        run_checked([sys.executable, os.path.abspath(__file__), "--compute-stage", json.dumps(
            {"overrides": overrides, "batches": config["compute_batches"],
             "steps": config["compute_steps"], "result": result_path})], timeout_s,
            os.path.join(work, "compute.log"))
    except RuntimeError as exc:  # the batch sizes measured before it stopped still count
        stopped = exc
    if not os.path.isfile(result_path):
        raise stopped or RuntimeError(f"the compute stage wrote no {result_path}")
    with open(result_path, encoding="utf-8") as f:
        by_batch = json.load(f)
    first, *others = config["compute_batches"]
    return {"compute_images_per_second": by_batch.get(f"batch_{first}"),
            **{f"compute_images_per_second_batch{b}": by_batch.get(f"batch_{b}") for b in others},
            **({"partial": str(stopped)} if stopped else {})}


# ----------------------------------------------------------------------------- the environment

def environment() -> dict[str, Any]:
    import torch

    from utils.device import shm_bytes
    from utils.distributed import usable_cores

    shm = shm_bytes()
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": (torch.backends.cudnn.version()
                                      if torch.backends.cudnn.is_available() else None),
                            "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable_cores(),
                            "shm_gib": round(shm / 2**30, 2) if shm is not None else None,
                            "gpus": 0, "device": "CPU"}
    if torch.cuda.is_available():
        info["gpus"] = torch.cuda.device_count()
        info["device"] = torch.cuda.get_device_name(0)
        properties = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["compute_capability"] = f"{properties.major}.{properties.minor}"
    return info


# ----------------------------------------------------------------------------- the command

RESULT_KEYS = ("device", "images_per_second", "compute_images_per_second", "data_wait_share",
               "peak_memory_gib",
               "compile_images_per_second", "tests_passed", "tests_failed", "cpu_cores_usable",
               "num_workers", "loop_share_of_compute", "shm_gib", "compile_skipped")
# The compile stage's reserved share of the budget: a cold compile of three graphs takes minutes.
COMPILE_SHARE = 0.25


def compile_unavailable(setting: Any) -> str | None:
    """Why the compile stage cannot run here (None when it can): Triton, behind inductor, builds
    its kernels' launchers with a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if (setting is True or setting == "inductor") and not compiler:
        return "no C compiler (cc or gcc) on PATH, which torch.compile's Triton kernels need"
    return None


def resolved_workers(setting: Any) -> int:
    """data.num_workers as the training process resolves it: one process on this machine."""
    from utils.distributed import loader_workers_per_process

    return loader_workers_per_process(setting, local_world_size=1)


def run_stage(name: str, result: dict[str, Any], fn: Any, *args: Any) -> dict[str, Any] | None:
    """Run one stage; its figures go into result, its failure into result['errors'], one line."""
    start = time.perf_counter()
    print(f"[gpu_check] {name} ...", flush=True)
    try:
        figures = fn(*args)
    except Exception as exc:  # a failed stage is recorded, and the next one runs
        message = " ".join(str(exc).split()) or type(exc).__name__
        result["errors"][name] = f"{type(exc).__name__}: {message}"
        print(f"[gpu_check] {name} failed: {message}", flush=True)
        traceback.print_exc()
        return None
    partial = figures.pop("partial", None)  # figures measured before the stage ran out of time
    if partial:
        result["errors"][name] = f"partial: {partial}"
    result["stage_seconds"][name] = round(time.perf_counter() - start, 1)
    print(f"[gpu_check] {name}: {json.dumps(figures)}", flush=True)
    return figures


def check(args: argparse.Namespace, work: str, result: dict[str, Any]) -> None:
    config = settings(args.smoke)
    budget = args.budget_s if args.budget_s is not None else (1200.0 if args.smoke else 540.0)
    deadline = Deadline(budget)
    result.update({"smoke": args.smoke, "batch_per_gpu": config["batch"],
                   "image_size": config["size"],
                   "num_workers": resolved_workers(config["workers"]), "amp": config["amp"],
                   "compile_skipped": compile_unavailable(config["compile"])})
    env = run_stage("environment", result, environment)
    if env:
        result.update(env)
    if not args.smoke and result.get("gpus", 0) == 0:
        result["errors"]["environment"] = ("no CUDA device: the figures would be the CPU's; "
                                           "use --smoke on the CPU")
        return

    # Each stage stops at its share of the budget, or at the budget's end less the compiled
    # loop's reserved share; the compiled loop, whose first steps compile, gets its share and
    # whatever the others leave.
    reserve = 0.0 if result["compile_skipped"] else COMPILE_SHARE * budget

    def limit(share: float) -> float:
        return min(share * budget, deadline.left(reserve))

    result.update(run_stage("cuda_tests", result, run_cuda_tests, work, limit(0.4)) or {})
    data = run_stage("data", result, build_data, work, config, limit(0.2))
    if data is None:
        return
    result["train_images"] = data["train_images"]
    result.update(run_stage("loop", result, run_loop, "loop", work, data["data_path"], config,
                            False, limit(0.2)) or {})
    result.update(run_stage("compute", result, run_compute, work, data["data_path"], config,
                            limit(0.15)) or {})
    if result.get("images_per_second") and result.get("compute_images_per_second"):
        result["loop_share_of_compute"] = round(
            result["images_per_second"] / result["compute_images_per_second"], 3)
    if result["compile_skipped"]:
        print(f"[gpu_check] compile_loop skipped: {result['compile_skipped']}", flush=True)
        return
    compiled = run_stage("compile_loop", result, run_loop, "compile_loop", work, data["data_path"],
                         config,
                         config["compile"], deadline.left())
    if compiled:
        result.update({"compile_images_per_second": compiled["images_per_second"],
                       "compile_data_wait_share": compiled["data_wait_share"],
                       "compile_peak_memory_gib": compiled["peak_memory_gib"]})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--compute-stage"]:  # the compute ceiling's own process (see run_compute)
        job = json.loads(argv[1])
        compute_ceiling(job["overrides"], job["batches"], job["steps"], job["result"])
        return 0
    args = parse_args(argv)
    # A SIGTERM (say, from `timeout`) unwinds like an error: the running stage's processes are
    # stopped and the JSON line is still printed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    start = time.perf_counter()
    result: dict[str, Any] = {key: None for key in RESULT_KEYS}
    result.update({"errors": {}, "stage_seconds": {}})
    work = args.work_dir or tempfile.mkdtemp(prefix="wsld_gpu_check_")
    try:
        os.makedirs(work, exist_ok=True)
        check(args, work, result)
    except BaseException as exc:  # whatever happens, the JSON line is printed
        result["errors"]["gpu_check"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        result["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(result), flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
