"""Write ``<output_path>/<split>_list.txt`` for every split folder of an ImageNet-layout tree.

One sorted ``wnid/file`` line per image file (.jpeg, .jpg, .png in any case) of a split's class
folders, of the official archives, or of a flat val/ folder with ``--val_labels`` as if sorted
into class folders. A rerun replaces the lists (the original appended, duplicating every line).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import imagenet_archives  # noqa: E402
from dataset.image_list import (  # noqa: E402
    class_folders,
    is_image_file,
    list_file_path,
    visible_subfolders,
    write_list,
)
from utils.errors import DataError  # noqa: E402


def split_folders(image_path: str) -> list[str]:
    """The names of the folders under image_path that hold class folders, sorted."""
    if not os.path.isdir(image_path):
        raise DataError(f"image folder '{image_path}' not found; pass the folder that holds train/ "
                        "and val/")
    return [name for name in visible_subfolders(image_path)
            if visible_subfolders(os.path.join(image_path, name))]


def list_images(split_dir: str) -> list[str]:
    """Sorted ``class/file`` lines ('/' on every OS) of the image files in split_dir's classes."""
    lines = []
    for wnid in class_folders(split_dir):
        for folder, subfolders, files in os.walk(os.path.join(split_dir, wnid), followlinks=True):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            relative = os.path.relpath(folder, split_dir).replace(os.sep, "/")
            for name in filter(is_image_file, files):
                if "\n" in name or "\r" in name:
                    raise DataError(f"file name {os.path.join(folder, name)!r} has a line break; "
                                    "rename it")
                lines.append(f"{relative}/{name}")
    return sorted(lines)


def list_flat_images(folder: str) -> list[str]:
    """Sorted names of the image files directly in folder (a flat validation folder)."""
    if not os.path.isdir(folder):
        raise DataError(f"validation folder '{folder}' not found; --val_labels needs the flat val/ "
                        "folder of images under --image_path")
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.is_file() and is_image_file(e.name))
    if not names:
        raise DataError(f"no image files directly in '{folder}'; --val_labels is for a flat val/ "
                        "folder")
    return names


def flat_val_labels(image_path: str, val_labels: str, devkit: str | None) -> dict[str, str]:
    """Name -> wnid of every image in the flat ``<image_path>/val`` folder, from the labels file."""
    val_dir = os.path.join(image_path, "val")
    if os.path.isdir(val_dir) and visible_subfolders(val_dir):
        raise DataError(f"'{val_dir}' is already in class folders; leave out --val_labels")
    return imagenet_archives.read_val_labels(val_labels, list_flat_images(val_dir), val_dir, devkit)


def make_lists(image_path: str, output_path: str, val_labels: str | None = None,
               devkit: str | None = None) -> dict[str, int]:
    """Write one list per split; returns each split's image count. Every list is worked out
    before any is written, so that an error leaves the old lists as they were."""
    archives = imagenet_archives.find_archives(image_path)
    if archives is not None:
        lists = imagenet_archives.archive_lists(archives, val_labels)
    else:
        splits = split_folders(image_path)
        lists = {split: list_images(os.path.join(image_path, split)) for split in splits}
        if val_labels is not None:
            wnid_by_name = flat_val_labels(image_path, val_labels, devkit)
            lists["val"] = imagenet_archives.val_lines(wnid_by_name)
        if not lists:
            raise DataError(f"no split folders (folders of class folders such as train/n01440764/) "
                            f"under '{image_path}', nor the official archives")
    os.makedirs(output_path, exist_ok=True)
    for split, lines in lists.items():
        write_list(list_file_path(output_path, split), lines)
    return {split: len(lines) for split, lines in lists.items()}


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """--val_labels and --devkit, shared with the packer."""
    parser.add_argument("--val_labels", default=None,
                        help="labels of a flat val/ folder: Kaggle's LOC_val_solution.csv, or the "
                             "devkit's ILSVRC2012_validation_ground_truth.txt together with "
                             "--devkit")
    parser.add_argument("--devkit", default=None,
                        help="ILSVRC2012_devkit_t12.tar.gz, for the ground-truth file's IDs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_path", required=True,
                        help="folder holding the split folders (train/, val/), or the three "
                             "official archives")
    parser.add_argument("--output_path", required=True,
                        help="folder for the <split>_list.txt files")
    add_label_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        counts = make_lists(args.image_path, args.output_path, args.val_labels, args.devkit)
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, count in counts.items():
        print(f"{split}: {count} images -> {list_file_path(args.output_path, split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
