"""An ImageFolder-style dataset over an LMDB of the original WSLD format (ours or the original tool's).

The environment is opened lazily, in whichever process first reads a sample, so the dataset
works in the main process and in fork or spawn DataLoader workers. Sample names live in one
numpy byte array: a Python list of 1.28M strings would be copied page by page into every
forked worker as reference counts are touched.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import lmdb
import numpy as np
from torch.utils.data import Dataset

from dataset.image_io import decode_rgb
from dataset.lmdb_format import decode_record
from dataset.mk_img_list import read_list as read_list_lines

# Open environments of this process, by real path. py-lmdb refuses to open one environment
# twice in a process (an inherited, forked copy included), so datasets on the same LMDB share
# one handle; the pid tells a handle inherited through fork, which is closed and reopened.
_OPEN_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


class MissingSampleError(KeyError):
    """A list line whose key the LMDB lacks: the list and the LMDB are out of step."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


def open_lmdb_readonly(path: str) -> lmdb.Environment:
    """This process's read-only, lock-free handle on the LMDB environment at path (any spelling of it)."""
    return _open_resolved(os.path.realpath(path))


def _open_resolved(real_path: str) -> lmdb.Environment:
    """open_lmdb_readonly for a path os.path.realpath already resolved: the per-read call.

    Resolving walks every component of the path with a system call each, about 3% of the input
    pipeline when done per image, so datasets resolve their root once.
    """
    cached = _OPEN_ENVS.get(real_path)
    if cached is not None:
        pid, env = cached
        if pid == os.getpid():
            return env
        env.close()  # inherited through fork: closing only unmaps it in this process
        del _OPEN_ENVS[real_path]
    if not os.path.isfile(os.path.join(real_path, "data.mdb")):
        raise FileNotFoundError(f"no LMDB at '{real_path}' (data.mdb missing); build it with dataset/img2lmdb.py")
    env = lmdb.open(real_path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=2048)
    _OPEN_ENVS[real_path] = (os.getpid(), env)
    return env


def _with_context(exc: ValueError, context: str) -> ValueError:
    """exc with context in front of its message, of the same type where its constructor takes a message."""
    message = f"{context}: {exc}"
    try:
        return type(exc)(message)
    except TypeError:  # e.g. UnicodeDecodeError or msgpack's ExtraData, built from parts
        return ValueError(message)


def read_list(list_path: str) -> np.ndarray:
    """The list file's lines (``wnid/file``), UTF-8 encoded, as one compact fixed-width numpy bytes array."""
    names = [line.encode("utf-8") for line in read_list_lines(list_path)]
    if not names:
        raise ValueError(f"image list '{list_path}' is empty; remake it with dataset/mk_img_list.py")
    return np.array(names, dtype=np.bytes_)


class ImageFolder(Dataset):
    """``ds[i]`` is ``(sample, target)`` for the i-th line of the list.

    ``sample`` is the decoded RGB image (H x W x 3 uint8) passed through ``transform``; with
    ``decode=False`` the transform receives the stored file bytes instead, so that it can
    decode at a reduced size. ``target`` is the stored class index (an int) passed through
    ``target_transform``.
    """

    def __init__(self, root: str, list_path: str, transform: Callable | None = None,
                 target_transform: Callable | None = None, decode: bool = True) -> None:
        self.root = root
        self._real_root = os.path.realpath(root)  # the LMDB cache key, resolved once (see _open_resolved)
        self.names = read_list(list_path)
        self.transform = transform
        self.target_transform = target_transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return self.names[index].decode("utf-8")

    def _where(self, index: int) -> str:
        return f"image '{self.name(index)}' in the LMDB at '{self.root}'"

    def read_raw(self, index: int) -> tuple[bytes, int]:
        """The stored image bytes and label of sample index."""
        key = self.names[index]
        with _open_resolved(self._real_root).begin(buffers=False) as txn:
            value = txn.get(key)
        if value is None:
            raise MissingSampleError(f"key '{key.decode('utf-8')}' is in the list but not in the LMDB at "
                                     f"'{self.root}'; rerun dataset/img2lmdb.py for this list")
        try:
            return decode_record(value)
        except ValueError as exc:
            raise _with_context(exc, self._where(index)) from exc

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        data, target = self.read_raw(index)
        # A damaged image fails in the decode, or in a transform that decodes the bytes itself;
        # either error names the record, so the user knows which one to repack.
        try:
            sample: Any = decode_rgb(data) if self.decode else data
            if self.transform is not None:
                sample = self.transform(sample)
        except ValueError as exc:
            raise _with_context(exc, self._where(index)) from exc
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target
