"""The demo driver: its runs, its data preparation and its table (the full demo runs in .ci/run)."""

from __future__ import annotations

import os

import pytest

from dataset.lmdb_dataset import ImageFolder
from utils.config import ConfigError
from utils.demo import DEMO_CONFIG, DemoRow, best_result, format_table, prepare_data, run_configs
from utils.logger import METRICS_NAME


def test_runs_train_teacher_then_students_that_distil_from_it():
    configs = run_configs(DEMO_CONFIG, ["train_params.output_dir=out", "train_params.epochs=1"])
    methods = [(run["method"], cfg.model.student or cfg.net_type, cfg.distill.method) for run, cfg in configs]
    assert methods == [("Teacher", "resnet34", "none"), ("Original", "resnet18", "none"),
                       ("Proposed", "resnet18", "wsld")]
    teacher_cfg = configs[0][1]
    assert teacher_cfg.train_params.eval_teacher is False
    for run, cfg in configs:
        assert cfg.train_params.output_dir == os.path.join("out", run["name"])
        assert cfg.train_params.epochs == 1  # the user's overrides reach every run
        assert cfg.model.num_classes == 10
        assert cfg.dist.nprocs >= 1
    for _, cfg in configs[1:]:
        assert cfg.model.teacher == "resnet34"
        assert cfg.model.teacher_weights == os.path.join("out", "teacher", "model_best.pth.tar")


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="did you mean 'train_params.epochs'"):
        run_configs(DEMO_CONFIG, ["train_params.epoch=1"])


def test_prepare_data_builds_packed_digits_once(tmp_path):
    root = str(tmp_path / "demo_data")
    prepare_data(root)
    first = os.path.join(root, "train", "digit_0", sorted(os.listdir(os.path.join(root, "train", "digit_0")))[0])
    stamp = os.path.getmtime(first)
    prepare_data(root)  # reused: the images are not written again and the LMDB stays complete
    assert os.path.getmtime(first) == stamp

    train = ImageFolder(os.path.join(root, "train"), os.path.join(root, "train_list.txt"))
    val = ImageFolder(os.path.join(root, "val"), os.path.join(root, "val_list.txt"))
    assert len(train) + len(val) == 1797  # every digit scikit-learn ships, each stored once
    assert 0.15 < len(val) / (len(train) + len(val)) < 0.25
    image, label = val[0]
    assert image.shape == (32, 32, 3) and 0 <= label < 10
    assert sorted({train[i][1] for i in range(0, len(train), 7)}) == list(range(10))


def test_best_result_and_table(tmp_path):
    with open(tmp_path / METRICS_NAME, "w") as f:
        f.write('{"epoch": 1, "val_top1_err": 40.0, "val_top5_err": 5.0}\n')
        f.write('{"epoch": 2, "val_top1_err": 12.5, "val_top5_err": 1.5}\n')
        f.write('{"epoch": 3, "val_top1_err": 20.0, "val_top5_err": 0.5}\n')
    assert best_result(str(tmp_path)) == (87.5, 98.5)
    table = format_table([DemoRow("ResNet 34", "Teacher", 87.5, 98.5, 12.0, "x/curves.png")], 30.0)
    assert "| ResNet 34 | Teacher | 87.50 | 98.50 | 12 s |" in table
    assert "Teacher curves: x/curves.png" in table
