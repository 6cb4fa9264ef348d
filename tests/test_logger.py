"""The run's record: log.txt tee, metrics.jsonl without duplicated epochs, curves.png."""

from __future__ import annotations

import json
import os

from utils.logger import CURVES_NAME, LOG_NAME, METRICS_NAME, RunLogger, print_error, read_metrics


def _record(epoch: int) -> dict:
    return {"epoch": epoch, "lr": 0.1, "train_loss": 2.0 / epoch, "train_top1_err": 80.0 - epoch,
            "val_loss": 2.5 / epoch, "val_top1_err": 85.0 - epoch, "val_top5_err": 50.0 - epoch,
            "epoch_seconds": 1.5, "images_per_second": 100.0}


def test_info_prints_and_appends_to_log(tmp_path, capsys):
    out = str(tmp_path / "run")
    with RunLogger(out) as log:
        log.info("first line")
        log.to_file("file only")
    with RunLogger(out) as log:  # a resumed run appends
        log.info("second line")
    assert capsys.readouterr().out == "first line\nsecond line\n"
    with open(os.path.join(out, LOG_NAME), encoding="utf-8") as f:
        assert f.read() == "first line\nfile only\nsecond line\n"


def test_quiet_logger_prints_summaries_only_and_logs_everything(tmp_path, capsys):
    out = str(tmp_path / "run")
    with RunLogger(out, quiet=True) as log:
        log.info("a step")
        log.summary("an epoch")
    with RunLogger(out) as log:
        log.summary("printed as info is")
    assert capsys.readouterr().out == "an epoch\nprinted as info is\n"
    with open(os.path.join(out, LOG_NAME), encoding="utf-8") as f:
        assert f.read() == "a step\nan epoch\nprinted as info is\n"


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    out = str(tmp_path / "run")
    log = RunLogger(out, enabled=False)
    log.info("hidden")
    log.summary("hidden")
    log.start_metrics(0)
    log.log_epoch(_record(1))
    log.close()
    assert capsys.readouterr().out == "" and not os.path.exists(out)


def test_epochs_are_appended_and_plotted(tmp_path):
    out = str(tmp_path)
    with RunLogger(out) as log:
        log.start_metrics(0)
        for epoch in (1, 2):
            log.log_epoch(_record(epoch))
    records = read_metrics(os.path.join(out, METRICS_NAME))
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1] == _record(2)
    with open(os.path.join(out, CURVES_NAME), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    with RunLogger(str(tmp_path / "plain"), curves=False) as log:  # the records, no plot
        log.log_epoch(_record(1))
    assert sorted(os.listdir(tmp_path / "plain")) == sorted([LOG_NAME, METRICS_NAME])


def test_resume_drops_the_epochs_trained_again(tmp_path):
    out = str(tmp_path)
    with RunLogger(out) as log:
        log.start_metrics(0)
        for epoch in (1, 2, 3):
            log.log_epoch(_record(epoch))
    with RunLogger(out) as log:  # resumed from the checkpoint of epoch 2
        log.start_metrics(2)
        log.log_epoch(_record(3))
    assert [r["epoch"] for r in read_metrics(os.path.join(out, METRICS_NAME))] == [1, 2, 3]
    with RunLogger(out) as log:  # a fresh run starts a fresh record
        log.start_metrics(0)
    assert read_metrics(os.path.join(out, METRICS_NAME)) == []


def test_non_finite_values_are_written_as_null_and_torn_lines_skipped(tmp_path):
    out = str(tmp_path)
    with RunLogger(out) as log:
        log.log_epoch({**_record(1), "val_loss": float("nan")})
    path = os.path.join(out, METRICS_NAME)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"epoch": 2, "val_lo')  # a crash in mid-write
    with open(path, encoding="utf-8") as f:
        assert json.loads(f.readline())["val_loss"] is None
    assert [r["epoch"] for r in read_metrics(path)] == [1]


def test_print_error_is_one_line_on_stderr(capsys):
    print_error("data path 'x' not found")
    captured = capsys.readouterr()
    assert captured.err == "error: data path 'x' not found\n" and captured.out == ""


def test_curves_gain_a_panel_for_the_regularisation_share(tmp_path):
    import struct

    from utils.logger import plot_curves

    def width(records: list[dict]) -> int:
        path = str(tmp_path / "curves.png")
        plot_curves(records, path)
        with open(path, "rb") as f:
            return struct.unpack(">I", f.read(24)[16:20])[0]  # the PNG header's width

    plain = [{"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "train_top1_err": 50.0,
              "val_top1_err": 55.0, "val_top5_err": 20.0}]
    with_share = [{**plain[0], "train_regularisation_share": 0.3, "train_mean_weight": 0.6}]
    assert width(with_share) == 1500 and width(plain) == 1000  # three panels, or two
