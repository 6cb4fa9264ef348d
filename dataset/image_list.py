"""The list file format, and the label order, shared by the list maker, the packer and the datasets.

A list file (``<split>_list.txt``; the original's ``<split>_datalist``) holds one ``wnid/file``
line per image, sorted. A class's label is its position among the sorted class folders of the
train split, as in torchvision's ImageFolder and the official teachers' weights.
"""

from __future__ import annotations

import os

from utils.errors import DataError
from utils.files import atomic_write_text

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def visible_subfolders(path: str) -> list[str]:
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def class_folders(split_dir: str) -> list[str]:
    """The sorted class folder names of a split: the order that defines the labels."""
    if not os.path.isdir(split_dir):
        raise DataError(f"image folder '{split_dir}' not found; point to the folder that holds "
                        "the train/ and val/ class folders")
    return visible_subfolders(split_dir)


def list_file_path(list_dir: str, split: str) -> str:
    return os.path.join(list_dir, f"{split}_list.txt")


def read_list(path: str) -> list[str]:
    """The lines of a list file, without surrounding white space or blank lines."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise DataError(f"image list '{path}' not found; "
                        "make it with dataset/mk_img_list.py") from None
    except UnicodeDecodeError:
        raise DataError(f"image list '{path}' is not UTF-8 text; remake it with "
                        "dataset/mk_img_list.py") from None


def write_list(path: str, lines: list[str]) -> None:
    """Replace the list atomically, so that an interrupted write never leaves half a list."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))
