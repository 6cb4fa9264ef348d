"""The demo driver: its runs, its added methods, its cached teacher, its table and its console."""

from __future__ import annotations

import json
import os

import pytest

import knowledge_distiller
import train_with_distillation
from utils import demo
from utils.checkpoint import BEST_NAME
from utils.config import ConfigError
from utils.demo import (
    DEMO_CONFIG,
    SHARE_KEY,
    DemoRow,
    format_table,
    row_result,
    run_configs,
    split_methods,
)
from utils.errors import UserError
from utils.logger import LOG_NAME, METRICS_NAME

CONSOLE_BUDGET = 80  # lines a whole first demo may print, data preparation included


def test_runs_train_teacher_then_students_that_distil_from_it():
    configs = run_configs(DEMO_CONFIG, ["train_params.output_dir=out", "train_params.epochs=1"])
    methods = [(run["method"], cfg.model.student or cfg.net_type, cfg.distill.method)
               for run, cfg in configs]
    assert methods == [("Teacher", "resnet34", "none"), ("Original", "resnet18", "none"),
                       ("Proposed", "resnet18", "wsld")]
    teacher_cfg = configs[0][1]
    assert teacher_cfg.train_params.eval_teacher is False
    # the user's count is the students'; the teacher trains twice as many
    assert [cfg.train_params.epochs for _, cfg in configs] == [2, 1, 1]
    for run, cfg in configs:
        assert cfg.train_params.output_dir == os.path.join("out", run["name"])
        assert cfg.model.num_classes == 10
        assert cfg.dist.nprocs >= 1
        assert cfg.train_params.quiet is True
    for _, cfg in configs[1:]:
        assert cfg.model.teacher == "resnet34"
        assert cfg.model.teacher_weights == os.path.join("out", "teacher", "model_best.pth.tar")


def test_teacher_trains_longer_and_student_rows_differ_only_in_the_method():
    (_, teacher), (_, original), (_, proposed) = run_configs(DEMO_CONFIG, [])
    assert teacher.train_params.epochs >= 2 * original.train_params.epochs

    def without_method_and_folder(cfg):
        plain = cfg.to_dict()
        del plain["distill"]["method"], plain["train_params"]["output_dir"]
        return plain

    assert (original.distill.method, proposed.distill.method) == ("none", "wsld")
    assert without_method_and_folder(original) == without_method_and_folder(proposed)


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="did you mean 'train_params.epochs'"):
        run_configs(DEMO_CONFIG, ["train_params.epoch=1"])


def test_best_result_and_table(tmp_path):
    with open(tmp_path / METRICS_NAME, "w") as f:
        f.write('{"epoch": 1, "val_top1_err": 40.0, "val_top5_err": 5.0}\n')
        f.write('{"epoch": 2, "val_top1_err": 12.5, "val_top5_err": 1.5}\n')
        f.write('{"epoch": 3, "val_top1_err": 20.0, "val_top5_err": 0.5}\n')
    assert row_result(str(tmp_path)) == (87.5, 98.5, None)
    table = format_table([DemoRow("ResNet 34", "Teacher", 87.5, 98.5, None),
                          DemoRow("ResNet 18", "Original", 80.0, 97.0, 12.0)], 30.0)
    assert "| ResNet 34 | Teacher | 87.50 | 98.50 | reused |" in table
    assert "| ResNet 18 | Original | 80.00 | 97.00 | 12 s |" in table


def test_methods_option_is_parsed_and_reaches_the_demo():
    args = train_with_distillation.build_arg_parser().parse_intermixed_args(
        ["--demo", "train_params.epochs=1", "--methods", "kd,dkd"])
    assert args.demo and args.methods == "kd,dkd" and args.overrides == ["train_params.epochs=1"]
    assert train_with_distillation.build_arg_parser().parse_intermixed_args([]).methods == ""


def test_split_methods_reads_commas_and_checks_each_name_when_called(monkeypatch):
    assert split_methods(" kd, ,wsld,") == ["kd", "wsld"]
    assert split_methods(["kd"]) == ["kd"] and split_methods("") == []
    assert split_methods("kd,dkd,dist") == ["kd", "dkd", "dist"]
    with pytest.raises(ConfigError, match="unknown method 'newkd'"):
        split_methods("kd,newkd")
    # A method added to the losses later is accepted with no change here.
    extended = (*knowledge_distiller.LOSS_METHODS, "newkd")
    monkeypatch.setattr(knowledge_distiller, "LOSS_METHODS", extended)
    assert split_methods("kd,newkd") == ["kd", "newkd"]


