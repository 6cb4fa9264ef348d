"""The data wait in the training log: time spent waiting for batches, told apart from compute."""

from __future__ import annotations

import copy
import re
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_with_distillation
from imagenet_train_cfg import cfg as default_cfg
from utils.data_wait import DataWaitTimer, wait_share
from utils.logger import RunLogger


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


class SlowLoader:
    """Batches of 4 images of 10 features; each takes `seconds` of the clock to arrive."""

    def __init__(self, clock: FakeClock, seconds: float, steps: int) -> None:
        self.clock, self.seconds, self.steps = clock, seconds, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in range(self.steps):
            self.clock.advance(self.seconds)
            yield torch.randn(4, 10, generator=generator), torch.randint(0, 10, (4,), generator=generator)


class SlowStep(nn.Module):
    """A distiller's interface, (logits, loss) from (images, labels), taking `seconds` per step."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds
        self.fc = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.clock.advance(self.seconds)
        logits = self.fc(x)
        return logits, F.cross_entropy(logits, label)


def test_timer_counts_only_the_time_spent_in_next(clock):
    def batches():
        for item in range(3):
            clock.advance(2.0)  # producing the item
            yield item

    timer = DataWaitTimer(batches())
    seen = []
    for item in timer:
        clock.advance(5.0)  # the consumer's own work is not waiting
        seen.append(item)
    assert seen == [0, 1, 2]
    assert timer.seconds == 6.0


def test_wait_share():
    assert wait_share(1.0, 4.0) == 0.25
    assert wait_share(0.0, 0.0) == 0.0


@pytest.mark.parametrize("load_s,compute_s,share", [(3.0, 1.0, 0.75), (1.0, 3.0, 0.25)],
                         ids=["data-bound", "compute-bound"])
def test_epoch_log_lines_and_stats_show_the_data_wait(clock, tmp_path, capsys, load_s, compute_s, share):
    cfg = copy.deepcopy(default_cfg)
    cfg.train_params.print_freq = 2
    model = SlowStep(clock, compute_s)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with RunLogger(str(tmp_path)) as log:
        stats = train_with_distillation.train_one_epoch(
            model, SlowLoader(clock, load_s, steps=4), optimizer, scaler, None, 0, 1, cfg, log)
    assert stats["data_wait_share"] == pytest.approx(share)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch:")]
    assert len(lines) == 2
    for line in lines:
        match = re.search(r"data wait (\d+\.\d) ms/step \((\d+)%\)", line)
        assert match, line
        assert float(match.group(1)) == 1000 * load_s
        assert int(match.group(2)) == round(100 * share)
