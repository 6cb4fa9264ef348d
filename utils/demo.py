"""The demo behind ``train_with_distillation.py --demo``: the paper's table in miniature.

It runs the pipeline a user runs on ImageNet (folders -> list -> LMDB -> DDP training), on
real digit scans that scikit-learn ships, so a fresh machine shows the method working in
minutes. What to train lives in the demo's config module (configs/demo_cfg.py), not here.

The teacher row takes longest, and the students only read its best checkpoint, so a finished
teacher is kept and reused by the next demo whose teacher configuration is the same.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dataset import img2lmdb, mk_img_list
from dataset.demo_data import write_digits_tree
from utils.checkpoint import BEST_NAME
from utils.config import (
    AttrDict,
    ConfigError,
    apply_mapping,
    apply_overrides,
    load_config_file,
    load_config_module,
)
from utils.errors import UserError
from utils.files import atomic_write_text
from utils.logger import CURVES_NAME, LOG_NAME, METRICS_NAME, read_metrics

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo_cfg.py")
CPU_PROCESSES = 2  # DDP on the CPU: the demo shows the distributed path even without a GPU
# Written beside the teacher's checkpoint once its training has finished: the configuration it
# was trained with. Absent or different, the teacher is trained again.
TEACHER_RECORD = "trained_with.json"


class DemoError(UserError):
    """Preparing the demo failed; the tool that failed has already said why."""


@dataclass
class DemoRow:
    network: str
    method: str
    top1_acc: float
    top5_acc: float
    seconds: float | None  # None: a teacher reused from an earlier demo


def prepare_data(root: str) -> None:
    """Write the digit tree once (atomically, so an interrupted build is redone), then list and pack it.

    Packing again is cheap: img2lmdb skips the records already stored.
    """
    if not os.path.isdir(os.path.join(root, "train")):
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".demo_data.", dir=parent)
        try:
            write_digits_tree(staging)
            os.replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    steps = [(mk_img_list.main, ["--image_path", root, "--output_path", root])]
    for split in ("train", "val"):
        steps.append((img2lmdb.main, ["--image_path", root, "--list_path", root, "--output_path", root,
                                      "--split", split]))
    for tool, argv in steps:
        if tool(argv) != 0:
            raise DemoError(f"preparing the demo data failed at {tool.__module__} {' '.join(argv)}")


def run_configs(cfg_path: str, overrides: Sequence[str]) -> list[tuple[dict, AttrDict]]:
    """(row description, config) for each row of the demo, the user's overrides applied to all."""
    module = load_config_module(cfg_path)
    runs = getattr(module, "runs", None)
    if not runs:
        raise ConfigError(f"demo config '{cfg_path}' defines no 'runs'")
    defaults = load_config_file(cfg_path)
    configs = []
    for run in runs:
        cfg = apply_mapping(copy.deepcopy(defaults), run["overrides"])
        apply_overrides(cfg, overrides)  # the user's word comes last
        if isinstance(cfg.train_params.epochs, int):  # else check_config names the bad value
            cfg.train_params.epochs = math.ceil(cfg.train_params.epochs * run.get("epochs_factor", 1))
        if cfg.dist.nprocs == 0 and not torch.cuda.is_available():
            cfg.dist.nprocs = CPU_PROCESSES
        root = cfg.train_params.output_dir
        cfg.train_params.output_dir = os.path.join(root, run["name"])
        if run is not runs[0]:  # the students distil from the demo's own teacher
            cfg.model.teacher = runs[0]["overrides"].get("model.student", cfg.model.teacher)
            cfg.model.teacher_weights = os.path.join(root, runs[0]["name"], BEST_NAME)
        configs.append((run, cfg))
    return configs


def best_result(output_dir: str) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of the epoch with the lowest validation top-1 error."""
    records = [r for r in read_metrics(os.path.join(output_dir, METRICS_NAME)) if r.get("val_top1_err") is not None]
    if not records:
        raise DemoError(f"no validation results in {output_dir}/{METRICS_NAME}")
    best = min(records, key=lambda r: r["val_top1_err"])
    return 100.0 - best["val_top1_err"], 100.0 - best["val_top5_err"]


def format_table(rows: Sequence[DemoRow], total_seconds: float) -> str:
    lines = ["| Network | Method | top-1 acc | top-5 acc | time |",
             "|:---:|:---:|:---:|:---:|:---:|"]
    for r in rows:
        seconds = "reused" if r.seconds is None else f"{r.seconds:.0f} s"
        lines.append(f"| {r.network} | {r.method} | {r.top1_acc:.2f} | {r.top5_acc:.2f} | {seconds} |")
    lines.append(f"Total: {total_seconds:.0f} s")
    return "\n".join(lines)


def _as_json(cfg: AttrDict) -> dict:
    """cfg as it reads back from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(cfg.to_dict()))


def cached_teacher(cfg: AttrDict) -> bool:
    """Whether cfg's output folder holds a teacher whose training finished under this same cfg."""
    output_dir = cfg.train_params.output_dir
    if not os.path.isfile(os.path.join(output_dir, BEST_NAME)):
        return False
    try:
        with open(os.path.join(output_dir, TEACHER_RECORD), encoding="utf-8") as f:
            return json.load(f) == _as_json(cfg)
    except (OSError, ValueError):  # none yet, or unreadable: train again
        return False


def train_teacher(train: Callable[[AttrDict], None], cfg: AttrDict) -> None:
    """Train the teacher row, recording its configuration only once it has finished.

    The record goes first, so a run stopped halfway through is never taken for a finished one.
    """
    record = os.path.join(cfg.train_params.output_dir, TEACHER_RECORD)
    trained_with = json.dumps(_as_json(cfg), indent=2) + "\n"  # as asked for, before train() sees it
    if os.path.exists(record):
        os.remove(record)
    train(cfg)
    atomic_write_text(record, trained_with)


def run_demo(train: Callable[[AttrDict], None], overrides: Sequence[str] = (),
             cfg_path: str = DEMO_CONFIG) -> list[DemoRow]:
    """Prepare the data, train every row with ``train(cfg)`` (the teacher only when no finished
    one with the same configuration is there) and print the table."""
    start = time.time()
    configs = run_configs(cfg_path, overrides)
    prepare_data(configs[0][1].data.data_path)
    rows = []
    for index, (run, cfg) in enumerate(configs):
        output_dir = cfg.train_params.output_dir
        epochs = cfg.train_params.epochs
        print(f"==> {run['network']} {run['method']}: {epochs} epoch{'' if epochs == 1 else 's'}", flush=True)
        run_start = time.time()
        reused = index == 0 and cached_teacher(cfg)
        if reused:
            print(f"Reusing the teacher in {output_dir}, trained with this same configuration "
                  f"(delete {TEACHER_RECORD} there to train it again)", flush=True)
        elif index == 0:
            train_teacher(train, cfg)
        else:
            train(cfg)
        top1, top5 = best_result(output_dir)
        print(f"Outputs: {output_dir} ({LOG_NAME}, config.json, {METRICS_NAME}, {CURVES_NAME}, {BEST_NAME})",
              flush=True)
        rows.append(DemoRow(run["network"], run["method"], top1, top5, None if reused else time.time() - run_start))
    print(format_table(rows, time.time() - start), flush=True)
    return rows
