"""What the LMDB and the JPEG-folder datasets share: samples named by a list file, read, decoded,
transformed."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from dataset.image_io import decode_rgb
from dataset.image_list import read_list as read_list_lines
from dataset.sampling import SampleKey, sample_generator
from dataset.transforms import apply_transform
from utils.errors import DataError


def read_list(list_path: str) -> np.ndarray:
    """The list file's lines, UTF-8 encoded, as one fixed-width numpy bytes array: a Python list
    of 1.28M strings would be copied into every forked loader worker as reference counts are
    touched; one numpy array is not."""
    names = [line.encode("utf-8") for line in read_list_lines(list_path)]
    if not names:
        raise DataError(f"image list '{list_path}' is empty; remake it with dataset/mk_img_list.py")
    return np.array(names, dtype=np.bytes_)


def with_context(exc: DataError, context: str) -> DataError:
    """exc with context in front of its message, of exc's type where it can be."""
    message = f"{context}: {exc}"
    try:
        return type(exc)(message)
    except TypeError:
        return DataError(message)


class ListDataset(Dataset):
    """``ds[i]`` is ``(sample, target)`` for the i-th line of the list; with ``decode=False`` the
    transform receives the file's bytes, to decode at a reduced size. ``ds[SampleKey(...)]`` is
    the same sample, its transform drawing from that key's generator (``dataset.sampling``)."""

    def __init__(self, list_path: str, transform: Callable | None = None,
                 target_transform: Callable | None = None, decode: bool = True) -> None:
        self.names = read_list(list_path)
        self.transform = transform
        self.target_transform = target_transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return self.names[index].decode("utf-8")

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """The image file's bytes and the label of sample index."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Sample index, named for an error message."""
        raise NotImplementedError

    def __getitem__(self, index: int | SampleKey) -> tuple[Any, Any]:
        rng = None
        if isinstance(index, SampleKey):
            index, rng = index.index, sample_generator(index)
        # a damaged record or image fails here: the error names the sample to replace
        try:
            data, target = self.read_raw(index)
            sample: Any = decode_rgb(data) if self.decode else data
            if self.transform is not None:
                sample = (self.transform(sample) if rng is None
                          else apply_transform(self.transform, sample, rng))
        except DataError as exc:
            raise with_context(exc, self.where(index)) from exc
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target
