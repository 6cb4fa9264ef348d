"""Training and validation statistics: top-k counts, the step meter, and sums rather than averages
of per-process averages, so that N processes report exactly what one does."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable

import torch

from utils.distributed import all_reduce_sum
from utils.errors import UserError
from utils.logger import format_duration

# A process's running sums in a training epoch, in the order a checkpoint stores them.
# The last two come from the distiller: samples where the student beats the teacher on the
# label (WSLD's regularisation samples) and WSLD's summed sample weights.
SUM_NAMES = ("loss", "top1", "top5", "images", "seconds", "data_wait",
             "regularisation_samples", "weight_sum")
DEVICE_SUMS = ("loss", "top1", "top5", "regularisation_samples", "weight_sum")


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor,
                 ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """For each k, how many rows have the target among the k highest logits, as int64 tensors
    on the logits' device. k is capped at the number of classes (top-5 of 4 classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(target.view(-1, 1))
    return [hits[:, :k].any(dim=1).sum() for k in ks]


def error_percent(correct: float, count: float) -> float:
    """The error rate in percent, the unit the original reports."""
    return 100.0 * (1.0 - correct / count) if count else float("nan")


def wait_share(wait_seconds: float, seconds: float) -> float:
    """The fraction of seconds spent waiting for data (0 for an empty interval)."""
    return wait_seconds / seconds if seconds > 0 else 0.0


def all_reduce_sums(values: Mapping[str, float | torch.Tensor],
                    device: torch.device | str) -> dict[str, float]:
    """Sum each named number over all processes (none without a process group) in one collective,
    in float64: integer counts stay exact up to 2**53."""
    names = list(values)
    packed = torch.zeros(len(names), dtype=torch.float64, device=device)
    for i, name in enumerate(names):
        packed[i] = torch.as_tensor(values[name]).detach().to(device=device, dtype=torch.float64)
    return dict(zip(names, all_reduce_sum(packed).tolist()))


def non_finite(what: str) -> UserError:
    """The error for a NaN or infinite loss: where, and what to change."""
    return UserError(f"non-finite {what}; training stopped and the last checkpoint was kept. "
                     "Lower optim.init_lr or enable optim.use_grad_clip")


