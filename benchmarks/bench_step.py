"""Time one distillation training step, ResNet-34 teacher to ResNet-18 student, three ways.

(a) ours: ``WSLDistiller`` with the WSLD loss; the teacher in eval mode, run without gradient.
(b) the original's way: the teacher in train mode with gradients on, its logits not detached, so
    the backward pass runs through the whole teacher (and its BatchNorm statistics drift).
(c) the floor: a teacher forward without gradient plus a plain cross-entropy student step, timed
    separately and added; (a) should cost barely more, the loss being tiny next to the networks.

Every step is forward, backward and an SGD update of the student on one fixed random batch. The
three run interleaved, step by step, so that load from other processes falls on all alike; the
median of --steps steps counts, after --warmup.

    python benchmarks/bench_step.py [--batch 32] [--size 112] [--steps 7] [--device cpu]

The last line prints the ratios (targets: a/b <= 0.6, a/c <= 1.1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from knowledge_distiller import WSLDistiller, WSLDLoss  # noqa: E402
from models import build_model  # noqa: E402

TEMPERATURE, ALPHA = 2.0, 2.5


def original_wsld_loss(fc_s: Tensor, fc_t: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """The original's loss as it ran: the soft term keeps the teacher's graph (no detach)."""
    t_soft = F.softmax(fc_t / TEMPERATURE, dim=1)
    soft = -(t_soft * F.log_softmax(fc_s / TEMPERATURE, dim=1)).sum(1, keepdim=True)
    one_hot = F.one_hot(label, num_classes).float()
    ce_s = -(one_hot * F.log_softmax(fc_s.detach(), dim=1)).sum(1, keepdim=True)
    ce_t = -(one_hot * F.log_softmax(fc_t.detach(), dim=1)).sum(1, keepdim=True)
    weight = 1 - torch.exp(-torch.clamp(ce_s / (ce_t + 1e-7), min=0))
    return F.cross_entropy(fc_s, label) + ALPHA * TEMPERATURE ** 2 * (weight * soft).mean()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=112, help="input side in pixels")
    parser.add_argument("--steps", type=int, default=7,
                        help="timed steps per variant (median taken)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    num_classes = 1000

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    label = torch.randint(0, num_classes, (args.batch,), device=device)

    # (a) ours
    ours = WSLDistiller(build_model("resnet34"), build_model("resnet18"),
                        WSLDLoss(TEMPERATURE, ALPHA, num_classes)).to(device).train()
    ours_opt = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step_ours() -> None:
        _, loss, _ = ours(x, label)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    # (b) the original's: teacher trainable-looking, in train mode, gradients through it
    teacher_b, student_b = build_model("resnet34").to(device), build_model("resnet18").to(device)
    orig_opt = torch.optim.SGD(student_b.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step_original() -> None:
        teacher_b.train()
        student_b.train()
        loss = original_wsld_loss(student_b(x), teacher_b(x), label, num_classes)
        orig_opt.zero_grad(set_to_none=True)
        # it is in no optimizer: keep its grads from piling up
        teacher_b.zero_grad(set_to_none=True)
        loss.backward()
        orig_opt.step()

    # (c) the floor: the teacher's inference and a plain student step, apart
    teacher_c = build_model("resnet34").to(device).eval()
    student_c = build_model("resnet18").to(device)
    teacher_c.requires_grad_(False)
    plain_opt = torch.optim.SGD(student_c.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher_c(x)

    def step_plain() -> None:
        student_c.train()
        loss = F.cross_entropy(student_c(x), label)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    variants = {"ours": step_ours, "original": step_original, "teacher": teacher_forward,
                "plain": step_plain}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(args.warmup + args.steps):
        for name, fn in variants.items():
            seconds = timed(fn, device)
            if step >= args.warmup:
                times[name].append(seconds)

    median = {name: statistics.median(values) for name, values in times.items()}
    floor = median["teacher"] + median["plain"]
    print(f"device {device}, batch {args.batch} x 3 x {args.size} x {args.size}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"(a) ours (frozen teacher, no grad)     {median['ours'] * 1e3:9.1f} ms")
    print(f"(b) original (teacher train + grad)    {median['original'] * 1e3:9.1f} ms")
    print(f"(c) teacher no-grad forward            {median['teacher'] * 1e3:9.1f} ms")
    print(f"    + plain cross-entropy student step {median['plain'] * 1e3:9.1f} ms")
    print(f"    = floor                            {floor * 1e3:9.1f} ms")
    print(f"ours/original = {median['ours'] / median['original']:.3f} (target <= 0.6), "
          f"ours/floor = {median['ours'] / floor:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
