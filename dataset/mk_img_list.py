"""Write ``<output_path>/<split>_list.txt`` for every split folder of an ImageNet-layout tree.

A split folder is a folder of class folders (``train/n01440764/...``); each list has one
``wnid/file`` line per image file (.jpeg, .jpg, .png in any case), sorted, so lists are the
same on every file system. A rerun replaces the lists (the original appended to them, which
duplicated every line).

    python3 dataset/mk_img_list.py --image_path /path/to/imagenet --output_path /path/to/imagenet

The list format itself lives in dataset/image_list.py.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.image_list import (  # noqa: E402
    IMAGE_EXTENSIONS,
    ImageListError,
    class_folders,
    list_file_path,
    read_list,
    visible_subfolders,
    write_list,
)

__all__ = ["ImageListError", "class_folders", "list_file_path", "list_images", "main", "make_lists",
           "read_list", "split_folders", "write_list"]


def split_folders(image_path: str) -> list[str]:
    """The names of the folders under image_path that hold class folders, sorted."""
    if not os.path.isdir(image_path):
        raise ImageListError(f"image folder '{image_path}' not found; pass the folder that holds train/ and val/")
    return [name for name in visible_subfolders(image_path) if visible_subfolders(os.path.join(image_path, name))]


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(split_dir: str) -> list[str]:
    """Sorted ``class/file`` paths (with '/' on every OS) of the image files under split_dir's class folders."""
    lines = []
    for wnid in class_folders(split_dir):
        class_dir = os.path.join(split_dir, wnid)
        for folder, subfolders, files in os.walk(class_dir, followlinks=True):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            relative = os.path.relpath(folder, split_dir).replace(os.sep, "/")
            for name in files:
                if not is_image_file(name):
                    continue
                if "\n" in name or "\r" in name:
                    raise ImageListError(f"file name {os.path.join(folder, name)!r} has a line break; rename it")
                lines.append(f"{relative}/{name}")
    return sorted(lines)


def make_lists(image_path: str, output_path: str) -> dict[str, int]:
    """Write one list per split folder; returns the number of images per split."""
    splits = split_folders(image_path)
    if not splits:
        raise ImageListError(f"no split folders (folders of class folders such as train/n01440764/) under '{image_path}'")
    os.makedirs(output_path, exist_ok=True)
    counts = {}
    for split in splits:
        lines = list_images(os.path.join(image_path, split))
        write_list(list_file_path(output_path, split), lines)
        counts[split] = len(lines)
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_path", required=True, help="folder holding the split folders (train/, val/)")
    parser.add_argument("--output_path", required=True, help="folder for the <split>_list.txt files")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        counts = make_lists(args.image_path, args.output_path)
    except (ImageListError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, count in counts.items():
        print(f"{split}: {count} images -> {list_file_path(args.output_path, split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
