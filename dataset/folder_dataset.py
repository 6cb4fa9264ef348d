"""A dataset over ImageNet's JPEG class folders that mirrors ``LMDBDataset``: a class's index is
its position among the train split's sorted class folders, as the LMDB packer numbers it, so a
split can move between ``img`` and ``lmdb`` without changing a single label."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Callable

import numpy as np

from dataset.image_list import class_folders
from dataset.list_dataset import ListDataset
from utils.errors import DataError


def require_folder(root: str) -> None:
    if not os.path.isdir(root):
        raise DataError(f"image folder '{root}' not found; set data.data_path to the folder "
                        "that holds the train/ and val/ class folders")


def labels_for(names: np.ndarray, classes: Sequence[str], list_path: str) -> np.ndarray:
    """The class index of every list line ``wnid/file``, as a compact int32 array."""
    index = {name.encode("utf-8"): label for label, name in enumerate(classes)}
    wnids, inverse = np.unique(np.char.partition(names, b"/")[:, 0], return_inverse=True)
    unknown = [w.decode("utf-8") for w in wnids if w not in index]
    if unknown:
        raise DataError(f"list '{list_path}' names classes that are not class folders of the train "
                        f"split (e.g. '{unknown[0]}'); remake it with dataset/mk_img_list.py")
    return np.array([index[w] for w in wnids], dtype=np.int32)[inverse.reshape(-1)]


class FolderDataset(ListDataset):
    """The samples of a list, read from the class folders under root; ``classes`` (the label
    order) defaults to root's own class folders."""

    def __init__(self, root: str, list_path: str, transform: Callable | None = None,
                 target_transform: Callable | None = None, decode: bool = True,
                 classes: Sequence[str] | None = None) -> None:
        require_folder(root)
        self.classes = list(classes) if classes is not None else class_folders(root)
        super().__init__(list_path, transform, target_transform, decode)
        self.root = root
        self.targets = labels_for(self.names, self.classes, list_path)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.name(index))

    def where(self, index: int) -> str:
        return self.path(index)

    def read_raw(self, index: int) -> tuple[bytes, int]:
        with open(self.path(index), "rb") as f:
            return f.read(), int(self.targets[index])
