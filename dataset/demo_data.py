"""ImageNet-layout trees, and ImageNet's official archives, of the real images scikit-learn ships
(two photographs, 1,797 digits), for tests, benchmarks and the demo: nothing is downloaded."""

from __future__ import annotations

import gzip as gzip_module
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import DataError


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photographs (427 x 640 RGB)."""
    from sklearn.datasets import load_sample_images

    return [np.asarray(img) for img in load_sample_images().images]


def random_photo(photos: list[np.ndarray], rng: np.random.Generator,
                 side_range: tuple[int, int]) -> Image.Image:
    """A random crop of a random photo, resized so its longer side lies in side_range."""
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(photo[y:y + ch, x:x + cw])
    side = int(rng.integers(side_range[0], side_range[1] + 1))
    scale = side / max(ch, cw)
    return crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)


def write_photo_tree(root: str, images_per_class: dict[str, int], num_classes: int = 4,
                     side_range: tuple[int, int] = (96, 160),
                     quality_range: tuple[int, int] = (75, 95),
                     seed: int = 0) -> None:
    """Write ``root/<split>/<wnid>/<wnid>_<i>.JPEG`` photos, wnids n00000000, n00000001, ..."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    classes = [f"n{index:08d}" for index in range(num_classes)]
    for split, count in images_per_class.items():
        for wnid in classes:
            folder = os.path.join(root, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image = random_photo(photos, rng, side_range)
                quality = int(rng.integers(quality_range[0], quality_range[1] + 1))
                image.save(os.path.join(folder, f"{wnid}_{i}.JPEG"), quality=quality)


def write_digits_tree(root: str, val_fraction: float = 0.2, size: int = 32,
                      seed: int = 0) -> None:
    """scikit-learn's digits as RGB JPEGs in ``root/{train,val}/<digit>/``, split stratified and
    fixed by seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        num_val = int(round(len(indices) * val_fraction))
        for rank, index in enumerate(indices):
            split = "val" if rank < num_val else "train"
            folder = os.path.join(root, split, f"digit_{label}")
            os.makedirs(folder, exist_ok=True)
            grey = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(grey).resize((size, size), Image.BICUBIC).convert("RGB")
            image.save(os.path.join(folder, f"{index:04d}.JPEG"), quality=95)


def prepare_demo_data(root: str) -> None:
    """The demo's digits in root, listed and packed into LMDBs with the tools a user runs on
    ImageNet. The tree is written once, atomically, so an interrupted build is redone rather
    than half-used; packing again is cheap, as img2lmdb skips the records already stored."""
    from dataset import img2lmdb, mk_img_list  # the packer's imports cost only the demo

    if not os.path.isdir(os.path.join(root, "train")):
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".demo_data.", dir=parent)
        try:
            write_digits_tree(staging)
            os.replace(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    steps = [(mk_img_list.main, ["--image_path", root, "--output_path", root])]
    for split in ("train", "val"):
        steps.append((img2lmdb.main, ["--image_path", root, "--list_path", root,
                                      "--output_path", root, "--split", split]))
    for tool, argv in steps:
        if tool(argv) != 0:
            raise DataError(f"preparing the demo data failed at {tool.__module__} "
                            f"{' '.join(argv)}; the tool's message above says why")


SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                 "wordnet_height", "num_train_images")
DEVKIT_FOLDER = "ILSVRC2012_devkit_t12"


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of files (name -> bytes), in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar(path: str, files: dict[str, bytes], gzip: bool = False) -> None:
    data = tar_bytes(files)
    with open(path, "wb") as f:
        f.write(gzip_module.compress(data) if gzip else data)


def folder_files(folder: str) -> dict[str, bytes]:
    """name -> bytes of the files in folder, sorted by name."""
    return {name: Path(folder, name).read_bytes() for name in sorted(os.listdir(folder))}


def devkit_meta_mat(class_ids: dict[str, int], parents: dict[str, list[int]]) -> bytes:
    """meta.mat as the devkit lays it out: a one-column struct array ``synsets``, the leaf classes
    first in ID order, then non-leaf synsets (num_children > 0) numbered after them."""
    import scipy.io

    rows = [(class_id, wnid, f"class {wnid}", f"gloss of {wnid}", 0, np.zeros((1, 0)), 0, 1300)
            for wnid, class_id in sorted(class_ids.items(), key=lambda item: item[1])]
    rows += [(len(class_ids) + k, wnid, "parent", "a parent synset", len(children),
              np.array(children), 2, 0)
             for k, (wnid, children) in enumerate(parents.items(), start=1)]
    synsets = np.array([[row] for row in rows], dtype=[(name, object) for name in SYNSET_FIELDS])
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def write_devkit(path: str, class_ids: dict[str, int], ground_truth: list[int] | None,
                 with_meta: bool = True) -> None:
    """The devkit's tar.gz with data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt."""
    files = {f"{DEVKIT_FOLDER}/COPYING": b"devkit"}
    if with_meta:
        parents = {"n09000001": [1, 2], "n09000002": [len(class_ids) + 1, 3]}
        files[f"{DEVKIT_FOLDER}/data/meta.mat"] = devkit_meta_mat(class_ids, parents)
    if ground_truth is not None:
        text = "".join(f"{class_id}\n" for class_id in ground_truth)
        files[f"{DEVKIT_FOLDER}/data/ILSVRC2012_validation_ground_truth.txt"] = text.encode("ascii")
    write_tar(path, files, gzip=True)


def write_official_archives(tree: str, out_dir: str, seed: int = 0) -> dict[str, int]:
    """Write tree's train/ and val/ class folders as ImageNet's three official files in out_dir
    and return wnid -> ID. The val tar holds the validation files flat (of one name, the last
    class's); the devkit numbers the classes in a shuffled order, unlike the sorted wnids."""
    train, val = os.path.join(tree, "train"), os.path.join(tree, "val")
    wnids = sorted(os.listdir(train))
    ids = np.random.default_rng(seed).permutation(len(wnids)) + 1
    class_ids = {wnid: int(class_id) for wnid, class_id in zip(wnids, ids)}
    os.makedirs(out_dir, exist_ok=True)
    write_tar(os.path.join(out_dir, "ILSVRC2012_img_train.tar"),
              {f"{wnid}.tar": tar_bytes(folder_files(os.path.join(train, wnid))) for wnid in wnids})
    val_files = dict(sorted((name, (wnid, data)) for wnid in os.listdir(val)
                            for name, data in folder_files(os.path.join(val, wnid)).items()))
    write_tar(os.path.join(out_dir, "ILSVRC2012_img_val.tar"),
              {name: data for name, (_, data) in val_files.items()})
    write_devkit(os.path.join(out_dir, "ILSVRC2012_devkit_t12.tar.gz"), class_ids,
                 [class_ids[wnid] for wnid, _ in val_files.values()])
    return class_ids
