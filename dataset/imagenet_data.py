"""ImageNet12: the original's entry point for the train and validation loaders. Batches are uint8
N x 3 x H x W with int64 labels: ``DevicePrefetcher`` normalises them on the device, so no worker
builds a float batch four times the size."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataset import jpeg_region, lmdb_dataset
from dataset.checks import NO_LMDB_HINT
from dataset.folder_dataset import FolderDataset, require_folder
from dataset.image_list import class_folders
from dataset.sampling import EpochSampler
from dataset.transforms import (
    ColorJitter,
    RandomChain,
    RandomResizedCropFlip,
    RandomScaleCropFlip,
    ResizeCenterCrop,
)
from utils import distributed
from utils.config import require_choice
from utils.errors import ConfigError, DataError
from utils.preemption import loader_worker_signals

# The original's colour jitter (data.color=True): brightness, contrast and saturation 0.4.
COLOR_JITTER = 0.4
RAND_SCALE_SIDES = (256, 480)


def collate_uint8(batch: Sequence[tuple[torch.Tensor | np.ndarray, int]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 3 x H x W images (or H x W x 3, untransformed) into one N x 3 x H x W tensor,
    each written once into place: no float copy, no intermediate tensors."""
    images = None
    for i, (image, _) in enumerate(batch):
        chw = torch.as_tensor(image)
        if chw.dtype != torch.uint8:
            raise TypeError(f"collate_uint8 takes uint8 images, got {chw.dtype}; convert to float "
                            "on the device (DevicePrefetcher), not in the loader")
        if chw.shape[0] != 3:
            chw = chw.permute(2, 0, 1)
        if images is None:
            images = torch.empty((len(batch), *chw.shape), dtype=torch.uint8)
        images[i].copy_(chw)
    labels = torch.tensor([int(label) for _, label in batch], dtype=torch.int64)
    return images, labels


class ShardSampler(Sampler[int]):
    """Rank r of n takes indices r, r + n, r + 2n, ...: disjoint shards that cover the dataset
    once, without the padding DistributedSampler adds (it would count some images twice)."""

    def __init__(self, dataset_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.dataset_size, self.num_replicas, self.rank = dataset_size, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_size, self.num_replicas))


