"""The demo behind ``train_with_distillation.py --demo``: the paper's table in miniature, in
minutes, through the ImageNet pipeline (folders -> list -> LMDB -> DDP) on scikit-learn's digits;
the rows are configs/demo_cfg.py's. The teacher takes longest, so a finished one is reused.

The script hands in the training and the data preparation, so that no module of utils/ imports
dataset/; from above, only the loss names are read, to check ``--methods``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import knowledge_distiller
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

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "demo_cfg.py")
CPU_PROCESSES = 2  # DDP on the CPU: the demo shows the distributed path even without a GPU
# The teacher's configuration, written beside its checkpoint once its training has finished
TEACHER_RECORD = "trained_with.json"
# metrics.jsonl's per-epoch share of samples where the student beats the teacher on the label
SHARE_KEY = "train_regularisation_share"


@dataclass
class DemoRow:
    network: str
    method: str
    top1_acc: float
    top5_acc: float
    seconds: float | None  # None: a teacher reused from an earlier demo
    regularisation_share: float | None = None  # last epoch's; None without a teacher or record


def split_methods(methods: str | Sequence[str]) -> list[str]:
    """The names of ``--methods kd,dkd`` (a comma-separated string) or of a sequence, blanks
    dropped; each must be a ``distill.method``, as knowledge_distiller knows them when called."""
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [name.strip() for name in names if name.strip()]
    known = knowledge_distiller.LOSS_METHODS
    for name in names:
        if name not in known:
            raise ConfigError(f"--methods: unknown method '{name}'; choose among "
                              f"{', '.join(known)}, separated by commas")
    return names


def method_runs(runs: Sequence[dict], methods: Sequence[str], default_method: str) -> list[dict]:
    """One more row per method not yet in the table: a copy of the config's last student row
    with only ``distill.method`` changed, so the student rows still differ in the method alone."""
    if methods and len(runs) < 2:
        raise ConfigError("--methods copies the demo config's last student row, and its 'runs' "
                          "hold only the teacher; add a student row to them")
    present = {run["overrides"].get("distill.method", default_method) for run in runs[1:]}
    template = runs[-1]
    return [dict(template, name=method, method=method.upper(),
                 overrides={**template["overrides"], "distill.method": method})
            for method in dict.fromkeys(methods) if method not in present]


def run_configs(cfg_path: str, overrides: Sequence[str],
                methods: str | Sequence[str] = ()) -> list[tuple[dict, AttrDict]]:
    """(row description, config) for each row of the demo, the user's overrides applied to all;
    methods adds a student row for each distill.method the config's rows do not already train."""
    names = split_methods(methods)
    runs = getattr(load_config_module(cfg_path), "runs", None)
    if not runs:
        raise ConfigError(f"demo config '{cfg_path}' defines no 'runs'")
    defaults = load_config_file(cfg_path)
    runs = [*runs, *method_runs(runs, names, defaults.distill.method)]
    configs = []
    for run in runs:
        cfg = apply_mapping(copy.deepcopy(defaults), run["overrides"])
        apply_overrides(cfg, overrides)  # the user's word comes last
        if isinstance(cfg.train_params.epochs, int):  # else check_config names the bad value
            factor = run.get("epochs_factor", 1)
            cfg.train_params.epochs = math.ceil(cfg.train_params.epochs * factor)
        if cfg.dist.nprocs == 0 and not torch.cuda.is_available():
            cfg.dist.nprocs = CPU_PROCESSES
        root = cfg.train_params.output_dir
        cfg.train_params.output_dir = os.path.join(root, run["name"])
        if run is not runs[0]:  # the students distil from the demo's own teacher
            cfg.model.teacher = runs[0]["overrides"].get("model.student", cfg.model.teacher)
            cfg.model.teacher_weights = os.path.join(root, runs[0]["name"], BEST_NAME)
        configs.append((run, cfg))
    return configs


def row_result(output_dir: str) -> tuple[float, float, float | None]:
    """Top-1 and top-5 accuracy (percent) of the epoch with the lowest validation top-1 error,
    and the regularisation share of the last epoch that recorded one (None when none did: a row
    without a teacher, or a metrics file written before the key existed)."""
    records = read_metrics(os.path.join(output_dir, METRICS_NAME))
    validated = [r for r in records if r.get("val_top1_err") is not None]
    if not validated:
        raise UserError(f"no validation results in {output_dir}/{METRICS_NAME}")
    best = min(validated, key=lambda r: r["val_top1_err"])
    share = next((r[SHARE_KEY] for r in reversed(records)
                  if isinstance(r.get(SHARE_KEY), (int, float))), None)
    return 100.0 - best["val_top1_err"], 100.0 - best["val_top5_err"], share


def format_table(rows: Sequence[DemoRow], total_seconds: float) -> str:
    """The demo's table in Markdown, then its total time; '-' for an unknown share."""
    lines = ["| Network | Method | top-1 acc | top-5 acc | time | regularisation share |",
             "|:---:|:---:|:---:|:---:|:---:|:---:|"]
    for r in rows:
        seconds = "reused" if r.seconds is None else f"{r.seconds:.0f} s"
        share = "-" if r.regularisation_share is None else f"{r.regularisation_share:.3f}"
        lines.append(f"| {r.network} | {r.method} | {r.top1_acc:.2f} | {r.top5_acc:.2f} "
                     f"| {seconds} | {share} |")
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
    """Train the teacher row, recording its configuration (as asked for, before train() sees it)
    only once it has finished, so that a run stopped halfway is never taken for a finished one."""
    record = os.path.join(cfg.train_params.output_dir, TEACHER_RECORD)
    trained_with = json.dumps(_as_json(cfg), indent=2) + "\n"
    if os.path.exists(record):
        os.remove(record)
    train(cfg)
    atomic_write_text(record, trained_with)


def run_demo(train: Callable[[AttrDict], None], overrides: Sequence[str] = (),
             cfg_path: str = DEMO_CONFIG, *, prepare: Callable[[str], None],
             methods: str | Sequence[str] = ()) -> list[DemoRow]:
    """Prepare the data with ``prepare(data_path)``, train every row with ``train(cfg)`` (the
    teacher only when no finished one with the same configuration is there) and print the table.
    The overrides and methods (``--methods``) are checked before anything is prepared or trained.
    """
    start = time.time()
    configs = run_configs(cfg_path, overrides, methods)
    prepare(configs[0][1].data.data_path)
    rows = []
    for index, (run, cfg) in enumerate(configs):
        output_dir = cfg.train_params.output_dir
        epochs = cfg.train_params.epochs
        print(f"==> {run['network']} {run['method']}: {epochs} epoch{'' if epochs == 1 else 's'}",
              flush=True)
        run_start = time.time()
        reused = index == 0 and cached_teacher(cfg)
        if reused:
            print(f"Reusing the teacher in {output_dir}, trained with this same configuration "
                  f"(delete {TEACHER_RECORD} there to train it again)", flush=True)
        elif index == 0:
            train_teacher(train, cfg)
        else:
            train(cfg)
        top1, top5, share = row_result(output_dir)
        print(f"Outputs: {output_dir} ({LOG_NAME}, config.json, {METRICS_NAME}, {CURVES_NAME}, "
              f"{BEST_NAME})", flush=True)
        seconds = None if reused else time.time() - run_start
        rows.append(DemoRow(run["network"], run["method"], top1, top5, seconds, share))
    print(format_table(rows, time.time() - start), flush=True)
    return rows
