"""The demo's data: scikit-learn's digits, written once as a tree, then listed and packed."""

from __future__ import annotations

import os

import pytest

from dataset import demo_data
from dataset.demo_data import prepare_demo_data
from dataset.lmdb_dataset import ImageFolder
from utils.errors import DataError


def test_prepare_demo_data_builds_packed_digits_once(tmp_path):
    root = str(tmp_path / "demo_data")
    prepare_demo_data(root)
    folder = os.path.join(root, "train", "digit_0")
    first = os.path.join(folder, sorted(os.listdir(folder))[0])
    stamp = os.path.getmtime(first)
    prepare_demo_data(root)  # reused: the images are not written again, the LMDB stays complete
    assert os.path.getmtime(first) == stamp

    train = ImageFolder(os.path.join(root, "train"), os.path.join(root, "train_list.txt"))
    val = ImageFolder(os.path.join(root, "val"), os.path.join(root, "val_list.txt"))
    assert len(train) + len(val) == 1797  # every digit scikit-learn ships, each stored once
    assert 0.15 < len(val) / (len(train) + len(val)) < 0.25
    image, label = val[0]
    assert image.shape == (32, 32, 3) and 0 <= label < 10
    assert sorted({train[i][1] for i in range(0, len(train), 7)}) == list(range(10))


def test_an_interrupted_tree_is_not_taken_for_a_finished_one(tmp_path, monkeypatch):
    """The tree appears under its name only once whole: a build stopped part way leaves
    nothing there, and no staging folder beside it."""
    def stopped(root: str) -> None:
        os.makedirs(os.path.join(root, "train", "digit_0"))
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "write_digits_tree", stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare_demo_data(str(tmp_path / "demo_data"))
    assert os.listdir(tmp_path) == []


def test_a_failed_packing_step_is_a_one_line_data_error(tmp_path):
    root = tmp_path / "demo_data"
    (root / "train").mkdir(parents=True)  # taken for a written tree, but holds no images
    with pytest.raises(DataError, match="preparing the demo data failed at dataset.mk_img_list"):
        prepare_demo_data(str(root))
