"""Real-image fixtures: small ImageNet-layout trees built from photos that scikit-learn ships."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import jpeg_region
from dataset.demo_data import sample_photos, write_photo_tree

# Set (to 1) where the region decoder must be tested, as CI does: its absence then fails the
# tests that need it instead of skipping them.
REQUIRE_REGION_DECODER = "WSLD_REQUIRE_REGION_DECODER"

TRAIN_PER_CLASS = 6
VAL_PER_CLASS = 3
NUM_CLASSES = 4

# The awkward files of ImageNet, by the name they get in the tree.
ODD_FILES = {
    "png": "train/n00000001/n00000001_png.JPEG",  # a PNG named .JPEG
    "cmyk": "train/n00000002/n00000002_cmyk.JPEG",  # a CMYK JPEG
    "grey": "train/n00000003/n00000003_grey.JPEG",  # a greyscale JPEG
    "grey_val": "val/n00000000/n00000000_grey.JPEG",
    "progressive": "train/n00000000/n00000000_prog.JPEG",  # a progressive RGB JPEG
}


def write_odd_files(root: str) -> None:
    photo = Image.fromarray(sample_photos()[1][40:200, 60:260])
    photo.save(os.path.join(root, ODD_FILES["png"]), format="PNG")
    photo.convert("CMYK").save(os.path.join(root, ODD_FILES["cmyk"]), format="JPEG", quality=90)
    photo.convert("L").save(os.path.join(root, ODD_FILES["grey"]), format="JPEG", quality=90)
    photo.convert("L").save(os.path.join(root, ODD_FILES["grey_val"]), format="JPEG", quality=90)
    photo.save(os.path.join(root, ODD_FILES["progressive"]), format="JPEG", quality=85,
               progressive=True)


def truncate_file(path: str, keep_fraction: float = 0.4) -> None:
    """Cut an image file short, as an interrupted download leaves it."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep_fraction)])


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> str:
    """A read-only ImageNet-layout tree: train/ and val/ class folders of JPEG photos plus the odd
    files.

    Tests that change files work on a copy (see ``tree_copy``).
    """
    root = str(tmp_path_factory.mktemp("imagenet"))
    write_photo_tree(root, {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS},
                     num_classes=NUM_CLASSES)
    write_odd_files(root)
    return root


@pytest.fixture()
def tree_copy(photo_tree, tmp_path) -> str:
    """A private, writable copy of photo_tree."""
    dst = str(tmp_path / "imagenet")
    shutil.copytree(photo_tree, dst)
    return dst


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests, restored afterwards (use with pytestmark)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_region_decoder() -> jpeg_region.RegionDecoder:
    """This process's region decoder. Where it cannot be had (no C compiler or libjpeg-turbo
    headers), the test is skipped with the reason describe() logs; training falls back to
    OpenCV there, which the other tests exercise. Under WSLD_REQUIRE_REGION_DECODER=1 it fails."""
    decoder = jpeg_region.region_decoder()
    if decoder is None:
        reason = jpeg_region.describe()
        if os.environ.get(REQUIRE_REGION_DECODER) == "1":
            pytest.fail(f"{REQUIRE_REGION_DECODER}=1, but: {reason}", pytrace=False)
        pytest.skip(reason)
    return decoder


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "region_decoder: needs the libjpeg-turbo region decoder "
                                       "(skipped where it cannot be built, unless "
                                       "WSLD_REQUIRE_REGION_DECODER=1)")


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("region_decoder") is not None:
        require_region_decoder()
