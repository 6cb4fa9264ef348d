"""Images per second of the training input pipelines: one loader worker each.

Builds ImageNet-like JPEGs from real photos (scikit-learn's sample images, cropped and resized to
300..1000 px sides, quality 75..95), packs them into an LMDB of the original format, and times
these pipelines, each in one loader worker set up as training sets up its workers
(``dataset.imagenet_data.loader_worker_init``: one OpenCV thread, one torch thread):

  decode       JPEG decode alone, at full size (cv2.imdecode)
  ours         ImageNet12's train loader, built as training builds it: LMDB read, decode of
               the crop's window only (or of the whole image, with --decoder opencv), at
               reduced size when the crop allows,
               RandomResizedCrop + flip, uint8 collate
  torchvision  ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize, default collate
  original     the original repository's approach: LMDB read, OpenCV decode, conversion to PIL,
               torchvision's PIL RandomResizedCrop + flip, uint8 collate

The pipelines take turns, one batch each; a worker's CPU time (from /proc) is read at the start
of each of its turns, when it has refilled its prefetch queue, so the time between two readings
is one batch's. Rates are images per CPU second of the workers over all turns, which a busy
machine does not change much. The last line prints the ratios.

    python3 benchmarks/bench_loader.py [--per_class 40] [--turns 30] [--decoder opencv]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.demo_data import write_photo_tree  # noqa: E402
from dataset.image_list import read_list  # noqa: E402
from dataset.imagenet_data import ImageNet12, collate_uint8, loader_worker_init  # noqa: E402
from dataset.img2lmdb import pack_split  # noqa: E402
from dataset.lmdb_dataset import LMDBDataset  # noqa: E402
from dataset.mk_img_list import make_lists  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 224
NUM_CLASSES = 4


def build_data(root: str, per_class: int) -> str:
    """A JPEG tree at root/train with its list, and the same files packed by dataset/img2lmdb.py
    (as they are) into root/lmdb/train, list beside it; returns root/lmdb."""
    write_photo_tree(root, {"train": per_class}, num_classes=NUM_CLASSES, side_range=(300, 1000))
    make_lists(root, root)
    lmdb_root = os.path.join(root, "lmdb")
    pack_split(root, root, lmdb_root, "train", workers=1, progress=False)
    shutil.copy(os.path.join(root, "train_list.txt"), lmdb_root)
    return lmdb_root


class DecodeOnly(torch.utils.data.Dataset):
    """Every training image's bytes decoded at full size; each image is dropped as soon as it is
    decoded (its memory reused by the next), the cheapest way."""

    def __init__(self, root: str) -> None:
        self.blobs = []
        for name in read_list(os.path.join(root, "train_list.txt")):
            with open(os.path.join(root, "train", name), "rb") as image:
                self.blobs.append(image.read())

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> int:
        cv2.imdecode(np.frombuffer(self.blobs[index], dtype=np.uint8), cv2.IMREAD_COLOR)
        return index


def in_one_worker(dataset: torch.utils.data.Dataset, batch_size: int, **options) -> DataLoader:
    """A baseline's loader, its one worker set up as training's are."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=1,
                      persistent_workers=True, worker_init_fn=loader_worker_init, **options)


def ours(lmdb_root: str, decoder: str = "auto") -> ImageNet12:
    return ImageNet12(os.path.join(lmdb_root, "train"), os.path.join(lmdb_root, "val"),
                      num_workers=1, data_config={"train_data_type": "lmdb", "decoder": decoder})


def torchvision_standard(root: str, batch_size: int) -> DataLoader:
    transform = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    return in_one_worker(datasets.ImageFolder(os.path.join(root, "train"), transform), batch_size)


def original(lmdb_root: str, batch_size: int) -> DataLoader:
    transform = T.Compose([Image.fromarray, T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(),
                           np.asarray])
    dataset = LMDBDataset(os.path.join(lmdb_root, "train"),
                          os.path.join(lmdb_root, "train_list.txt"), transform=transform,
                          decode=True)
    return in_one_worker(dataset, batch_size, collate_fn=collate_uint8)


def child_pids() -> set[int]:
    """The processes this one started and that still run (Linux's /proc)."""
    pids: set[int] = set()
    task_root = f"/proc/{os.getpid()}/task"
    for task in os.listdir(task_root):
        with open(os.path.join(task_root, task, "children"), encoding="ascii") as f:
            pids.update(int(pid) for pid in f.read().split())
    return pids


def cpu_seconds(pids: set[int]) -> float:
    """User and system CPU time the processes pids have used so far."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return ticks / os.sysconf("SC_CLK_TCK")


def forever(source: Iterable) -> Iterator:
    """Batches of source, epoch after epoch."""
    while True:
        yield from source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per_class", type=int, default=40,
                        help="training images per class (4 classes)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--turns", type=int, default=30,
                        help="batches each pipeline runs, taking turns")
    parser.add_argument("--decoder", choices=["auto", "opencv"], default="auto",
                        help="ours' data.decoder: opencv times the fallback without region "
                             "decoding")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        lmdb_root = build_data(root, args.per_class)
        ours_data = ours(lmdb_root, args.decoder)
        loaders = {
            "decode": in_one_worker(DecodeOnly(root), args.batch_size, collate_fn=len),
            "ours": ours_data.getTrainLoader(args.batch_size),
            "torchvision": torchvision_standard(root, args.batch_size),
            "original": original(lmdb_root, args.batch_size),
        }
        streams, workers = {}, {}
        for name, loader in loaders.items():  # warm up: first batches open files and caches
            before = child_pids()
            streams[name] = forever(loader)
            next(streams[name])
            workers[name] = child_pids() - before
        readings: dict[str, list[float]] = {name: [] for name in streams}
        for _ in range(args.turns + 1):
            for name, stream in streams.items():
                readings[name].append(cpu_seconds(workers[name]))
                next(stream)
    images = args.turns * args.batch_size
    rate = {name: images / max(1e-9, read[-1] - read[0]) for name, read in readings.items()}
    ratio = {name: rate["ours"] / value for name, value in rate.items()}
    labels = {
        "decode": "JPEG decode alone, full size (cv2.imdecode)",
        "ours": "ours: LMDB, decoder above, RandomResizedCrop+flip, uint8 collate",
        "torchvision": "torchvision: ImageFolder, RandomResizedCrop+flip, ToTensor, Normalize",
        "original": "original: LMDB, OpenCV decode -> PIL -> torchvision transforms",
    }
    print(f"{NUM_CLASSES * args.per_class} photos of 300..1000 px; one loader worker each; "
          f"{args.turns} batches of {args.batch_size} per pipeline, in turns; images per worker "
          "CPU second")
    print(f"ours decodes with {ours_data.describe_decoder()}")
    for name, value in rate.items():
        print(f"{labels[name]:<72} {value:8.1f} images/s")
    print(f"ours/torchvision={ratio['torchvision']:.2f}x ours/decode={ratio['decode']:.2f}x "
          f"ours/original={ratio['original']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
