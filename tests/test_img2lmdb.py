"""The packer: labels, losslessness, conversions, resizing, restarts, the final check and bad
input."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys

import lmdb
import numpy as np
import pytest
from PIL import Image

from dataset import img2lmdb
from dataset.image_io import decode_rgb, parse_jpeg_header
from dataset.image_list import read_list
from dataset.lmdb_format import decode_record
from dataset.mk_img_list import main as make_lists
from tests.conftest import NUM_CLASSES, ODD_FILES, truncate_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTED = {ODD_FILES["png"], ODD_FILES["cmyk"]}


def pack(tree: str, out: str, split: str = "train", *extra: str) -> int:
    return img2lmdb.main(["--image_path", tree, "--list_path", out, "--output_path", out,
                          "--split", split, "--workers", "1", *extra])


def listed_and_packed(tree: str, out: str, split: str = "train", *extra: str) -> list[str]:
    assert make_lists(["--image_path", tree, "--output_path", out]) == 0
    assert pack(tree, out, split, *extra) == 0
    return read_list(os.path.join(out, f"{split}_list.txt"))


def read_lmdb(path: str) -> dict[str, tuple[bytes, int]]:
    env = lmdb.open(path, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {key.decode("utf-8"): decode_record(value) for key, value in txn.cursor()}
    finally:
        env.close()


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_labels_are_sorted_train_classes_even_where_val_lacks_one(tree_copy, tmp_path):
    from torchvision.datasets import ImageFolder as TorchvisionImageFolder

    shutil.rmtree(os.path.join(tree_copy, "val", "n00000000"))
    out = str(tmp_path / "out")
    train_lines = listed_and_packed(tree_copy, out, "train")
    assert pack(tree_copy, out, "val") == 0
    class_to_idx = TorchvisionImageFolder(os.path.join(tree_copy, "train")).class_to_idx
    assert sorted(class_to_idx) == [f"n{i:08d}" for i in range(NUM_CLASSES)]
    for split in ("train", "val"):
        records = read_lmdb(os.path.join(out, split))
        assert records
        for key, (_, label) in records.items():
            assert label == class_to_idx[key.split("/")[0]]
    val_labels = {label for _, label in read_lmdb(os.path.join(out, "val")).values()}
    assert val_labels == {1, 2, 3}  # not shifted down to 0..2 by the missing class
    assert set(read_lmdb(os.path.join(out, "train"))) == set(train_lines)


def test_plain_jpegs_stored_byte_for_byte_and_oddities_converted(photo_tree, tmp_path, capsys):
    out = str(tmp_path)
    lines = listed_and_packed(photo_tree, out, "train", "--workers", "2")
    records = read_lmdb(os.path.join(out, "train"))
    assert sorted(records) == lines
    for line, (stored, _) in records.items():
        original = file_bytes(os.path.join(photo_tree, "train", line))
        if f"train/{line}" in CONVERTED:
            header = parse_jpeg_header(stored)
            assert header is not None and header.storable and header.components == 3
            with Image.open(io.BytesIO(original)) as image:
                expected = np.asarray(image.convert("RGB")).astype(np.int16)
            assert np.abs(decode_rgb(stored).astype(np.int16) - expected).mean() < 2.0
        else:  # plain, greyscale and progressive JPEGs
            assert stored == original, line
    assert f"{len(lines)} images stored" in capsys.readouterr().out


def test_image_size_resizes_the_shorter_side_into_its_own_lmdb(photo_tree, tmp_path):
    out = str(tmp_path)
    lines = listed_and_packed(photo_tree, out, "val", "--image_size", "48")
    assert not os.path.exists(os.path.join(out, "val"))
    records = read_lmdb(os.path.join(out, "val_48"))
    assert sorted(records) == lines
    for line, (stored, label) in records.items():
        assert min(decode_rgb(stored).shape[:2]) == 48
        assert label == int(line[1:9])


def test_rerun_after_an_interruption_ends_with_one_entry_per_line(photo_tree, tree_copy, tmp_path,
                                                                  capsys):
    out = str(tmp_path / "out")
    assert make_lists(["--image_path", tree_copy, "--output_path", out]) == 0
    lines = read_list(os.path.join(out, "train_list.txt"))
    bad = 17
    truncate_file(os.path.join(tree_copy, "train", lines[bad]))
    assert pack(tree_copy, out, "train", "--commit_every", "4") == 2  # stops at the damaged file
    assert lines[bad] in error_line(capsys)
    # everything before it was kept
    assert sorted(read_lmdb(os.path.join(out, "train"))) == lines[:bad]

    shutil.copy(os.path.join(photo_tree, "train", lines[bad]),
                os.path.join(tree_copy, "train", lines[bad]))
    assert pack(tree_copy, out, "train", "--commit_every", "4") == 0
    assert f"{bad} of {len(lines)} images already in" in capsys.readouterr().out
    records = read_lmdb(os.path.join(out, "train"))
    assert sorted(records) == lines
    assert records[lines[bad]][0] == file_bytes(os.path.join(photo_tree, "train", lines[bad]))


def test_final_check_catches_a_lost_entry(photo_tree, tmp_path, monkeypatch, capsys):
    real_write_batch = img2lmdb.write_batch
    monkeypatch.setattr(img2lmdb, "write_batch",
                        lambda env, batch: real_write_batch(env, batch[1:]))
    out = str(tmp_path)
    assert make_lists(["--image_path", photo_tree, "--output_path", out]) == 0
    assert pack(photo_tree, out, "val") == 2
    assert "check failed: 1 list lines are not in" in error_line(capsys)


def test_map_size_grows_as_needed(photo_tree, tmp_path):
    out = str(tmp_path)
    assert make_lists(["--image_path", photo_tree, "--output_path", out]) == 0
    small = 64 * 1024
    summary = img2lmdb.pack_split(photo_tree, out, out, "train", workers=1, commit_every=8,
                                  progress=False, initial_map_size=small)
    lines = read_list(os.path.join(out, "train_list.txt"))
    assert summary.stored == summary.packed == len(lines)
    assert sorted(read_lmdb(summary.lmdb_path)) == lines
    assert os.path.getsize(os.path.join(summary.lmdb_path, "data.mdb")) > small


def test_original_list_name_and_lmdb_beside_the_class_folders(tree_copy, capsys):
    """The original's documented layout: lists, images and LMDBs all in one folder."""
    assert make_lists(["--image_path", tree_copy, "--output_path", tree_copy]) == 0
    os.replace(os.path.join(tree_copy, "val_list.txt"), os.path.join(tree_copy, "val_datalist"))
    assert pack(tree_copy, tree_copy, "val") == 0
    assert os.path.isfile(os.path.join(tree_copy, "val", "data.mdb"))
    datalist = os.path.join(tree_copy, "val_datalist")
    assert sorted(read_lmdb(os.path.join(tree_copy, "val"))) == read_list(datalist)
    # LMDB files are not listed
    assert make_lists(["--image_path", tree_copy, "--output_path", tree_copy]) == 0
    assert read_list(os.path.join(tree_copy, "val_list.txt")) == read_list(datalist)


