"""The list maker: one sorted ``wnid/file`` line per image file, per split folder, replaced on a
rerun."""

from __future__ import annotations

import os
import subprocess
import sys

from dataset.image_list import read_list
from dataset.mk_img_list import main, split_folders
from tests.conftest import NUM_CLASSES, ODD_FILES, TRAIN_PER_CLASS, VAL_PER_CLASS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_lines(root: str, split: str) -> list[str]:
    return sorted(f"{wnid}/{name}" for wnid in os.listdir(os.path.join(root, split))
                  for name in os.listdir(os.path.join(root, split, wnid)))


def test_lists_every_image_sorted_and_prints_counts(photo_tree, tmp_path, capsys):
    assert main(["--image_path", photo_tree, "--output_path", str(tmp_path)]) == 0
    train = read_list(str(tmp_path / "train_list.txt"))
    val = read_list(str(tmp_path / "val_list.txt"))
    assert train == sorted(train) == expected_lines(photo_tree, "train")
    assert val == expected_lines(photo_tree, "val")
    odd_train = sum(name.startswith("train/") for name in ODD_FILES.values())
    assert len(train) == NUM_CLASSES * TRAIN_PER_CLASS + odd_train
    assert len(val) == NUM_CLASSES * VAL_PER_CLASS + 1
    assert ODD_FILES["png"].removeprefix("train/") in train
    out = capsys.readouterr().out
    assert f"train: {len(train)} images" in out and f"val: {len(val)} images" in out


def test_only_image_files_any_case(tree_copy, tmp_path):
    folder = os.path.join(tree_copy, "train", "n00000002")
    for name in ("notes.txt", "labels.csv", ".hidden.JPEG", "upper.PNG", "mixed.JpG", "lower.jpeg"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x")
    # a file beside the class folders
    with open(os.path.join(tree_copy, "train", "README"), "w") as f:
        f.write("x")
    assert main(["--image_path", tree_copy, "--output_path", str(tmp_path)]) == 0
    train = read_list(str(tmp_path / "train_list.txt"))
    for name in ("upper.PNG", "mixed.JpG", "lower.jpeg"):
        assert f"n00000002/{name}" in train
    assert not any(line.endswith((".txt", ".csv", "README")) or "/." in line for line in train)


def test_rerun_replaces_instead_of_appending(photo_tree, tmp_path):
    list_file = tmp_path / "train_list.txt"
    list_file.write_text("stale/line.JPEG\n")
    for _ in range(2):
        assert main(["--image_path", photo_tree, "--output_path", str(tmp_path)]) == 0
    lines = read_list(str(list_file))
    assert lines == expected_lines(photo_tree, "train")
    assert len(lines) == len(set(lines))


def test_folders_without_class_folders_are_not_splits(tree_copy):
    os.makedirs(os.path.join(tree_copy, "train_256"))  # an LMDB folder holds files only
    for name in ("data.mdb", "lock.mdb"):
        open(os.path.join(tree_copy, "train_256", name), "wb").close()
    os.makedirs(os.path.join(tree_copy, ".cache", "x"))
    assert split_folders(tree_copy) == ["train", "val"]


def test_read_list_ignores_blank_lines_and_surrounding_space(tmp_path):
    path = tmp_path / "val_list.txt"
    path.write_text("a/1.JPEG\r\n\n  b/2.JPEG  \n")
    assert read_list(str(path)) == ["a/1.JPEG", "b/2.JPEG"]


def test_missing_image_folder_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    result = subprocess.run([sys.executable, "dataset/mk_img_list.py", "--image_path", missing,
                             "--output_path", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert missing in result.stderr


def test_tree_without_splits_is_an_error(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert main(["--image_path", str(tmp_path / "images"), "--output_path", str(tmp_path)]) == 2
    assert "no split folders" in capsys.readouterr().err
