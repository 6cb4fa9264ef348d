"""ImageNet from its official archives and from Kaggle's layout: the same lists and the same LMDBs
as from extracted, sorted class folders; restarts, --skip_bad and one-line errors for bad
archives."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile

import lmdb
import numpy as np
import pytest
import scipy.io

from dataset import img2lmdb
from dataset.demo_data import tar_bytes, write_devkit, write_official_archives, write_tar
from dataset.image_list import read_list
from dataset.imagenet_archives import DEVKIT, TRAIN_TAR, VAL_TAR, devkit_classes
from dataset.mk_img_list import main as make_lists
from tests.conftest import NUM_CLASSES, ODD_FILES, TRAIN_PER_CLASS, VAL_PER_CLASS, truncate_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def imagenet(photo_tree, tmp_path_factory) -> dict:
    """The same images three ways: extracted and sorted, the official archives, Kaggle's layout.

    The validation images get official names, numbered in an order unrelated to their classes.
    """
    root = str(tmp_path_factory.mktemp("imagenet_layouts"))
    folders, archives, kaggle = (os.path.join(root, name)
                                 for name in ("folders", "archives", "kaggle"))
    shutil.copytree(os.path.join(photo_tree, "train"), os.path.join(folders, "train"))
    wnids = sorted(os.listdir(os.path.join(photo_tree, "val")))
    val_images = [(wnid, name) for wnid in wnids
                  for name in sorted(os.listdir(os.path.join(photo_tree, "val", wnid)))]
    order = np.random.default_rng(0).permutation(len(val_images))
    os.makedirs(os.path.join(kaggle, "val"))
    val_wnids, csv_rows = [], ["ImageId,PredictionString"]
    for number, index in enumerate(order, start=1):
        wnid, name = val_images[index]
        official = f"ILSVRC2012_val_{number:08d}.JPEG"
        os.makedirs(os.path.join(folders, "val", wnid), exist_ok=True)
        shutil.copy(os.path.join(photo_tree, "val", wnid, name),
                    os.path.join(folders, "val", wnid, official))
        shutil.copy(os.path.join(photo_tree, "val", wnid, name),
                    os.path.join(kaggle, "val", official))
        val_wnids.append(wnid)
        csv_rows.append(f"{official[:-5]},{wnid} 10 20 30 40 {wnid} 1 2 3 4")
    class_ids = write_official_archives(folders, archives)

    shutil.copytree(os.path.join(folders, "train"), os.path.join(kaggle, "train"))
    os.makedirs(os.path.join(kaggle, "test"))
    shutil.copy(os.path.join(kaggle, "val", "ILSVRC2012_val_00000001.JPEG"),
                os.path.join(kaggle, "test"))
    csv_path = os.path.join(root, "LOC_val_solution.csv")
    with open(csv_path, "w") as f:
        f.write("\n".join(csv_rows) + "\n")
    ground_truth = [class_ids[wnid] for wnid in val_wnids]
    ground_truth_path = os.path.join(root, "ILSVRC2012_validation_ground_truth.txt")
    with open(ground_truth_path, "w") as f:
        f.write("".join(f"{class_id}\n" for class_id in ground_truth))
    return {"folders": folders, "archives": archives, "kaggle": kaggle, "csv": csv_path,
            "ground_truth": ground_truth_path, "devkit": os.path.join(archives, DEVKIT),
            "class_ids": class_ids, "ground_truth_ids": ground_truth}


def test_devkit_numbers_classes_in_its_own_order_and_has_parents(imagenet):
    class_ids = imagenet["class_ids"]
    # not the label order
    assert [class_ids[wnid] for wnid in sorted(class_ids)] != sorted(class_ids.values())
    assert devkit_classes(imagenet["devkit"]) == {class_id: wnid
                                                  for wnid, class_id in class_ids.items()}
    with tarfile.open(imagenet["devkit"]) as devkit:
        meta = devkit.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
    synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    assert sum(int(s["num_children"]) > 0 for s in synsets) == 2
    assert len(synsets) == len(class_ids) + 2


@pytest.fixture()
def archives_copy(imagenet, tmp_path) -> str:
    dst = str(tmp_path / "archives")
    shutil.copytree(imagenet["archives"], dst)
    return dst


def raw_lmdb(path: str) -> dict[bytes, bytes]:
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


def list_and_pack(image_path: str, out: str, splits: tuple[str, ...], *extra: str,
                  workers: str = "1") -> None:
    assert make_lists(["--image_path", image_path, "--output_path", out, *extra]) == 0
    for split in splits:
        assert img2lmdb.main(["--image_path", image_path, "--list_path", out, "--output_path", out,
                              "--split", split, "--workers", workers, *extra]) == 0


@pytest.fixture(scope="module")
def from_folders(imagenet, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("from_folders"))
    list_and_pack(imagenet["folders"], out, ("train", "val"))
    return out


def error_line(capsys) -> str:
    """The last line of stderr, after any progress bar: the one error line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in err) == 1, err
    return err[-1]


