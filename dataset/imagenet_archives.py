"""ImageNet's official archives and validation label files, read in place: listing reads the tar
headers only, packing reads each archive once, front to back, skipping stored images unread. The
train tar holds 1,000 inner tars ``<wnid>.tar`` of JPEGs, the val tar 50,000 flat JPEGs; the
devkit's ``data/meta.mat`` maps ILSVRC2012_ID -> wnid (not in sorted-wnid order), and its ground
truth file holds one ID per validation image. Kaggle's copy has extracted folders, a flat
``val/`` and ``LOC_val_solution.csv`` instead.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from collections.abc import Collection, Iterator
from typing import BinaryIO, NamedTuple

from dataset.image_list import is_image_file
from utils.errors import DataError

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_HEADER = "ImageId"

_WNID = re.compile(r"n\d{8}")
_STREAM_BUFFER = 1 << 20  # read-ahead buffer of an archive read as a stream


class Archives(NamedTuple):
    train: str
    val: str
    devkit: str


def _has_subfolder(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    with os.scandir(path) as entries:
        return any(e.is_dir() for e in entries)


def find_archives(image_path: str) -> Archives | None:
    """The official files in image_path, when it holds any of them and no extracted train/ tree
    (a train/ folder without subfolders is an LMDB packed there); a missing one is named."""
    names = (TRAIN_TAR, VAL_TAR, DEVKIT)
    paths = [os.path.join(image_path, name) for name in names]
    missing = [path for path in paths if not os.path.isfile(path)]
    if len(missing) == len(paths) or _has_subfolder(os.path.join(image_path, "train")):
        return None
    if missing:
        raise DataError(f"archive '{missing[0]}' not found; put the three official ImageNet files "
                        f"({', '.join(names)}) side by side in '{image_path}'")
    return Archives(*paths)


def _damaged(path: str, reason: object) -> DataError:
    return DataError(f"'{path}' is not a complete tar file ({reason}); download it again")


def _read_devkit_member(devkit: str, suffix: str) -> bytes:
    try:
        with tarfile.open(devkit, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(suffix):
                    return tar.extractfile(member).read()
    except FileNotFoundError:
        raise DataError(f"devkit '{devkit}' not found; pass {DEVKIT} with --devkit") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _damaged(devkit, exc) from None
    raise DataError(f"devkit '{devkit}' holds no {suffix}; download {DEVKIT} again")


def devkit_classes(devkit: str) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the 1,000 leaf synsets of the devkit's meta.mat."""
    import scipy.io

    data = _read_devkit_member(devkit, META_MAT)
    try:
        synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        classes = {int(s["ILSVRC2012_ID"]): str(s["WNID"])
                   for s in synsets if int(s["num_children"]) == 0}
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise DataError(f"{META_MAT} in '{devkit}' is not the devkit's synset table ({exc}); "
                        f"download {DEVKIT} again") from None
    if not classes:
        raise DataError(f"{META_MAT} in '{devkit}' names no leaf synsets; download {DEVKIT} again")
    return classes


def _check_wnid(name: str, where: str, suffix: str = "") -> str:
    """name, which must be a wnid; suffix completes it to the name of the file it came from."""
    if not _WNID.fullmatch(name):
        raise DataError(f"'{name}{suffix}' in '{where}' is not named after a wnid (n01440764 and "
                        "so on); remove it or download the archive again")
    return name


def _file_members(f: BinaryIO, path: str, end: int) -> Iterator[tarfile.TarInfo]:
    """The file members of the tar at f's position, front to back; none may pass end. Each header
    is read at its own offset, so the caller may read a member's data in between."""
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # closing it leaves f open
            for member in tar:
                if member.offset_data + member.size > end:
                    raise _damaged(path, f"it ends inside {member.name}")
                if member.isfile():
                    yield member
            # a tar cut short between members reads as a shorter valid one: the end marker tells
            f.seek(tar.offset)
            if f.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise _damaged(path, "it has no end-of-archive marker")
    except (tarfile.TarError, EOFError) as exc:
        raise _damaged(path, exc) from None


def _image_members(f: BinaryIO, path: str, end: int) -> Iterator[tuple[tarfile.TarInfo, str]]:
    """(member, name) of the image files among ``_file_members``."""
    for member in _file_members(f, path, end):
        if "\n" in member.name or "\r" in member.name:
            raise DataError(f"member {member.name!r} of '{path}' has a line break in its name")
        name = member.name.removeprefix("./")
        if is_image_file(name):
            yield member, name


def _open_archive(path: str, buffering: int) -> BinaryIO:
    try:
        return open(path, "rb", buffering=buffering)
    except FileNotFoundError:
        raise DataError(f"archive '{path}' not found") from None


def _inner_tars(f: BinaryIO, path: str) -> Iterator[tuple[str, str, int]]:
    """(wnid, where, end) of each inner tar of the train tar, with f at its first header."""
    for inner in _file_members(f, path, os.fstat(f.fileno()).st_size):
        wnid = _check_wnid(inner.name.removeprefix("./").removesuffix(".tar"), path, ".tar")
        f.seek(inner.offset_data)
        yield wnid, f"{path}/{inner.name}", inner.offset_data + inner.size


def train_classes(path: str) -> list[str]:
    """The sorted wnids of the train tar's inner tars (the label order), from the outer headers."""
    with _open_archive(path, 0) as f:
        return sorted(wnid for wnid, _, _ in _inner_tars(f, path))


