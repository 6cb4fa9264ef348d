"""Training and validation statistics: top-k counts and exact distributed sums.

Validation reports counts (correct predictions, images, summed loss) rather than averages of
per-process averages, so that N processes report exactly what one process reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from utils.distributed import all_reduce_sum


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """For each k, how many rows have the target among the k highest logits (int64 tensors).

    k is capped at the number of classes, so top-5 stays defined on a 4-class test set. The
    counts stay on the logits' device: reading them needs no synchronisation until asked.
    """
    num_classes = logits.shape[1]
    max_k = min(max(ks), num_classes)
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(target.view(-1, 1))
    return [hits[:, : min(k, num_classes)].any(dim=1).sum() for k in ks]


def error_percent(correct: float, count: float) -> float:
    """The error rate in percent, the unit the original reports."""
    return 100.0 * (1.0 - correct / count) if count else float("nan")


def all_reduce_sums(values: Mapping[str, float | torch.Tensor], device: torch.device | str) -> dict[str, float]:
    """Sum each named number over all processes, in float64, in one collective.

    Without an initialised process group the values come back unchanged, so single-process
    code calls this too. float64 keeps integer counts exact up to 2**53 and makes the summed
    loss independent of how the images were split among the processes, up to rounding.
    """
    names = list(values)
    packed = torch.zeros(len(names), dtype=torch.float64, device=device)
    for i, name in enumerate(names):
        packed[i] = torch.as_tensor(values[name]).detach().to(device=device, dtype=torch.float64)
    return dict(zip(names, all_reduce_sum(packed).tolist()))