def test_archives_give_the_lists_and_lmdbs_of_the_sorted_folders(imagenet, from_folders, tmp_path):
    out = str(tmp_path)
    list_and_pack(imagenet["archives"], out, ("train", "val"), workers="2")
    # nothing extracted
    assert sorted(os.listdir(imagenet["archives"])) == sorted([TRAIN_TAR, VAL_TAR, DEVKIT])
    for split in ("train", "val"):
        lines = read_list(os.path.join(out, f"{split}_list.txt"))
        assert lines == read_list(os.path.join(from_folders, f"{split}_list.txt"))
        assert raw_lmdb(os.path.join(out, split)) == raw_lmdb(os.path.join(from_folders, split))
    val = read_list(os.path.join(out, "val_list.txt"))
    assert val[0].startswith("n00000000/ILSVRC2012_val_") and len(val) == len(set(val))
    odd = [name.removeprefix("train/") for key, name in ODD_FILES.items() if key != "grey_val"]
    assert set(odd) <= set(read_list(os.path.join(out, "train_list.txt")))


@pytest.mark.parametrize("labels", ["csv", "ground_truth"])
def test_flat_val_folder_with_val_labels_matches_the_sorted_folders(imagenet, from_folders,
                                                                    tmp_path, labels):
    out = str(tmp_path)
    devkit = ["--devkit", imagenet["devkit"]] if labels == "ground_truth" else []
    extra = ["--val_labels", imagenet[labels]] + devkit
    list_and_pack(imagenet["kaggle"], out, ("val",), *extra)
    for split in ("train", "val"):
        assert read_list(os.path.join(out, f"{split}_list.txt")) == read_list(
            os.path.join(from_folders, f"{split}_list.txt"))
    # Kaggle's unlabelled test/ is not a split
    assert not os.path.exists(os.path.join(out, "test_list.txt"))
    assert raw_lmdb(os.path.join(out, "val")) == raw_lmdb(os.path.join(from_folders, "val"))


def test_rerun_decodes_only_the_images_not_yet_stored(imagenet, from_folders, tmp_path, monkeypatch,
                                                      capsys):
    out = str(tmp_path)
    list_and_pack(imagenet["archives"], out, ("val",))
    env = lmdb.open(os.path.join(out, "val"))
    with env.begin(write=True) as txn:
        removed = [key for i, (key, _) in enumerate(txn.cursor()) if i % 3 == 0]
        for key in removed:
            txn.delete(key)
    env.close()
    decoded = []
    real_prepare = img2lmdb.prepare_for_storage
    monkeypatch.setattr(img2lmdb, "prepare_for_storage",
                        lambda data, *a: decoded.append(data) or real_prepare(data, *a))
    capsys.readouterr()
    assert img2lmdb.main(["--image_path", imagenet["archives"], "--list_path", out, "--output_path",
                          out, "--split", "val", "--workers", "1"]) == 0
    total = len(read_list(os.path.join(out, "val_list.txt")))
    assert len(decoded) == len(removed)
    assert f"{total - len(removed)} of {total} images already in" in capsys.readouterr().out
    assert raw_lmdb(os.path.join(out, "val")) == raw_lmdb(os.path.join(from_folders, "val"))