class StepMeter:
    """One process's bookkeeping for a training epoch: sums, log lines, ETA, data wait.

    Sums and the first non-finite loss's step stay on the device, read every ``print_freq``
    steps in one transfer. The data wait is the host's time inside the loader's ``next()`` (a
    compute-bound CUDA run waits at that read instead, a data-bound one here).
    """

    def __init__(self, device: torch.device, epoch: int, epochs: int, steps: int,
                 print_freq: int, log: Callable[[str], None], lr: float, world_size: int = 1,
                 start_step: int = 0, start_sums: Sequence[float] = ()) -> None:
        self.epoch, self.epochs, self.steps, self.start_step = epoch, epochs, steps, start_step
        self.print_freq, self.log, self.lr, self.world_size = print_freq, log, lr, world_size
        start = dict(zip(SUM_NAMES, start_sums))
        device_start = [start.get(n, 0.0) for n in DEVICE_SUMS]
        self._device_sums = torch.tensor(device_start, dtype=torch.float64, device=device)
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        # For statistics a method does not report: made once, not a new tensor every step.
        self._zero = torch.zeros((), dtype=torch.float64, device=device)
        self.stat_names: set[str] = set()  # the distiller statistics seen this epoch
        self.images = int(start.get("images", 0))
        self.data_wait = float(start.get("data_wait", 0.0))
        now = time.perf_counter()
        self._start = now - float(start.get("seconds", 0.0))
        self._window = (now, self.images, start_step, self.data_wait, device_start)

    def timed(self, batches: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        """(step, batch) pairs from start_step on, timing each ``next()`` as data wait."""
        start = time.perf_counter()
        iterator = iter(batches)  # may start loader processes: part of the wait
        for step in range(self.start_step, self.steps):
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.data_wait += time.perf_counter() - start
            yield step, batch
            start = time.perf_counter()

    @torch.no_grad()
    def update(self, step: int, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
               stats: Mapping[str, torch.Tensor]) -> None:
        """Add one step (0-based) on the device; at print points read, check and log."""
        batch = target.shape[0]
        loss = loss.detach()
        correct1, correct5 = topk_correct(logits.detach(), target)
        self.stat_names.update(stats)
        self._device_sums += torch.stack([
            loss.double() * batch, correct1.double(), correct5.double(),
            stats.get("regularisation_samples", self._zero).double(),
            stats.get("weight_sum", self._zero).double()])
        bad = ~torch.isfinite(loss)
        self._first_bad_step = torch.where(bad & (self._first_bad_step < 0), step,
                                           self._first_bad_step)
        self.images += batch
        if (step + 1) % self.print_freq == 0 or step + 1 == self.steps:
            self._log_line(step + 1, self._read())

    def _read(self) -> list[float]:
        """The device sums, after raising for a non-finite loss (one read of the device)."""
        *sums, bad_step = torch.cat([self._device_sums,
                                     self._first_bad_step.double().view(1)]).tolist()
        if bad_step >= 0:
            raise non_finite(f"loss at epoch {self.epoch + 1}, step {int(bad_step) + 1}")
        return sums

    def running_sums(self) -> list[float]:
        """This process's sums so far, in SUM_NAMES order, for a mid-epoch checkpoint."""
        device = dict(zip(DEVICE_SUMS, self._read()))
        host = {"images": float(self.images), "seconds": time.perf_counter() - self._start,
                "data_wait": self.data_wait}
        return [{**device, **host}[name] for name in SUM_NAMES]

    def _log_line(self, steps_done: int, sums: list[float]) -> None:
        now = time.perf_counter()
        since, last_images, last_step, last_wait, last_sums = self._window
        n = max(self.images - last_images, 1)
        per_step = (now - self._start) / steps_done
        epoch_eta = per_step * (self.steps - steps_done)
        run_eta = epoch_eta + per_step * self.steps * (self.epochs - self.epoch - 1)
        wait = self.data_wait - last_wait
        d = dict(zip(DEVICE_SUMS, sums))
        last = dict(zip(DEVICE_SUMS, last_sums))
        parts = [f"Epoch: [{self.epoch + 1}/{self.epochs}][{steps_done}/{self.steps}]",
                 f"speed {n * self.world_size / max(now - since, 1e-9):.1f} img/s",
                 f"data wait {1000 * wait / max(steps_done - last_step, 1):.1f} ms/step "
                 f"({100 * wait_share(wait, now - since):.0f}%)",
                 f"loss {(d['loss'] - last['loss']) / n:.4f} ({d['loss'] / self.images:.4f})"]
        for k in ("top1", "top5"):
            parts.append(f"top-{k[-1]} err {error_percent(d[k] - last[k], n):.2f} "
                         f"({error_percent(d[k], self.images):.2f})")
        parts += [f"{label} {d[key] / self.images:.3f}" for key, label in self._shown_stats()]
        parts += [f"lr {self.lr:.6g}",
                  f"ETA {format_duration(epoch_eta)} (run {format_duration(run_eta)})"]
        self.log("  ".join(parts))
        self._window = (now, self.images, steps_done, self.data_wait, sums)

    def _shown_stats(self) -> list[tuple[str, str]]:
        shown = (("regularisation_samples", "reg share"), ("weight_sum", "mean w"))
        return [(key, label) for key, label in shown if key in self.stat_names]

    def summary(self) -> dict[str, float]:
        """The epoch's loss, errors, speed and statistics, summed over all processes."""
        local = self.running_sums()
        sums = all_reduce_sums(dict(zip(SUM_NAMES, local)), self._device_sums.device)
        images = max(sums["images"], 1)
        result = {"loss": sums["loss"] / images,
                  "top1_err": error_percent(sums["top1"], sums["images"]),
                  "top5_err": error_percent(sums["top5"], sums["images"]),
                  "images": sums["images"], "seconds": local[SUM_NAMES.index("seconds")],
                  "data_wait_share": wait_share(sums["data_wait"], sums["seconds"]),
                  "images_per_second": sums["images"] / max(sums["seconds"] / self.world_size,
                                                            1e-9)}
        names = {"regularisation_samples": "regularisation_share", "weight_sum": "mean_weight"}
        for key, _ in self._shown_stats():
            result[names[key]] = sums[key] / images
        return result
