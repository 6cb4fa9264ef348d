"""The step meter: the data wait told apart from compute, and the step line's numbers."""

from __future__ import annotations

import re
import time

import pytest
import torch

from utils.metrics import StepMeter, wait_share


class FakeClock:
    """time.perf_counter that moves only when told to, so the shares are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


def slow_batches(clock: FakeClock, seconds: float, steps: int):
    """Batches of 4 labels that take `seconds` of the clock each to arrive."""
    for _ in range(steps):
        clock.advance(seconds)
        yield torch.zeros(4, dtype=torch.int64)


def run_epoch(clock: FakeClock, load_s: float, compute_s: float, lines: list[str],
              steps: int = 4, **meter_args: object) -> StepMeter:
    meter = StepMeter(torch.device("cpu"), epoch=0, epochs=1, steps=steps, print_freq=2,
                      log=lines.append, lr=0.1, **meter_args)
    for step, target in meter.timed(slow_batches(clock, load_s, 10)):
        clock.advance(compute_s)
        logits = torch.nn.functional.one_hot(target, 10).float()  # always right
        stats = {"regularisation_samples": torch.tensor(1.0), "weight_sum": torch.tensor(2.0)}
        meter.update(step, torch.tensor(0.5), logits, target, stats)
    return meter


def test_wait_share():
    assert wait_share(1.0, 4.0) == 0.25
    assert wait_share(0.0, 0.0) == 0.0


@pytest.mark.parametrize("load_s,compute_s,share", [(3.0, 1.0, 0.75), (1.0, 3.0, 0.25)],
                         ids=["data-bound", "compute-bound"])
def test_step_lines_and_epoch_stats_show_the_data_wait(clock, load_s, compute_s, share):
    lines: list[str] = []
    stats = run_epoch(clock, load_s, compute_s, lines).summary()
    assert stats["data_wait_share"] == pytest.approx(share)
    assert stats["images"] == 16 and stats["loss"] == pytest.approx(0.5)
    assert stats["top1_err"] == 0.0
    assert stats["regularisation_share"] == pytest.approx(0.25)  # 1 of each 4
    assert stats["mean_weight"] == pytest.approx(0.5)
    assert len(lines) == 2  # steps 2 and 4 of 4, the batches past step 4 are never drawn
    for line in lines:
        match = re.search(r"data wait (\d+\.\d) ms/step \((\d+)%\)", line)
        assert match, line
        assert float(match.group(1)) == 1000 * load_s
        assert int(match.group(2)) == round(100 * share)
        assert "reg share 0.250" in line and "mean w 0.500" in line


def test_a_resumed_epoch_continues_from_its_saved_sums(clock):
    whole = run_epoch(clock, 1.0, 1.0, [])
    first = run_epoch(clock, 1.0, 1.0, [], steps=4)
    saved = StepMeter(torch.device("cpu"), 0, 1, 4, 2, [].append, 0.1)
    for step, target in saved.timed(slow_batches(clock, 1.0, 2)):
        clock.advance(1.0)
        saved.update(step, torch.tensor(0.5), torch.nn.functional.one_hot(target, 10).float(),
                     target, {})
    resumed = run_epoch(clock, 1.0, 1.0, [], start_step=2, start_sums=saved.running_sums())
    assert resumed.images == first.images == whole.images == 16
    assert resumed.summary()["loss"] == pytest.approx(whole.summary()["loss"])


def test_a_non_finite_loss_is_reported_with_its_step_at_the_next_read():
    meter = StepMeter(torch.device("cpu"), 0, 1, 4, 2, [].append, 0.1)
    target = torch.zeros(2, dtype=torch.int64)
    meter.update(0, torch.tensor(float("nan")), torch.zeros(2, 3), target, {})  # no read yet
    with pytest.raises(Exception, match="non-finite loss at epoch 1, step 1"):
        meter.update(1, torch.tensor(1.0), torch.zeros(2, 3), target, {})