class ImageNet12:
    """Train and validation loaders over ImageNet-layout data, configured by ``cfg.data``."""

    def __init__(self, trainFolder: str, testFolder: str, num_workers: int = 8,
                 type_of_data_augmentation: str = "random_sized",
                 data_config: Mapping[str, Any] | None = None, pin_memory: bool | None = None,
                 seed: int = 0) -> None:
        config = data_config or {}
        self.trainFolder, self.testFolder = trainFolder, testFolder
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.seed = seed
        self.augmentation = str(type_of_data_augmentation).lower()
        require_choice("data.type_of_data_aug", self.augmentation, ("random_sized", "rand_scale"))
        self.size = tuple(int(s) for s in config.get("input_size", (3, 224, 224))[1:3])
        self.train_data_type = config.get("train_data_type", "lmdb")
        self.val_data_type = config.get("val_data_type", "lmdb")
        require_choice("data.train_data_type", self.train_data_type, ("lmdb", "img"))
        require_choice("data.val_data_type", self.val_data_type, ("lmdb", "img"))
        self.min_scale = float(config.get("random_sized", {}).get("min_scale", 0.08))
        self.decoder = config.get("decoder", "auto")
        require_choice("data.decoder", self.decoder, ("auto", "region", "opencv"))
        if (self.decoder == "region" and self.augmentation == "random_sized"
                and jpeg_region.region_decoder() is None):
            raise ConfigError("data.decoder='region' but JPEG decoding is "
                              f"{jpeg_region.describe()}; install a C compiler and libjpeg-turbo's "
                              "headers, or set data.decoder='auto'")
        self.color = bool(config.get("color", False))
        self.train_list = _beside(trainFolder, config.get("train_list", "train_list.txt"))
        self.val_list = _beside(testFolder, config.get("val_list", "val_list.txt"))
        self.train_num_examples: int | None = None
        self.test_num_examples: int | None = None

    def describe_decoder(self) -> str:
        """One line for logs: how the training crops are decoded."""
        if self.decoder == "opencv":
            return "OpenCV, whole images (data.decoder='opencv')"
        if self.augmentation != "random_sized":
            return f"OpenCV, whole images (data.type_of_data_aug='{self.augmentation}')"
        return jpeg_region.describe()

    def train_transform(self) -> Callable:
        """The decode-aware crop, then steps on its uint8 3 x H x W tensor: any
        torchvision.transforms.v2 transform may follow (see the README)."""
        if self.augmentation == "random_sized":
            crop: Callable = RandomResizedCropFlip(self.size, scale=(self.min_scale, 1.0),
                                                   region=self.decoder != "opencv")
        else:
            crop = RandomScaleCropFlip(self.size, *RAND_SCALE_SIDES)
        steps = [crop]
        if self.color:
            steps.append(ColorJitter(COLOR_JITTER, COLOR_JITTER, COLOR_JITTER))
        return RandomChain(steps)

    def val_transform(self) -> Callable:
        return ResizeCenterCrop(self.size)

    def class_names(self) -> list[str] | None:
        """Label order for JPEG folders: the train split's sorted class folders, as the LMDB
        packer numbers them; None (each folder its own) when the train split is an LMDB."""
        if self.train_data_type != "img":
            return None
        require_folder(self.trainFolder)
        return class_folders(self.trainFolder)

    def train_set(self) -> Dataset:
        return self._open_split(self.train_data_type, self.trainFolder, self.train_list,
                                self.train_transform())

    def val_set(self) -> Dataset:
        return self._open_split(self.val_data_type, self.testFolder, self.val_list,
                                self.val_transform())

    def _open_split(self, data_type: str, root: str, list_path: str,
                    transform: Callable) -> Dataset:
        """Datasets hand transform the file's bytes, so that it decodes each image once, at
        reduced size where it can."""
        if data_type == "lmdb":
            lmdb_dataset.require_lmdb(root, hint=NO_LMDB_HINT)
            return lmdb_dataset.LMDBDataset(root, list_path, transform=transform, decode=False)
        return FolderDataset(root, list_path, transform=transform, decode=False,
                             classes=self.class_names())

    def getTrainLoader(self, batch_size: int) -> DataLoader:
        """Reshuffled per ``loader.sampler.set_epoch(epoch)``; batch_size is per process."""
        dataset = self.train_set()
        self.train_num_examples = len(dataset)
        sampler = EpochSampler(dataset, num_replicas=distributed.get_world_size(),
                               rank=distributed.get_rank(), seed=self.seed)
        return self._loader(dataset, batch_size, sampler, drop_last=len(sampler) > batch_size,
                            persistent_workers=True)

    def getTestLoader(self, batch_size: int) -> DataLoader:
        """In order; under a process group, this rank's disjoint shard. Its workers start for
        each pass and end with it, so they hold no cores while training runs between passes."""
        dataset = self.val_set()
        self.test_num_examples = len(dataset)
        sampler = ShardSampler(len(dataset), distributed.get_world_size(), distributed.get_rank())
        return self._loader(dataset, batch_size, sampler, drop_last=False,
                            persistent_workers=False)

    def getTrainTestLoader(self, batch_size: int) -> tuple[DataLoader, DataLoader]:
        return self.getTrainLoader(batch_size), self.getTestLoader(batch_size)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler, drop_last: bool,
                persistent_workers: bool) -> DataLoader:
        workers = self.num_workers
        if workers > 0 and cv2.getNumThreads() != 1:
            # before forking: a forked worker changing the thread count of a pool that has run
            # can wait forever (4 forks in 15 hung in a trial); at one thread it is a no-op
            cv2.setNumThreads(1)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate_uint8, pin_memory=self.pin_memory, drop_last=drop_last,
                          persistent_workers=persistent_workers and workers > 0,
                          worker_init_fn=loader_worker_init)


def loader_worker_init(worker_id: int = 0) -> None:
    """The DataLoader's worker_init_fn: one OpenCV thread per worker (its default of one per
    core, in every worker, oversubscribes the machine), signals as ``loader_worker_signals``."""
    cv2.setNumThreads(1)
    loader_worker_signals(worker_id)


def open_imagenet(data_cfg: Mapping[str, Any], num_workers: int, seed: int = 0) -> ImageNet12:
    """The train and validation data of cfg.data, read by num_workers loader processes each."""
    root = data_cfg["data_path"]
    if not os.path.isdir(root):
        raise DataError(f"data.data_path '{root}' is not a folder; point it at the folder that "
                        f"holds train/, val/ and the list files")
    return ImageNet12(os.path.join(root, "train"), os.path.join(root, "val"), num_workers,
                      data_cfg["type_of_data_aug"], data_cfg, seed=seed)


def batches_in_every_shard(loader: DataLoader) -> int:
    """How many batches every process's validation shard holds (ShardSampler loaders): a
    collective asked once per batch must be asked no more often than this."""
    shortest = loader.sampler.dataset_size // loader.sampler.num_replicas  # the last rank's
    return math.ceil(shortest / loader.batch_size)


def _beside(folder: str, name: str) -> str:
    """A file next to folder (in its parent), as the original keeps the list files."""
    return os.path.join(os.path.dirname(os.path.normpath(folder)), name)
