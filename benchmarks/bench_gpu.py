"""Training throughput of the ImageNet configuration on one GPU.

Builds a synthetic LMDB of ImageNet-sized JPEGs from real photos, then runs the training step
of train_with_distillation.py (ResNet-34 teacher, ResNet-18 student, WSLD loss, 224 px, the
global batch of 256 in one process, bf16 autocast, channels-last) for a few hundred steps, and
prints images per second, the share of time spent waiting for data, and peak GPU memory.

    python3 benchmarks/bench_gpu.py [--steps 300] [--workers 16]

On a machine without CUDA it runs on the CPU (use tiny settings, e.g. --steps 3 --batch 8
--size 64 --images 64) so that the script itself can be checked anywhere.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from dataset import img2lmdb, mk_img_list
from dataset.demo_data import write_photo_tree
from imagenet_train_cfg import cfg as default_cfg
from train_with_distillation import build_networks, on_device, open_data, resolve_amp


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (cuDNN autotuning)")
    parser.add_argument("--batch", type=int, default=256, help="images per step")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--images", type=int, default=2560, help="images in the synthetic LMDB")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader processes")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"))
    return parser.parse_args(argv)


def build_lmdb(root: str, images: int) -> None:
    """ImageNet-like JPEGs (300..500 px sides) packed as the training script reads them."""
    classes = 10
    write_photo_tree(root, {"train": max(1, images // classes)}, num_classes=classes,
                     side_range=(300, 500))
    packed = mk_img_list.main(["--image_path", root, "--output_path", root]) == 0 and img2lmdb.main(
        ["--image_path", root, "--list_path", root, "--output_path", root, "--split", "train"]) == 0
    if not packed:
        raise SystemExit("error: building the synthetic LMDB failed (the line above says why)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory() as root:
        build_lmdb(root, args.images)
        cfg = copy.deepcopy(default_cfg)
        cfg.data.data_path = root
        cfg.data.num_workers = args.workers
        cfg.data.input_size = (3, args.size, args.size)
        cfg.model.teacher_weights = ""  # random weights: the speed is the same, nothing is downloaded
        cfg.train_params.eval_teacher = False

        loader = open_data(cfg, args.workers).getTrainLoader(args.batch)
        data = on_device(loader, device, cfg)
        _, model = build_networks(cfg, device)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        amp_dtype = resolve_amp(args.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        def batches():
            epoch = 0
            while True:
                loader.sampler.set_epoch(epoch)
                yield from data
                epoch += 1

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        stream = batches()
        wait = 0.0
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                wait, start = 0.0, time.perf_counter()
            fetch = time.perf_counter()
            images, target = next(stream)
            wait += time.perf_counter() - fetch
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                _, loss = model(images, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            sync()  # so that the time in next() is time the GPU really waited for data
        elapsed = time.perf_counter() - start

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(f"device {name}, batch {args.batch} at {args.size} px, amp {args.amp}, {args.workers} workers, "
          f"{args.steps} steps after {args.warmup} warm-up steps")
    print(f"train: {args.steps * args.batch / elapsed:.1f} img/s, data wait {100 * wait / elapsed:.1f}% of the "
          f"time, peak GPU memory {peak_gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
