"""Faults users meet, at the command line with 2 gloo processes: each ends in one line naming
what is wrong and what to do, the right exit status, no traceback, and nothing half-written.

Start-up checks (a truncated LMDB, a list out of step with it, more classes than outputs) run
``train_with_distillation.py`` itself once; the other faults go through the script's ``main``
in this process (the same path, without starting a new interpreter), planted in the spawned
processes through ``tests.fault_hooks``.
"""

# The test functions take test_train's session fixture `data`, imported here by that name.
# ruff: noqa: F811

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

import train_with_distillation
from dataset.checks import check_class_count, check_list_in_lmdb, check_lmdb_whole
from tests import fault_hooks
from tests.test_train import REPO_ROOT, data, overrides  # noqa: F401
from utils import files
from utils.checkpoint import BEST_NAME, CHECKPOINT_NAME, atomic_save, checkpoint_space_warning
from utils.config import ConfigError
from utils.errors import DataError

# The planted faults end at the first validation: training a few steps is enough.
SHORT = {"train_params.epochs": 1, "train_params.max_steps_per_epoch": 2,
         "train_params.eval_teacher": False}


@pytest.fixture()
def lmdb_copy(data, tmp_path) -> str:
    """A private, writable copy of the LMDB data folder."""
    dst = str(tmp_path / "lmdb")
    shutil.copytree(data["lmdb"], dst)
    return dst


def run_script(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_with_distillation.py", *argv], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def run_main(argv: list[str], capture: pytest.CaptureFixture) -> subprocess.CompletedProcess:
    """The script's main(argv) in this process: the same status and console as at the command
    line, without a new interpreter. With capfd, the spawned processes' output is caught too."""
    capture.readouterr()
    status = train_with_distillation.main(argv)
    out, err = capture.readouterr()
    return subprocess.CompletedProcess(argv, status, out, err)


def one_error_line(proc: subprocess.CompletedProcess, status: int) -> str:
    """The single console line of a failed run, after checking its status and that no
    traceback nor any secondary error reached the console."""
    console = proc.stdout + proc.stderr
    assert proc.returncode == status, console
    assert "Traceback" not in console and "Connection closed" not in console, console
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def run_hooked(argv: list[str], fault: str, capfd: pytest.CaptureFixture,
               monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess:
    """main(argv) with the fault planted in the spawned processes."""
    monkeypatch.setattr(train_with_distillation, "run_process",
                        functools.partial(fault_hooks.run, fault))
    return run_main(argv, capfd)


def truncate(path: str, fraction: float) -> tuple[int, int]:
    size = os.path.getsize(path)
    os.truncate(path, int(size * fraction))
    return int(size * fraction), size


@pytest.mark.slow
def test_start_up_checks_at_the_command_line(data, lmdb_copy, tmp_path, capsys):
    """Each bad input stops the run before training, with its one line and exit status 2: the
    first at the command line, the others through main() in this process (same path, faster)."""
    out = str(tmp_path / "out")
    # A list remade after packing: a line the LMDB lacks.
    with open(os.path.join(lmdb_copy, "val_list.txt"), "a", encoding="utf-8") as f:
        f.write("n00000001/n00000001_absent.JPEG\n")
    line = one_error_line(run_script(overrides(data, out, data__data_path=lmdb_copy)), 2)
    assert re.fullmatch(r"error: 1 of 14 lines of '.*val_list\.txt' are not keys of the LMDB at "
                        r"'.*val' \(the first: 'n00000001/n00000001_absent\.JPEG'\).*img2lmdb.*",
                        line), line
    print(line)

    # No LMDB at all: how to build one, or how to train from the JPEG folders instead.
    empty = str(tmp_path / "no_lmdb")
    os.makedirs(empty)
    line = one_error_line(run_main(overrides(data, out, data__data_path=empty), capsys), 2)
    assert line == (f"error: no LMDB at '{os.path.join(empty, 'train')}' (data.mdb missing); "
                    f"build it with dataset/img2lmdb.py, or set data.*_data_type='img'"), line
    print(line)

    # An interrupted copy: data.mdb cut to a third (checked before the lists).
    kept, size = truncate(os.path.join(lmdb_copy, "train", "data.mdb"), 1 / 3)
    line = one_error_line(run_main(overrides(data, out, data__data_path=lmdb_copy), capsys), 2)
    assert line == (f"error: the LMDB at '{os.path.join(lmdb_copy, 'train')}' is truncated "
                    f"({kept} of {size} bytes): copy it again or rerun img2lmdb.py"), line
    print(line)

    # 4 classes in the data, 2 in the student and in its 2-class teacher.
    teacher = str(tmp_path / "teacher2.pth")
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), teacher)
    argv = overrides(data, out, model__num_classes=2, model__teacher_weights=teacher)
    line = one_error_line(run_main(argv, capsys), 2)
    assert re.fullmatch(r"error: the training list '.*train_list\.txt' has 4 classes but "
                        r"model\.num_classes is 2; set model\.num_classes=4 .*", line), line
    print(line)
    assert not os.path.exists(os.path.join(out, CHECKPOINT_NAME))