@pytest.mark.parametrize("problem", ["no image folder", "no split folder", "no list",
                                     "missing file", "truncated jpeg", "truncated png",
                                     "unknown class", "repeated line"])
def test_bad_input_is_a_one_line_error(tree_copy, tmp_path, capsys, problem):
    out = str(tmp_path / "out")
    assert make_lists(["--image_path", tree_copy, "--output_path", out]) == 0
    list_file = os.path.join(out, "train_list.txt")
    lines = read_list(list_file)
    image_path, expected = tree_copy, None
    if problem == "no image folder":
        image_path = expected = str(tmp_path / "nowhere")
    elif problem == "no split folder":
        shutil.rmtree(os.path.join(tree_copy, "train"))
        expected = os.path.join(tree_copy, "train")
    elif problem == "no list":
        os.remove(list_file)
        expected = list_file
    elif problem == "missing file":
        os.remove(os.path.join(tree_copy, "train", lines[5]))
        expected = lines[5]
    elif problem in ("truncated jpeg", "truncated png"):
        name = ODD_FILES["progressive" if problem == "truncated jpeg" else "png"]
        truncate_file(os.path.join(tree_copy, name))
        expected = os.path.join(tree_copy, name)
    elif problem == "unknown class":
        with open(list_file, "a") as f:
            f.write("n99999999/x.JPEG\n")
        expected = "n99999999"
    elif problem == "repeated line":
        with open(list_file, "a") as f:
            f.write(lines[3] + "\n")
        expected = lines[3]
    assert img2lmdb.main(["--image_path", image_path, "--list_path", out, "--output_path", out,
                          "--split", "train", "--workers", "1"]) == 2
    assert expected in error_line(capsys)