def test_unknown_method_is_a_one_line_error_before_anything_runs(tmp_path, capfd):
    out = tmp_path / "out"
    argv = ["--demo", "--methods", "kd,nonsense", f"data.data_path={tmp_path / 'data'}",
            f"train_params.output_dir={out}"]
    assert train_with_distillation.main(argv) == 2
    captured = capfd.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1
    assert "unknown method 'nonsense'" in captured.err and "wsld" in captured.err
    assert not os.path.exists(tmp_path / "data") and not os.path.exists(out)


def test_methods_add_student_rows_that_differ_from_the_last_only_in_the_method():
    plain = run_configs(DEMO_CONFIG, ["train_params.output_dir=out"])
    configs = run_configs(DEMO_CONFIG, ["train_params.output_dir=out"], "kd,wsld,none,kd")
    # wsld and none are rows already; a method named twice is trained once
    assert [run["name"] for run, _ in configs] == ["teacher", "original", "proposed", "kd"]
    assert [cfg.to_dict() for _, cfg in configs[:3]] == [cfg.to_dict() for _, cfg in plain]
    (run, kd), (_, proposed) = configs[3], configs[2]
    assert (run["network"], run["method"], kd.distill.method) == ("ResNet 18", "KD", "kd")
    assert kd.train_params.output_dir == os.path.join("out", "kd")
    assert kd.model.teacher_weights == os.path.join("out", "teacher", BEST_NAME)
    kd.distill.method, kd.train_params.output_dir = "wsld", proposed.train_params.output_dir
    assert kd.to_dict() == proposed.to_dict()


def test_methods_need_a_student_row_to_copy():
    teacher = dict(name="teacher", network="ResNet 34", method="Teacher",
                   overrides={"distill.method": "none"})
    assert demo.method_runs([teacher], [], "none") == []
    with pytest.raises(ConfigError, match="hold only the teacher"):
        demo.method_runs([teacher], ["kd"], "none")


def test_last_share_is_the_last_epoch_that_recorded_one(tmp_path):
    with pytest.raises(UserError, match="no validation results"):
        row_result(str(tmp_path))  # no metrics file
    with open(tmp_path / METRICS_NAME, "w") as f:
        f.write('{"epoch": 1, "val_top1_err": 40.0, "val_top5_err": 5.0}\n')
    assert row_result(str(tmp_path))[2] is None  # written before the key existed, or no teacher
    with open(tmp_path / METRICS_NAME, "a") as f:
        f.write(json.dumps({"epoch": 2, SHARE_KEY: 0.5}) + "\n")
        f.write(json.dumps({"epoch": 3, SHARE_KEY: 0.125}) + "\n")
    assert row_result(str(tmp_path)) == (60.0, 95.0, 0.125)


def test_table_shows_the_share_where_known_and_a_dash_elsewhere():
    table = format_table([DemoRow("ResNet 34", "Teacher", 87.5, 98.5, None),
                          DemoRow("ResNet 18", "Proposed", 85.0, 99.0, 12.0, 0.4321),
                          DemoRow("ResNet 18", "DKD", 84.0, 98.0, 11.0)], 30.0)
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[-1] == "regularisation share" and header[2] == "top-1 acc"
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[2] == "| ResNet 34 | Teacher | 87.50 | 98.50 | reused | - |"
    assert lines[3] == "| ResNet 18 | Proposed | 85.00 | 99.00 | 12 s | 0.432 |"
    assert lines[4] == "| ResNet 18 | DKD | 84.00 | 98.00 | 11 s | - |"
    assert lines[5] == "Total: 30 s"


class FakeTrain:
    """Stands in for training: writes what a finished run leaves and remembers which rows ran."""

    def __init__(self, fail_on: str = "") -> None:
        self.trained: list[str] = []
        self.fail_on = fail_on

    def __call__(self, cfg) -> None:
        output_dir = cfg.train_params.output_dir
        name = os.path.basename(output_dir)
        self.trained.append(name)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, BEST_NAME), "wb") as f:
            f.write(b"weights")
        if name == self.fail_on:
            raise KeyboardInterrupt  # stopped halfway, after a first checkpoint
        record = {"epoch": 1, "val_top1_err": 10.0, "val_top5_err": 1.0}
        if cfg.distill.method != "none":  # as training writes it for a row with a teacher
            record[SHARE_KEY] = 0.25
        with open(os.path.join(output_dir, METRICS_NAME), "w") as f:
            f.write(json.dumps(record) + "\n")