def list_train_tar(path: str) -> list[str]:
    """Sorted ``wnid/file`` lines of the train tar's images, from the headers alone."""
    lines = []
    with _open_archive(path, 0) as f:  # unbuffered: a header is one short read
        for wnid, where, end in _inner_tars(f, path):
            lines.extend(f"{wnid}/{name}" for _, name in _image_members(f, where, end))
    return sorted(lines)


def list_val_tar(path: str) -> list[str]:
    """Sorted names of the validation tar's images, from the headers alone."""
    with _open_archive(path, 0) as f:
        return sorted(name for _, name in _image_members(f, path, os.fstat(f.fileno()).st_size))


def read_val_labels(labels_file: str, image_names: list[str], source: str,
                    devkit: str | None) -> dict[str, str]:
    """Validation image name -> wnid, for every one of image_names (found in source), from
    Kaggle's LOC_val_solution.csv or the devkit's ground-truth file (IDs, read with devkit)."""
    try:
        with open(labels_file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"validation labels '{labels_file}' not found") from None
    except UnicodeDecodeError:
        raise DataError(f"validation labels '{labels_file}' are not text; pass "
                        "LOC_val_solution.csv or the devkit's ground-truth file") from None
    if text.startswith(KAGGLE_HEADER):
        by_name = _kaggle_labels(text, labels_file)
    else:
        if devkit is None:
            raise DataError(f"'{labels_file}' is not Kaggle's CSV, so it is read as the devkit's "
                            f"ground-truth file, which needs the devkit: add --devkit {DEVKIT}")
        by_name = _ground_truth_labels(text, labels_file, image_names, source,
                                       devkit_classes(devkit))
    for name in image_names:
        if name not in by_name:
            raise DataError(f"validation image '{name}' in '{source}' has no label in "
                            f"'{labels_file}'; pass the labels of these images")
    return {name: by_name[name] for name in image_names}


def _kaggle_labels(text: str, labels_file: str) -> dict[str, str]:
    by_name = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if number == 1 or not row:
            continue
        words = row[1].split() if len(row) == 2 else []
        if not words:
            raise DataError(f"line {number} of '{labels_file}' is not 'ImageId,wnid ...'")
        by_name[row[0] + ".JPEG"] = _check_wnid(words[0], labels_file)
    return by_name


def _ground_truth_labels(text: str, labels_file: str, image_names: list[str], source: str,
                         classes: dict[int, str]) -> dict[str, str]:
    ids = text.split()
    if len(ids) != len(image_names):
        raise DataError(f"'{labels_file}' has {len(ids)} labels but '{source}' holds "
                        f"{len(image_names)} validation images; pass the ground truth that "
                        "belongs to these images")
    by_name = {}
    for number, (name, class_id) in enumerate(zip(sorted(image_names), ids), start=1):
        if not class_id.isdigit() or int(class_id) not in classes:
            raise DataError(f"line {number} of '{labels_file}' is '{class_id}', not an "
                            "ILSVRC2012_ID of the devkit")
        by_name[name] = classes[int(class_id)]
    return by_name


def val_lines(wnid_by_name: dict[str, str]) -> list[str]:
    """Sorted list lines for flat validation images, as if sorted into class folders."""
    return sorted(f"{wnid}/{name}" for name, wnid in wnid_by_name.items())


def archive_val_labels(archives: Archives, val_labels: str | None,
                       classes: dict[int, str] | None = None) -> dict[str, str]:
    """Name -> wnid of every validation tar image: from val_labels, else the devkit's."""
    names = list_val_tar(archives.val)
    if val_labels is not None:
        return read_val_labels(val_labels, names, archives.val, archives.devkit)
    ground_truth = _read_devkit_member(archives.devkit, GROUND_TRUTH).decode("ascii", "replace")
    return _ground_truth_labels(ground_truth, f"{archives.devkit}/{GROUND_TRUTH}", names,
                                archives.val, classes or devkit_classes(archives.devkit))


def archive_lists(archives: Archives, val_labels: str | None) -> dict[str, list[str]]:
    """The train and val list lines of the official archives; every validation image labelled."""
    classes = devkit_classes(archives.devkit)
    train = list_train_tar(archives.train)
    unknown = sorted({line.partition("/")[0] for line in train} - set(classes.values()))
    if unknown:
        raise DataError(f"'{unknown[0]}.tar' in '{archives.train}' is not one of the devkit's "
                        f"{len(classes)} classes; remove it or download the archive again")
    return {"train": train, "val": val_lines(archive_val_labels(archives, val_labels, classes))}


def stream_images(archives: Archives, split: str,
                  wanted: Collection[str]) -> Iterator[tuple[str, str, bytes]]:
    """(list line, where, bytes) of each image of the split whose line is in wanted, reading its
    tar once, front to back. wanted is consulted as the tar is read, so the caller may shrink it."""
    path = archives.train if split == "train" else archives.val
    with _open_archive(path, _STREAM_BUFFER) as f:
        if split == "train":
            tars = _inner_tars(f, path)
        else:  # one flat tar: no wnid in it, the lines come from wanted
            line_by_name = {line.rpartition("/")[2]: line for line in wanted}
            tars = [(None, path, os.fstat(f.fileno()).st_size)]
        for wnid, where, end in tars:
            for member, name in _image_members(f, where, end):
                line = line_by_name.get(name, "") if wnid is None else f"{wnid}/{name}"
                if line in wanted:  # a stored image is skipped, never read nor decoded
                    f.seek(member.offset_data)
                    data = f.read(member.size)
                    if len(data) != member.size:
                        raise _damaged(where, f"it ends inside {name}")
                    yield line, f"{where}/{name}", data
