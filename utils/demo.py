"""The demo behind ``train_with_distillation.py --demo``: the paper's table in miniature.

It runs the pipeline a user runs on ImageNet (folders -> list -> LMDB -> DDP training), on
real digit scans that scikit-learn ships, so a fresh machine shows the method working in
minutes. What to train lives in the demo's config module (configs/demo_cfg.py), not here.
"""

from __future__ import annotations

import copy
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
from utils.logger import CURVES_NAME, METRICS_NAME, read_metrics

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo_cfg.py")
CPU_PROCESSES = 2  # DDP on the CPU: the demo shows the distributed path even without a GPU


class DemoError(UserError):
    """Preparing the demo failed; the tool that failed has already said why."""


@dataclass
class DemoRow:
    network: str
    method: str
    top1_acc: float
    top5_acc: float
    seconds: float
    curves: str


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
    lines += [f"| {r.network} | {r.method} | {r.top1_acc:.2f} | {r.top5_acc:.2f} | {r.seconds:.0f} s |" for r in rows]
    lines.append(f"Total: {total_seconds:.0f} s")
    lines += [f"{r.method} curves: {r.curves}" for r in rows]
    return "\n".join(lines)


def run_demo(train: Callable[[AttrDict], None], overrides: Sequence[str] = (),
             cfg_path: str = DEMO_CONFIG) -> list[DemoRow]:
    """Prepare the data, train every row with ``train(cfg)`` and print the table."""
    start = time.time()
    configs = run_configs(cfg_path, overrides)
    prepare_data(configs[0][1].data.data_path)
    rows = []
    for run, cfg in configs:
        print(f"==> Demo: {run['network']} {run['method']} ({cfg.train_params.output_dir})", flush=True)
        run_start = time.time()
        train(cfg)
        top1, top5 = best_result(cfg.train_params.output_dir)
        rows.append(DemoRow(run["network"], run["method"], top1, top5, time.time() - run_start,
                            os.path.join(cfg.train_params.output_dir, CURVES_NAME)))
    print(format_table(rows, time.time() - start), flush=True)
    return rows