def test_checks_name_what_is_wrong(data, lmdb_copy):
    root = os.path.join(lmdb_copy, "train")
    check_lmdb_whole(root)
    check_list_in_lmdb(os.path.join(lmdb_copy, "train_list.txt"), root)
    # A copy this process never opened: a mapped file that shrinks is a SIGBUS.
    stub = os.path.join(lmdb_copy, "stub")
    shutil.copytree(os.path.join(lmdb_copy, "val"), stub)
    truncate(os.path.join(stub, "data.mdb"), 0.0001)
    with pytest.raises(DataError, match=r"the LMDB at '.*stub' cannot be opened .*img2lmdb"):
        check_lmdb_whole(stub)
    check_class_count(4, "the list", num_classes=4)
    with pytest.raises(ConfigError, match="the list has 4 classes but model.num_classes is 3"):
        check_class_count(4, "the list", num_classes=3)


@pytest.mark.slow
def test_an_lmdb_truncated_during_the_run_names_the_cause(data, lmdb_copy, tmp_path, capfd,
                                                          monkeypatch):
    """The file shrinks after the start-up check passed: the process reading it gets SIGBUS."""
    data_file = os.path.join(lmdb_copy, "train", "data.mdb")
    check = train_with_distillation.check_inputs

    def check_then_truncate(cfg: object, loss: object) -> None:
        check(cfg, loss)
        os.truncate(data_file, os.path.getsize(data_file) // 3)

    monkeypatch.setattr(train_with_distillation, "check_inputs", check_then_truncate)
    argv = overrides(data, str(tmp_path / "out"), data__data_path=lmdb_copy,
                     **{k.replace(".", "__"): v for k, v in SHORT.items()})
    line = one_error_line(run_main(argv, capfd), 2)
    assert re.fullmatch(r"error: rank[01] was killed by SIGBUS: an LMDB file \(data\.mdb\) was "
                        r"truncated or changed while it was read; .*", line), line
    print(line)


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(data, tmp_path,
                                                                               capfd,
                                                                               monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    previous = out / CHECKPOINT_NAME
    atomic_save({"epoch": 0, "marker": torch.arange(10)}, str(previous))
    before = previous.read_bytes()
    argv = overrides(data, str(out), **{k.replace(".", "__"): v for k, v in SHORT.items()})
    line = one_error_line(run_hooked(argv, "disk_full", capfd, monkeypatch), 2)
    # Epoch 1 is the best so far: model_best.pth.tar is written first, and fails.
    best = re.escape(str(out / BEST_NAME))
    match = re.fullmatch(rf"error: no space left to write '{best}': it needs (\d+) bytes and "
                         r"(\d+) bytes are free there; free some space or choose a folder on a "
                         r"larger disk \(process 0\)", line)
    assert match and int(match[1]) > fault_hooks.FULL_AFTER, line
    print(line)
    assert previous.read_bytes() == before
    names = os.listdir(out)
    assert BEST_NAME not in names, names
    assert not any(name.endswith(".tmp") or name.startswith(".") for name in names), names


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["user_error", "bug"])
def test_one_failing_process_is_reported_once(fault, data, tmp_path, capfd, monkeypatch):
    """Process 1 fails while process 0 waits for it: only process 1's error reaches the user."""
    argv = overrides(data, str(tmp_path / "out"), **{k.replace(".", "__"): v
                                                      for k, v in SHORT.items()})
    proc = run_hooked(argv, fault, capfd, monkeypatch)
    if fault == "user_error":
        line = one_error_line(proc, 2)
        assert line == f"error: {fault_hooks.USER_MESSAGE} (process 1)"
        print(line)
        return
    console = proc.stdout + proc.stderr
    assert proc.returncode == 1, console
    assert console.count("Traceback (most recent call last)") == 1, console
    assert f"ValueError: {fault_hooks.BUG_MESSAGE}" in console
    assert "Connection closed" not in console and "gloo" not in console.lower(), console
    last = proc.stderr.strip().splitlines()[-1]
    expected = f"rank1 failed with ValueError: {fault_hooks.BUG_MESSAGE} (traceback above)"
    assert last == f"error: {expected}"
    print(last)


def test_low_space_warning_before_training(tmp_path, monkeypatch):
    model = torchvision.models.resnet18(num_classes=4)
    assert checkpoint_space_warning(str(tmp_path), model) is None  # this disk has room
    monkeypatch.setattr(files, "free_bytes", lambda folder: 50 << 20)
    warning = checkpoint_space_warning(str(tmp_path), model)
    assert warning is not None and re.fullmatch(
        r"'.*' has 50 MiB free, less than two checkpoints \(\d+ MiB\): free some space or "
        r"choose a folder on a larger disk", warning), warning