def test_command_line_error_exit_code_and_no_traceback(tree_copy, tmp_path):
    out = str(tmp_path / "out")
    assert make_lists(["--image_path", tree_copy, "--output_path", out]) == 0
    damaged = os.path.join(tree_copy, ODD_FILES["grey"])
    truncate_file(damaged)
    command = [sys.executable, "dataset/img2lmdb.py", "--image_path", tree_copy, "--list_path", out,
               "--output_path", out, "--split", "train", "--workers", "2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read") and damaged in last

    missing_list = command[:5] + [str(tmp_path)] + command[6:]
    result = subprocess.run(missing_list, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "train_list.txt" in result.stderr


def test_command_forks_its_workers_and_packs_every_image(photo_tree, tmp_path):
    """Run as a command, nothing has used OpenCV before the pool starts, so the workers are
    forked (no second interpreter to start); they resize and check every image as spawned ones
    do."""
    assert img2lmdb._worker_context(fork=True).get_start_method() == "fork"
    assert img2lmdb._worker_context().get_start_method() == "forkserver"
    out = str(tmp_path)
    assert make_lists(["--image_path", photo_tree, "--output_path", out]) == 0
    command = [sys.executable, "dataset/img2lmdb.py", "--image_path", photo_tree, "--list_path",
               out, "--output_path", out, "--split", "val", "--image_size", "40", "--workers", "2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = read_lmdb(os.path.join(out, "val_40"))
    assert sorted(records) == read_list(os.path.join(out, "val_list.txt"))
    for image_bytes, _ in records.values():
        assert min(decode_rgb(image_bytes).shape[:2]) == 40


# A program that used OpenCV's thread pool, waits until the pool's threads sleep on their condition
# variable, then packs with two workers. A worker forked from it would inherit that pool and wait
# forever in cv2.setNumThreads; it also checks the workers' module imports no torch (cheap to
# start).
_PACK_AFTER_OPENCV_POOL = """
import os, sys
import cv2, numpy as np
cv2.resize(np.zeros((3000, 3000, 3), np.uint8), (700, 700), interpolation=cv2.INTER_AREA)
def others_running():
    tasks = [t for t in os.listdir('/proc/self/task') if t != str(os.getpid())]
    states = []
    for task in tasks:
        try:
            with open(f'/proc/self/task/{task}/stat') as f:
                states.append(f.read().rpartition(')')[2].split()[0])
        except FileNotFoundError:
            pass
    return any(state == 'R' for state in states)
while os.path.isdir('/proc/self/task') and others_running():
    os.sched_yield()
from dataset import img2lmdb
assert 'torch' not in sys.modules
sys.exit(img2lmdb.main(sys.argv[1:]))
"""


def test_workers_start_cleanly_after_the_caller_used_opencv_threads(photo_tree, tmp_path):
    out = str(tmp_path)
    assert make_lists(["--image_path", photo_tree, "--output_path", out]) == 0
    command = [sys.executable, "-c", _PACK_AFTER_OPENCV_POOL, "--image_path", photo_tree,
               "--list_path", out, "--output_path", out, "--split", "val", "--image_size", "40",
               "--workers", "2"]
    # Its own session, so that a hang is ended with the workers, not left behind.
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the packer's workers hung after the caller had used OpenCV's thread pool")
    assert proc.returncode == 0, err
    listed = read_list(os.path.join(out, "val_list.txt"))
    assert sorted(read_lmdb(os.path.join(out, "val_40"))) == listed


def test_skip_bad_records_and_unlists_unreadable_images(tree_copy, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert make_lists(["--image_path", tree_copy, "--output_path", out]) == 0
    list_file = os.path.join(out, "train_list.txt")
    lines = read_list(list_file)
    truncated, garbage = lines[2], lines[11]
    truncate_file(os.path.join(tree_copy, "train", truncated))
    with open(os.path.join(tree_copy, "train", garbage), "wb") as f:
        f.write(b"this is not an image")

    assert pack(tree_copy, out, "train", "--skip_bad", "--commit_every", "5") == 0
    skipped_file = os.path.join(out, "train_skipped.txt")
    assert read_list(skipped_file) == sorted([truncated, garbage])
    kept = [line for line in lines if line not in (truncated, garbage)]
    assert read_list(list_file) == kept
    assert sorted(read_lmdb(os.path.join(out, "train"))) == kept
    assert "skipped 2 unreadable images" in capsys.readouterr().out

    # a rerun keeps the record of what was skipped
    assert pack(tree_copy, out, "train", "--skip_bad") == 0
    assert read_list(skipped_file) == sorted([truncated, garbage])
    assert f"{len(kept)} of {len(kept)} images already in" in capsys.readouterr().out


def test_a_file_changed_after_its_check_is_not_stored(tree_copy):
    path = os.path.join(tree_copy, "train", "n00000001", "n00000001_0.JPEG")
    task = img2lmdb._Task("n00000001/n00000001_0.JPEG", path, 1)
    outcome = img2lmdb.prepare_image(task, shorter_side=None, quality=95, send_kept=False)
    assert outcome.error is None and outcome.kept_as_is and outcome.image_bytes is None
    assert img2lmdb._stored_bytes(outcome) == file_bytes(path)
    # replaced between check and store
    shutil.copy(os.path.join(tree_copy, ODD_FILES["grey"]), path)
    with pytest.raises(img2lmdb.DataError, match="changed while it was being packed"):
        img2lmdb._stored_bytes(outcome)
