"""Start-up checks of the data, so that a damaged LMDB or a list out of step with it stops the
run before training, with one line, instead of a SIGBUS or an error an hour into an epoch. They
read metadata only: a few seconds at ImageNet's 1.28M keys (``bench_list_check.py``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import lmdb

from dataset.image_list import read_list
from dataset.lmdb_dataset import open_lmdb_readonly, require_lmdb
from utils.errors import ConfigError, DataError

if TYPE_CHECKING:
    from dataset.imagenet_data import ImageNet12

REPACK = "copy it again or rerun img2lmdb.py"
# What else a user whose LMDB is missing can do: train from the JPEG folders.
NO_LMDB_HINT = ", or set data.*_data_type='img'"


def check_lmdb_whole(path: str) -> None:
    """DataError unless the LMDB's data.mdb holds every page its metadata names: reading past
    the end of an interrupted copy is a SIGBUS that kills the process without a word."""
    require_lmdb(path, hint=NO_LMDB_HINT)
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    try:
        env = open_lmdb_readonly(path)
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    except lmdb.Error as exc:  # not even the meta pages are there
        raise DataError(f"the LMDB at '{path}' cannot be opened ({exc}): {REPACK}") from None
    if size < needed:
        raise DataError(f"the LMDB at '{path}' is truncated ({size} of {needed} bytes): {REPACK}")


def check_list_in_lmdb(list_path: str, path: str) -> None:
    """DataError unless every line of the list is a key of the LMDB at path."""
    env = open_lmdb_readonly(path)
    with env.begin(buffers=False) as txn, txn.cursor() as cursor:
        keys = set(cursor.iternext(keys=True, values=False))
    lines = read_list(list_path)
    missing = [line for line in lines if line.encode("utf-8") not in keys]
    if missing:
        raise DataError(f"{len(missing)} of {len(lines)} lines of '{list_path}' are not keys "
                        f"of the LMDB at '{path}' (the first: '{missing[0]}'); the list was "
                        f"remade after packing: rerun img2lmdb.py with this list, or use the "
                        f"list it was packed with")


def check_class_count(classes: int, where: str, num_classes: int) -> None:
    """ConfigError when the data has more classes than the networks' classifiers have outputs
    (model.num_classes, the teacher's too: its weights load only at that width), which on CUDA
    would be a device-side assert in the loss that names nothing."""
    if classes > num_classes:
        raise ConfigError(f"{where} has {classes} classes but model.num_classes is "
                          f"{num_classes}; set model.num_classes={classes} (and a teacher "
                          f"with {classes} outputs)")


def check_data(data: ImageNet12, num_classes: int) -> None:
    """All start-up checks of an ``ImageNet12``'s files, and its training classes against the
    classifiers; call once per machine, before the training processes read anything."""
    for data_type, root, list_path in [(data.train_data_type, data.trainFolder, data.train_list),
                                       (data.val_data_type, data.testFolder, data.val_list)]:
        if data_type == "lmdb":
            check_lmdb_whole(root)
            check_list_in_lmdb(list_path, root)
    if data.train_data_type == "img":
        classes, where = len(data.class_names()), f"the training folder '{data.trainFolder}'"
    else:
        classes = len({line.split("/", 1)[0] for line in read_list(data.train_list)})
        where = f"the training list '{data.train_list}'"
    check_class_count(classes, where, num_classes)
