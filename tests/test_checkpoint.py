"""Checkpoints: atomic replacement, weights-only loading, resume paths, random-number state."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from utils.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    DataError,
    atomic_save,
    atomic_write,
    capture_rng_state,
    load_checkpoint,
    resolve_resume_path,
    restore_rng_state,
    save_checkpoint,
)
from utils.config import ConfigError


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def test_atomic_save_round_trips_with_weights_only(tmp_path):
    path = str(tmp_path / "a.pth")
    state = {"state_dict": {"w": torch.arange(4.0)}, "epoch": 3, "name": "x", "lst": [1, 2.5, None]}
    atomic_save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    assert loaded["epoch"] == 3 and loaded["lst"] == [1, 2.5, None]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    atomic_save({"epoch": 1}, path)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"epoch": 2, "bad": _Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_atomic_write_replaces_only_at_the_end(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"old")
    with atomic_write(str(path)) as f:
        f.write(b"new")
        assert path.read_bytes() == b"old"  # not visible until the block completes
    assert path.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it


def test_save_checkpoint_copies_best(tmp_path):
    out = str(tmp_path / "run")
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, out, is_best=True)
    save_checkpoint({"epoch": 2, "w": torch.zeros(2)}, out, is_best=False)
    assert load_checkpoint(os.path.join(out, CHECKPOINT_NAME))["epoch"] == 2
    best = load_checkpoint(os.path.join(out, BEST_NAME))
    assert best["epoch"] == 1 and torch.equal(best["w"], torch.ones(2))
    assert sorted(os.listdir(out)) == sorted([BEST_NAME, CHECKPOINT_NAME])


def test_a_crash_between_the_two_writes_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The best file goes first, so the checkpoint never claims a best that was not saved."""
    out = str(tmp_path / "run")
    save_checkpoint({"epoch": 1, "best_top1_err": 50.0}, out, is_best=True)

    def crash(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("utils.checkpoint.atomic_copy", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "best_top1_err": 40.0}, out, is_best=True)
    # epoch 2 is trained again
    assert load_checkpoint(os.path.join(out, CHECKPOINT_NAME))["epoch"] == 1
    assert load_checkpoint(os.path.join(out, BEST_NAME))["epoch"] == 2
    assert sorted(os.listdir(out)) == sorted([BEST_NAME, CHECKPOINT_NAME])


def test_load_rejects_missing_truncated_and_code_bearing_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    path = tmp_path / "cut.pth"
    atomic_save({"w": torch.randn(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="cannot read checkpoint") as info:
        load_checkpoint(str(path))
    assert "\n" not in str(info.value)
    unsafe = tmp_path / "unsafe.pth"
    # an arbitrary class: refused by weights_only
    torch.save({"obj": random.Random(0)}, str(unsafe))
    with pytest.raises(DataError, match="cannot read checkpoint"):
        load_checkpoint(str(unsafe))
    listing = tmp_path / "list.pth"
    torch.save([1, 2], str(listing))
    with pytest.raises(DataError, match="holds a list"):
        load_checkpoint(str(listing))


def test_resume_path_decides_whether_and_where_to_resume(tmp_path):
    out = str(tmp_path)
    assert resolve_resume_path(False, "", out) is None
    assert resolve_resume_path(False, "auto", out) is None  # nothing to resume yet: start afresh
    save_checkpoint({"epoch": 1}, out, is_best=False)
    saved = os.path.join(out, CHECKPOINT_NAME)
    for if_resume in (False, True):  # if_resume never overrides resume_path, either way
        assert resolve_resume_path(if_resume, "auto", out) == saved
        assert resolve_resume_path(if_resume, saved, out) == saved
    with pytest.raises(ConfigError, match="optim.resume_path"):
        resolve_resume_path(True, "", out)  # asked to resume, but not from where
    with pytest.raises(DataError, match="not found"):
        resolve_resume_path(False, str(tmp_path / "nope.pth"), out)


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    path = str(tmp_path / "rng.pth")
    atomic_save({"rng": capture_rng_state()}, path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(path)["rng"])
    drawn = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert drawn == expected