def no_data(root: str) -> None:
    """The data preparation, where the training is faked and reads none."""


def test_teacher_is_reused_only_when_trained_to_the_end_with_the_same_config(tmp_path, monkeypatch,
                                                                             capsys):
    same = [f"train_params.output_dir={tmp_path}"]
    changed = [*same, "optim.init_lr=0.02"]

    def run(overrides, train=None):
        train = train or FakeTrain()
        rows = demo.run_demo(train, overrides, prepare=no_data)
        return train.trained, rows, capsys.readouterr().out

    trained, rows, _ = run(same)
    assert trained == ["teacher", "original", "proposed"]
    assert rows[0].seconds is not None

    trained, rows, out = run(same)
    assert trained == ["original", "proposed"]
    assert rows[0].seconds is None and rows[0].top1_acc == 90.0  # the teacher's row is read back
    assert sum("Reusing the teacher" in line for line in out.splitlines()) == 1
    assert "| ResNet 34 | Teacher | 90.00 | 99.00 | reused |" in out

    trained, _, out = run(changed)  # another teacher configuration: trained again
    assert trained == ["teacher", "original", "proposed"]
    assert "Reusing" not in out
    with open(tmp_path / "teacher" / demo.TEACHER_RECORD) as f:
        assert json.load(f)["optim"]["init_lr"] == 0.02

    with pytest.raises(KeyboardInterrupt):
        run(same, FakeTrain(fail_on="teacher"))
    assert not os.path.exists(tmp_path / "teacher" / demo.TEACHER_RECORD)
    trained, _, _ = run(changed)  # the checkpoint left by the stopped run is not the finished one
    assert trained == ["teacher", "original", "proposed"]

    os.remove(tmp_path / "teacher" / BEST_NAME)
    trained, _, _ = run(changed)
    assert trained == ["teacher", "original", "proposed"]


def test_run_demo_trains_the_added_rows_and_tabulates_their_share(tmp_path, capsys):
    prepared = []
    train = FakeTrain()
    rows = demo.run_demo(train, [f"train_params.output_dir={tmp_path}"], methods="kd",
                         prepare=prepared.append)
    assert prepared == ["./demo_data"]  # the data path of the config, prepared once
    assert train.trained == ["teacher", "original", "proposed", "kd"]
    assert [(r.method, r.regularisation_share) for r in rows] == [
        ("Teacher", None), ("Original", None), ("Proposed", 0.25), ("KD", 0.25)]
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("| ResNet 18 | KD | 90.00 | 99.00 |")
    assert out[-2].endswith("| 0.250 |")


@pytest.mark.slow
def test_demo_console_is_short_and_the_configuration_goes_to_files(tmp_path, capfd):
    """A tiny first demo (fresh data, one step per epoch, one process) prints the budgeted lines.

    Only the epoch lines grow with the schedule, so the same count at the demo's own epochs must
    stay within the budget.
    """
    out = tmp_path / "out"
    tiny = [f"data.data_path={tmp_path / 'data'}", f"train_params.output_dir={out}",
            "train_params.epochs=1", "train_params.max_steps_per_epoch=1", "dist.nprocs=1",
            "data.input_size=(3,16,16)"]
    assert train_with_distillation.main(["--demo", *tiny]) == 0
    captured = capfd.readouterr()
    lines = captured.out.splitlines()
    # a progress bar redrawn with \r is one line
    printed = captured.out.count("\n") + captured.err.count("\n")
    epoch_lines = [line for line in lines if line.startswith("Validation epoch")]
    tiny_epochs = [cfg.train_params.epochs for _, cfg in run_configs(DEMO_CONFIG, tiny)]
    assert len(epoch_lines) == sum(tiny_epochs) == 4
    assert sum(line.startswith("==> ") for line in lines) == 3  # a header per row
    assert sum(line.startswith("Outputs: ") for line in lines) == 3
    assert "| ResNet 18 | Proposed |" in lines[-2]
    assert not any("Effective configuration" in line or "Epoch: [" in line for line in lines)

    for row in ("teacher", "original", "proposed"):
        with open(out / row / LOG_NAME) as f:
            log = f.read()
        assert "Effective configuration" in log and "Epoch: [" in log
        with open(out / row / train_with_distillation.CONFIG_NAME) as f:
            assert json.load(f)["train_params"]["output_dir"] == str(out / row)

    demo_epochs = [cfg.train_params.epochs for _, cfg in run_configs(DEMO_CONFIG, [])]
    assert printed - sum(tiny_epochs) + sum(demo_epochs) <= CONSOLE_BUDGET
