"""Images per second of the training input pipelines: one process, one thread.

Builds ImageNet-like JPEGs from real photos (scikit-learn's sample images, cropped and resized to
300..1000 px sides, quality 75..95), packs them into an LMDB of the original format, and times
these pipelines, all in one process on one thread:

  decode       JPEG decode alone, at full size (cv2.imdecode)
  ours         ImageNet12's train loader: LMDB read, decode of the crop's window only (or of the
               whole image, with --decoder opencv), at reduced size when the crop allows,
               RandomResizedCrop + flip, uint8 collate
  torchvision  ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize, default collate
  original     the original repository's approach: LMDB read, OpenCV decode, conversion to PIL,
               torchvision's PIL RandomResizedCrop + flip, uint8 collate

The pipelines take turns, one batch each; rates are medians over turns of images per second of
this process's CPU time, and ratios medians of the ratios within each turn, so that all of them
see the same (shared, noisy) machine. The last line prints the ratios.

    python3 benchmarks/bench_loader.py [--per_class 40] [--turns 30] [--decoder opencv]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
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
from dataset.imagenet_data import ImageNet12, collate_uint8  # noqa: E402
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


class DecodeOnly:
    """Every training image's bytes decoded at full size, a batch at a time. Each image is
    dropped as soon as it is decoded (its memory reused by the next), the cheapest way."""

    def __init__(self, root: str, batch_size: int) -> None:
        self.blobs = []
        for name in read_list(os.path.join(root, "train_list.txt")):
            with open(os.path.join(root, "train", name), "rb") as image:
                self.blobs.append(image.read())
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        for start in range(0, len(self.blobs) - self.batch_size + 1, self.batch_size):
            for data in self.blobs[start:start + self.batch_size]:
                cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
            yield self.batch_size


def ours(lmdb_root: str, decoder: str = "auto") -> ImageNet12:
    return ImageNet12(os.path.join(lmdb_root, "train"), os.path.join(lmdb_root, "val"), num_workers=0,
                      data_config={"train_data_type": "lmdb", "decoder": decoder}, pin_memory=False)


def torchvision_standard(root: str, batch_size: int) -> DataLoader:
    transform = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(os.path.join(root, "train"), transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)


def original(lmdb_root: str, batch_size: int) -> DataLoader:
    transform = T.Compose([Image.fromarray, T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), np.asarray])
    dataset = LMDBDataset(os.path.join(lmdb_root, "train"), os.path.join(lmdb_root, "train_list.txt"),
                              transform=transform, decode=True)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True,
                      collate_fn=collate_uint8)


def forever(source: Iterable) -> Iterator:
    """Batches of source, epoch after epoch."""
    while True:
        yield from source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per_class", type=int, default=40, help="training images per class (4 classes)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--turns", type=int, default=30, help="batches each pipeline runs, taking turns")
    parser.add_argument("--decoder", choices=["auto", "opencv"], default="auto",
                        help="ours' data.decoder: opencv times the fallback without region decoding")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as root:
        lmdb_root = build_data(root, args.per_class)
        ours_data = ours(lmdb_root, args.decoder)
        streams = {
            "decode": forever(DecodeOnly(root, args.batch_size)),
            "ours": forever(ours_data.getTrainLoader(args.batch_size)),
            "torchvision": forever(torchvision_standard(root, args.batch_size)),
            "original": forever(original(lmdb_root, args.batch_size)),
        }
        for stream in streams.values():  # warm up: first batches open files and caches
            next(stream)
        seconds: dict[str, list[float]] = {name: [] for name in streams}
        for _ in range(args.turns):
            for name, stream in streams.items():
                start = time.process_time()
                next(stream)
                seconds[name].append(time.process_time() - start)
    # Medians over turns, and ratios within each turn: a neighbour's burst of load then
    # shifts no pipeline's figure against another's.
    per_turn = {name: np.array([args.batch_size / t for t in spent]) for name, spent in seconds.items()}
    rate = {name: float(np.median(rates)) for name, rates in per_turn.items()}
    ratio = {name: float(np.median(per_turn["ours"] / per_turn[name])) for name in per_turn}
    labels = {
        "decode": "JPEG decode alone, full size (cv2.imdecode)",
        "ours": "ours: LMDB, decoder above, RandomResizedCrop+flip, uint8 collate",
        "torchvision": "torchvision: ImageFolder, RandomResizedCrop+flip, ToTensor, Normalize",
        "original": "original: LMDB, OpenCV decode -> PIL -> torchvision transforms",
    }
    print(f"{NUM_CLASSES * args.per_class} photos of 300..1000 px; one process, one thread; "
          f"{args.turns} batches of {args.batch_size} per pipeline, in turns; median images per CPU second")
    print(f"ours decodes with {ours_data.describe_decoder()}")
    for name, value in rate.items():
        print(f"{labels[name]:<72} {value:8.1f} images/s")
    print(f"ours/torchvision={ratio['torchvision']:.2f}x ours/decode={ratio['decode']:.2f}x "
          f"ours/original={ratio['original']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
