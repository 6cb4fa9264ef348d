"""An ImageFolder-style dataset over an LMDB of the original WSLD format (ours or the original
tool's), opened lazily in whichever process first reads a sample, so fork and spawn workers work."""

from __future__ import annotations

import os
from typing import Callable

import lmdb

from dataset.list_dataset import ListDataset
from dataset.lmdb_format import decode_record
from utils.errors import DataError

# Open environments of this process, by real path. py-lmdb refuses to open one environment
# twice in a process (an inherited, forked copy included), so datasets on the same LMDB share
# one handle; the pid tells a handle inherited through fork, which is closed and reopened.
_OPEN_ENVS: dict[str, tuple[int, lmdb.Environment]] = {}


def open_lmdb_readonly(path: str) -> lmdb.Environment:
    """This process's read-only, lock-free handle on the LMDB at path (any spelling of it)."""
    return _open_resolved(os.path.realpath(path))


def require_lmdb(path: str, hint: str = "") -> None:
    """Raise DataError, saying how to build one, unless path holds an LMDB."""
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        raise DataError(f"no LMDB at '{path}' (data.mdb missing); build it with "
                        f"dataset/img2lmdb.py{hint}")


def _open_resolved(real_path: str) -> lmdb.Environment:
    """open_lmdb_readonly for a path already resolved: resolving costs a system call per path
    component, about 3% of the input pipeline when done per image."""
    cached = _OPEN_ENVS.get(real_path)
    if cached is not None:
        pid, env = cached
        if pid == os.getpid():
            return env
        env.close()  # inherited through fork: closing only unmaps it in this process
        del _OPEN_ENVS[real_path]
    require_lmdb(real_path)
    env = lmdb.open(real_path, readonly=True, lock=False, readahead=False, meminit=False,
                    max_readers=2048)
    _OPEN_ENVS[real_path] = (os.getpid(), env)
    return env


class LMDBDataset(ListDataset):
    """The samples of a list, read from the LMDB at root, with the labels stored there."""

    def __init__(self, root: str, list_path: str, transform: Callable | None = None,
                 target_transform: Callable | None = None, decode: bool = True) -> None:
        super().__init__(list_path, transform, target_transform, decode)
        self.root = root
        self._real_root = os.path.realpath(root)  # resolved once: see _open_resolved

    def where(self, index: int) -> str:
        return f"image '{self.name(index)}' in the LMDB at '{self.root}'"

    def read_raw(self, index: int) -> tuple[bytes, int]:
        key = self.names[index]
        with _open_resolved(self._real_root).begin(buffers=False) as txn:
            value = txn.get(key)
        if value is None:
            raise DataError(f"key '{key.decode('utf-8')}' is in the list but not in the LMDB at "
                            f"'{self.root}'; rerun dataset/img2lmdb.py for this list")
        return decode_record(value)


ImageFolder = LMDBDataset  # the original's name for this dataset, kept for code that imports it
