"""The run's record: printed lines teed to ``log.txt``, one JSON line per epoch, and a plot.

Only the main process writes; the others get a logger that drops everything, so call sites
need no rank checks.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

from utils.files import atomic_write

LOG_NAME = "log.txt"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The epoch records of a metrics.jsonl file ([] when there is none)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash mid-write
            if isinstance(record, dict):
                records.append(record)
    return records


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def describe_validation(stats: Mapping[str, float]) -> str:
    return (f"top-1 err {stats['top1_err']:.3f}  top-5 err {stats['top5_err']:.3f}  "
            f"loss {stats['loss']:.4f}  ({stats['images']} images)")


def plot_curves(records: list[Mapping[str, Any]], path: str) -> None:
    """Loss and error against epoch, train and validation, written atomically as a PNG."""
    # Imported here: only the main process plots. A bare Figure renders with Agg and stays
    # out of pyplot's global list of open figures.
    from matplotlib.figure import Figure

    # Each panel: its title, its y label and its curves (a record's key and the curve's label).
    panels = [("Loss", "loss", [("train_loss", "train"), ("val_loss", "validation")]),
              ("Error", "error (%)", [("train_top1_err", "train top-1"),
                                      ("val_top1_err", "validation top-1"),
                                      ("val_top5_err", "validation top-5")])]
    shares = [(key, label) for key, label in (
        ("train_regularisation_share", "regularisation share"),
        ("train_mean_weight", "mean WSLD weight")) if any(r.get(key) is not None for r in records)]
    if shares:  # WSLD's view: samples where the student beats the teacher
        panels.append(("Regularisation samples (CE_s < CE_t)", "share of training samples", shares))
    fig = Figure(figsize=(5 * len(panels), 4))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.92, wspace=0.25)
    epochs = [r["epoch"] for r in records]
    for ax, (title, ylabel, curves) in zip(fig.subplots(1, len(panels)), panels):
        for key, label in curves:
            values = [float("nan") if r.get(key) is None else r[key] for r in records]
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)


class RunLogger:
    """Prints on the main process, appending every line to ``<output_dir>/log.txt``; a quiet
    logger prints only ``summary`` lines (one per epoch)."""

    def __init__(self, output_dir: str, enabled: bool = True, quiet: bool = False,
                 curves: bool = True) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self.quiet = quiet
        self.curves = curves
        self.metrics_path = os.path.join(output_dir, METRICS_NAME)
        self._log_file = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            log_path = os.path.join(output_dir, LOG_NAME)
            self._log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115

    def info(self, message: str) -> None:
        if self.enabled and not self.quiet:
            print(message, flush=True)
        self.to_file(message)

    def summary(self, message: str) -> None:
        """A line printed even by a quiet logger."""
        if self.enabled:
            print(message, flush=True)
        self.to_file(message)

    def to_file(self, message: str) -> None:
        """A line for log.txt only (e.g. an error that is printed elsewhere)."""
        if self._log_file is not None:
            self._log_file.write(message + "\n")
            self._log_file.flush()

    def start_metrics(self, completed_epochs: int) -> None:
        """Keep only the records of epochs 1..completed_epochs: a resumed run redoes the rest,
        and metrics.jsonl never holds an epoch twice."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.metrics_path) if r.get("epoch", 0) <= completed_epochs]
        with atomic_write(self.metrics_path) as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's record to metrics.jsonl and redraw curves.png from all of them
        (unless curves is off: matplotlib costs a second at the first epoch of a run)."""
        if not self.enabled:
            return
        # NaN and infinity are not JSON: they are written as null.
        line = json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                           for k, v in record.items()})
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.curves:
            plot_curves(read_metrics(self.metrics_path),
                        os.path.join(self.output_dir, CURVES_NAME))

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def print_error(message: str) -> None:
    """The one line a user sees for a problem they can fix."""
    print(f"error: {message}", file=sys.stderr, flush=True)