def damage_train_member(archives_dir: str, wnid: str, member: str, damage) -> None:
    """Rewrite the train tar with one image of one inner tar changed by damage(bytes)."""
    path = os.path.join(archives_dir, TRAIN_TAR)
    with tarfile.open(path) as outer:
        inner_tars = {m.name: outer.extractfile(m).read() for m in outer}
    with tarfile.open(fileobj=io.BytesIO(inner_tars[f"{wnid}.tar"])) as inner:
        files = {m.name: inner.extractfile(m).read() for m in inner}
    files[member] = damage(files[member])
    inner_tars[f"{wnid}.tar"] = tar_bytes(files)
    write_tar(path, inner_tars)


def test_skip_bad_leaves_out_a_damaged_image_of_the_archive(archives_copy, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert make_lists(["--image_path", archives_copy, "--output_path", out]) == 0
    bad = "n00000002/n00000002_3.JPEG"
    damage_train_member(archives_copy, "n00000002", "n00000002_3.JPEG",
                        lambda data: data[: len(data) // 3])
    pack = ["--image_path", archives_copy, "--list_path", out, "--output_path", out, "--split",
            "train", "--workers", "2", "--commit_every", "4"]
    assert img2lmdb.main(pack) == 2
    assert f"{TRAIN_TAR}/n00000002.tar/n00000002_3.JPEG" in error_line(capsys)
    assert img2lmdb.main([*pack, "--skip_bad"]) == 0
    assert read_list(os.path.join(out, "train_skipped.txt")) == [bad]
    lines = read_list(os.path.join(out, "train_list.txt"))
    assert bad not in lines
    assert sorted(k.decode() for k in raw_lmdb(os.path.join(out, "train"))) == lines


def test_a_truncated_train_tar_is_refused_before_anything_is_written(archives_copy, tmp_path,
                                                                     capsys):
    out = str(tmp_path / "out")
    assert make_lists(["--image_path", archives_copy, "--output_path", out]) == 0
    train_tar = os.path.join(archives_copy, TRAIN_TAR)
    truncate_file(train_tar, keep_fraction=0.6)
    assert img2lmdb.main(["--image_path", archives_copy, "--list_path", out, "--output_path", out,
                          "--split", "train", "--workers", "1"]) == 2
    assert train_tar in error_line(capsys)
    assert not os.path.exists(os.path.join(out, "train"))


def test_a_damaged_inner_tar_stops_packing_and_a_rerun_finishes(imagenet, from_folders,
                                                                archives_copy, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert make_lists(["--image_path", archives_copy, "--output_path", out]) == 0
    train_tar = os.path.join(archives_copy, TRAIN_TAR)
    with tarfile.open(train_tar) as outer:
        inner_tars = {m.name: outer.extractfile(m).read() for m in outer}
    inner = inner_tars["n00000002.tar"]
    # the outer tar is whole, the inner cut short
    inner_tars["n00000002.tar"] = inner[: int(len(inner) * 0.6)]
    write_tar(train_tar, inner_tars)
    pack = ["--image_path", archives_copy, "--list_path", out, "--output_path", out, "--split",
            "train", "--workers", "2", "--commit_every", "3"]
    assert img2lmdb.main(pack) == 2
    assert f"{train_tar}/n00000002.tar" in error_line(capsys)
    stored = raw_lmdb(os.path.join(out, "train"))
    expected = raw_lmdb(os.path.join(from_folders, "train"))
    # the classes before the damage
    assert {key.decode()[:9] for key in stored} >= {"n00000000", "n00000001"}
    assert all(value == expected[key] for key, value in stored.items())
    shutil.copy(os.path.join(imagenet["archives"], TRAIN_TAR), train_tar)
    assert img2lmdb.main(pack) == 0
    assert raw_lmdb(os.path.join(out, "train")) == expected


BAD_INPUTS = ["missing archive", "truncated tar", "not a tar", "inner tar not a wnid",
              "image without label", "ground truth too short", "devkit without meta.mat",
              "train tar cut between members"]


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_bad_input_is_a_one_line_error_and_writes_no_list(imagenet, archives_copy, tmp_path, capsys,
                                                          problem):
    image_path, extra = archives_copy, []
    class_ids = imagenet["class_ids"]
    train_tar, val_tar, devkit = (os.path.join(archives_copy, name)
                                  for name in (TRAIN_TAR, VAL_TAR, DEVKIT))
    if problem == "missing archive":
        os.remove(val_tar)
        expected = val_tar
    elif problem == "truncated tar":
        truncate_file(val_tar, keep_fraction=0.5)
        expected = val_tar
    elif problem == "not a tar":
        with open(train_tar, "wb") as f:
            f.write(b"<html>not found</html>" * 100)
        expected = train_tar
    elif problem == "inner tar not a wnid":
        with tarfile.open(train_tar) as outer:
            inner_tars = {m.name: outer.extractfile(m).read() for m in outer}
        inner_tars["extras.tar"] = tar_bytes({"x.JPEG": b"x"})
        write_tar(train_tar, inner_tars)
        expected = "'extras.tar'"
    elif problem == "image without label":
        image_path = str(tmp_path / "kaggle")
        shutil.copytree(imagenet["kaggle"], image_path)
        with open(imagenet["csv"]) as f:
            rows = f.read().splitlines()
        dropped = rows.pop(2).split(",")[0] + ".JPEG"
        labels = str(tmp_path / "LOC_val_solution.csv")
        with open(labels, "w") as f:
            f.write("\n".join(rows) + "\n")
        extra, expected = ["--val_labels", labels], dropped
    elif problem == "ground truth too short":
        write_devkit(devkit, class_ids, imagenet["ground_truth_ids"][:-1])
        expected = devkit
    elif problem == "devkit without meta.mat":
        write_devkit(devkit, class_ids, [1], with_meta=False)
        expected = devkit
    elif problem == "train tar cut between members":
        with open(train_tar, "rb") as f:
            data = f.read()
        with tarfile.open(train_tar) as outer:
            last = outer.getmembers()[-1]
        with open(train_tar, "wb") as f:
            f.write(data[:last.offset])
        expected = train_tar
    out = str(tmp_path / "lists")
    assert make_lists(["--image_path", image_path, "--output_path", out, *extra]) == 2
    assert expected in error_line(capsys)
    assert not os.path.exists(out) or not os.listdir(out)


def test_commands_list_archives_and_check_them_before_writing(archives_copy, tmp_path):
    out = str(tmp_path / "out")
    result = subprocess.run([sys.executable, "dataset/mk_img_list.py", "--image_path",
                             archives_copy, "--output_path", out], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    odd_train = sum(name.startswith("train/") for name in ODD_FILES.values())
    num_train = NUM_CLASSES * TRAIN_PER_CLASS + odd_train
    assert f"train: {num_train} images" in result.stdout
    assert f"val: {NUM_CLASSES * VAL_PER_CLASS + 1} images" in result.stdout
    os.remove(os.path.join(archives_copy, DEVKIT))
    result = subprocess.run([sys.executable, "dataset/img2lmdb.py", "--image_path", archives_copy,
                             "--list_path", out, "--output_path", out, "--split", "val"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and DEVKIT in result.stderr
    assert not os.path.exists(os.path.join(out, "val"))


def test_a_stale_val_list_is_refused(imagenet, archives_copy, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert make_lists(["--image_path", archives_copy, "--output_path", out]) == 0
    list_file = os.path.join(out, "val_list.txt")
    lines = read_list(list_file)
    name = lines[0].split("/")[1]
    lines[0] = f"n00000003/{name}"  # a list from other labels
    with open(list_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    assert img2lmdb.main(["--image_path", archives_copy, "--list_path", out, "--output_path", out,
                          "--split", "val", "--workers", "1"]) == 2
    assert name in error_line(capsys)


def test_lists_and_lmdbs_may_sit_beside_the_archives(imagenet, from_folders, archives_copy):
    """The LMDB folder train/ that packing leaves there is not taken for an extracted tree."""
    list_and_pack(archives_copy, archives_copy, ("train", "val"))
    assert make_lists(["--image_path", archives_copy, "--output_path", archives_copy]) == 0
    for split in ("train", "val"):
        beside = raw_lmdb(os.path.join(archives_copy, split))
        assert beside == raw_lmdb(os.path.join(from_folders, split))


def test_a_flat_val_folder_without_val_labels_is_named(imagenet, tmp_path, capsys):
    out = str(tmp_path)
    assert make_lists(["--image_path", imagenet["kaggle"], "--output_path", out,
                       "--val_labels", imagenet["csv"]]) == 0
    assert img2lmdb.main(["--image_path", imagenet["kaggle"], "--list_path", out, "--output_path",
                          out, "--split", "val"]) == 2
    assert "--val_labels" in error_line(capsys)
