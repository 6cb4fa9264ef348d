"""Metrics: top-k counts, and sums that do not depend on the process count."""

from __future__ import annotations

import math

import pytest
import torch

from utils.metrics import all_reduce_sums, error_percent, topk_correct


def test_topk_counts_match_a_direct_count():
    torch.manual_seed(0)
    logits = torch.randn(64, 10)
    target = torch.randint(0, 10, (64,))
    top1, top5 = topk_correct(logits, target, ks=(1, 5))
    # classes scored above the target
    ranks = (logits > logits.gather(1, target[:, None])).sum(dim=1)
    assert top1.item() == int((ranks < 1).sum()) and top5.item() == int((ranks < 5).sum())
    assert top1.dtype == torch.int64


def test_topk_caps_k_at_the_number_of_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    target = torch.tensor([2, 0])
    top1, top5 = topk_correct(logits, target, ks=(1, 5))
    assert (top1.item(), top5.item()) == (1, 2)


def test_error_percent():
    assert error_percent(75, 100) == pytest.approx(25.0)
    assert math.isnan(error_percent(0, 0))


def test_all_reduce_sums_in_one_process_is_exact_float64():
    big = 2 ** 40 + 1  # not representable in float32
    sums = all_reduce_sums({"images": torch.tensor(big), "loss": 0.25, "correct": 3}, "cpu")
    assert sums == {"images": float(big), "loss": 0.25, "correct": 3.0}
    assert all_reduce_sums({}, "cpu") == {}
