"""End to end: the training script on a small real-image dataset, on the CPU, with 2 gloo processes.

Runs go through ``main(argv)`` in this process where they can (it spawns the training
processes itself); the run that checks what a user sees at the command line is a subprocess.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from typing import Callable

import pytest
import torch
import torchvision

import knowledge_distiller
import train_with_distillation
from dataset import img2lmdb, mk_img_list
from imagenet_train_cfg import cfg as default_cfg
from tests import preemption_hooks
from utils import device as device_module
from utils import distributed
from utils.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    Progress,
    atomic_save,
    restore_training,
    training_checkpoint,
)
from utils.config import ConfigError
from utils.device import configure_process
from utils.logger import CURVES_NAME, LOG_NAME, METRICS_NAME, read_metrics
from utils.lr_schedule import build_scheduler, lr_at_epoch
from utils.preemption import PREEMPTED_EXIT_CODE
from utils.seeding import run_seed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 4


@pytest.fixture(scope="session")
def data(photo_tree, tmp_path_factory) -> dict[str, str]:
    """The photo tree as JPEG folders and as LMDBs, each with its lists, and a teacher weights
    file."""
    root = tmp_path_factory.mktemp("train_data")
    images = str(root / "images")
    shutil.copytree(photo_tree, images)
    assert mk_img_list.main(["--image_path", images, "--output_path", images]) == 0
    lmdb_root = str(root / "lmdb")
    for split in ("train", "val"):
        assert img2lmdb.main(["--image_path", images, "--list_path", images, "--output_path",
                              lmdb_root, "--split", split, "--workers", "1"]) == 0
        shutil.copy(os.path.join(images, f"{split}_list.txt"), lmdb_root)
    torch.manual_seed(0)
    teacher = str(root / "teacher_resnet18.pth")
    torch.save(torchvision.models.resnet18(num_classes=NUM_CLASSES).state_dict(), teacher)
    return {"images": images, "lmdb": lmdb_root, "teacher": teacher}


def overrides(data: dict[str, str], output_dir: str, **changes: object) -> list[str]:
    """A tiny, seeded, 2-process run: 32 x 32 inputs, global batch 8, 2 epochs."""
    values: dict[str, object] = {
        "data.data_path": data["lmdb"], "data.input_size": (3, 32, 32), "data.batch_size": 8,
        "data.num_workers": 0, "model.num_classes": NUM_CLASSES, "model.teacher": "resnet18",
        "model.teacher_weights": data["teacher"], "train_params.epochs": 2,
        "train_params.print_freq": 2, "train_params.use_seed": True,
        "train_params.eval_teacher": True, "train_params.output_dir": output_dir,
        "optim.init_lr": 0.01, "dist.nprocs": 2, "dist.timeout_s": 60,
        "train_params.curves": False,  # matplotlib's second at each run: one test checks it
    }
    values.update({key.replace("__", "."): value for key, value in changes.items()})
    return [f"{key}={value}" for key, value in values.items()]


def read_log(output_dir: str) -> str:
    with open(os.path.join(output_dir, LOG_NAME), encoding="utf-8") as f:
        return f.read()


def last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> str:
    """The reference run: WSLD, LMDB data, 2 processes, 2 epochs. Returns its output folder."""
    out = str(tmp_path_factory.mktemp("full_run") / "out")
    assert train_with_distillation.main(overrides(data, out, train_params__curves=True)) == 0
    return out


@pytest.mark.slow
def test_run_writes_logs_metrics_and_checkpoints(full_run):
    log = read_log(full_run)
    assert '"batch_size": 8' in log  # the effective configuration
    assert re.search(r"Teacher network performance: top-1 err [\d.]+ +top-5 err [\d.]+ +"
                     r"loss [\d.]+ +\(13 images\)", log)
    assert re.search(r"Epoch: \[1/2\]\[2/\d+\] +speed [\d.]+ img/s +"
                     r"data wait [\d.]+ ms/step \(\d+%\) +"
                     r"loss [\d.]+ \([\d.]+\) +top-1 err [\d.]+ "
                     r"\([\d.]+\) +top-5 err [\d.]+ \([\d.]+\) .*ETA \d+:\d\d:\d\d", log)
    assert "Precision float32 (train_params.amp='auto' on cpu); optimizer SGD" in log
    assert "; 0 loader workers per process" in log
    assert re.search(r"Validation epoch \[2/2\] +top-1 err [\d.]+ +top-5 err [\d.]+ +"
                     r"loss [\d.]+ +\(13 images\)", log)

    records = read_metrics(os.path.join(full_run, METRICS_NAME))
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert {"lr", "train_loss", "train_top1_err", "val_loss", "val_top1_err", "val_top5_err",
                "epoch_seconds", "images_per_second", "data_wait_share"} <= record.keys()
        assert record["val_images"] == 13  # every validation image once, none padded in
        assert 0.0 <= record["data_wait_share"] <= 1.0  # summed over both processes, then divided
        assert all(math.isfinite(record[k]) for k in ("train_loss", "val_loss",
                                                      "images_per_second"))
        # WSLD's view: the share of samples where the student beats the teacher on the label.
        assert 0.0 <= record["train_regularisation_share"] <= 1.0
        assert 0.0 <= record["train_mean_weight"] <= 1.0
    assert re.search(r"Epoch: \[2/2\]\[2/\d+\] .* reg share [\d.]+  mean w [\d.]+", log)
    best = min(records, key=lambda r: r["val_top1_err"])  # the first of equals, as the run keeps
    assert records[-1]["best_epoch"] == best["epoch"]
    assert records[-1]["best_top1_err"] == best["val_top1_err"]
    assert records[-1]["best_top5_err"] == best["val_top5_err"]
    best_line = re.search(r"Best accuracy \(top-1 and 5 error\): ([\d.]+) ([\d.]+) at epoch "
                          r"(\d+); last epoch 2: ([\d.]+) ([\d.]+)", log)
    assert best_line and float(best_line[1]) == pytest.approx(best["val_top1_err"], abs=1e-3)
    assert float(best_line[2]) == pytest.approx(best["val_top5_err"], abs=1e-3)
    assert int(best_line[3]) == best["epoch"]
    assert float(best_line[4]) == pytest.approx(records[-1]["val_top1_err"], abs=1e-3)
    assert float(best_line[5]) == pytest.approx(records[-1]["val_top5_err"], abs=1e-3)

    with open(os.path.join(full_run, CURVES_NAME), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(full_run, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model"]["teacher"] == "resnet18"

    checkpoint = torch.load(os.path.join(full_run, CHECKPOINT_NAME), weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["data"]["batch_size"] == 8
    assert {"optimizer", "scheduler", "scaler", "rng", "best_top1_err"} <= checkpoint.keys()
    student = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    student.load_state_dict(checkpoint["state_dict"], strict=True)  # torchvision keys, no 'module.'
    best_checkpoint = torch.load(os.path.join(full_run, BEST_NAME), weights_only=True)
    assert best_checkpoint["epoch"] == best["epoch"]


@pytest.mark.slow
def test_distributed_validation_equals_single_process_evaluation(full_run, data, capsys):
    base = overrides(data, full_run)
    checkpoint = os.path.join(full_run, CHECKPOINT_NAME)
    assert train_with_distillation.main(["--evaluate", checkpoint, *base]) == 0
    student = last_json_line(capsys.readouterr().out)
    assert train_with_distillation.main(["--evaluate", "teacher", *base]) == 0
    teacher = last_json_line(capsys.readouterr().out)

    last_epoch = read_metrics(os.path.join(full_run, METRICS_NAME))[-1]
    assert student["images"] == 13 and teacher["images"] == 13
    assert student["top1_err"] == last_epoch["val_top1_err"]
    assert student["top5_err"] == last_epoch["val_top5_err"]
    assert student["loss"] == pytest.approx(last_epoch["val_loss"], rel=1e-5)
    logged = re.search(r"Teacher network performance: top-1 err ([\d.]+) +"
                       r"top-5 err ([\d.]+) +loss ([\d.]+)", read_log(full_run))
    assert [float(x) for x in logged.groups()] == pytest.approx(
        [teacher["top1_err"], teacher["top5_err"], teacher["loss"]], abs=1e-3)


def assert_same_weights(out: str, reference: str) -> None:
    """The final checkpoints of two runs hold the same weights, to within 1e-5."""
    resumed = torch.load(os.path.join(out, CHECKPOINT_NAME), weights_only=True)
    expected = torch.load(os.path.join(reference, CHECKPOINT_NAME), weights_only=True)
    assert (resumed["epoch"], resumed["step"]) == (expected["epoch"], 0)
    for key, value in expected["state_dict"].items():
        diff = (resumed["state_dict"][key].double() - value.double()).abs().max().item()
        assert diff <= 1e-5, f"{key} differs by {diff}"


def assert_same_records(out: str, reference: str) -> None:
    """One metrics record, one validation line and the same best checkpoint per epoch as the
    reference."""
    records, expected = (read_metrics(os.path.join(d, METRICS_NAME)) for d in (out, reference))
    assert [r["epoch"] for r in records] == [r["epoch"] for r in expected]
    for record, want in zip(records, expected):
        for key in ("lr", "train_loss", "train_top1_err", "train_top5_err", "val_loss",
                    "val_top1_err"):
            assert record[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    log = read_log(out)
    for epoch in range(1, len(expected) + 1):
        assert len(re.findall(rf"Validation epoch \[{epoch}/", log)) == 1
    best, best_expected = (torch.load(os.path.join(d, BEST_NAME), weights_only=True)["epoch"]
                           for d in (out, reference))
    assert best == best_expected


@pytest.mark.slow
def test_resumed_run_ends_with_the_uninterrupted_weights(data, tmp_path):
    """Stopped after epoch 1 and resumed, a seeded run ends where the uninterrupted one does.

    With a loader worker: its augmentation draws must restart the same way in both runs.
    """
    def run(out: str, **changes: object) -> None:
        argv = overrides(data, out, dist__nprocs=1, train_params__eval_teacher=False,
                         data__num_workers=1, **changes)
        assert train_with_distillation.main(argv) == 0

    reference, out = str(tmp_path / "reference"), str(tmp_path / "out")
    run(reference)
    run(out, train_params__epochs=1)
    run(out, optim__resume_path="auto")

    assert_same_weights(out, reference)
    assert "Resumed from" in read_log(out)
    assert not os.path.exists(os.path.join(out, CURVES_NAME))  # train_params.curves=False
    records = read_metrics(os.path.join(out, METRICS_NAME))
    assert [r["epoch"] for r in records] == [1, 2]  # epoch 2 is not recorded twice
    expected = read_metrics(os.path.join(reference, METRICS_NAME))
    assert records[1]["val_loss"] == pytest.approx(expected[1]["val_loss"])


# (plan of the signal, config changes of that run, (epoch, step) of the checkpoint it leaves).
# data.num_workers is shared by the 2 processes: 2 and 8 give each 1 and 4 loader workers.
# dist.timeout_s=600 in these runs: a loaded test machine can take more than the default minute
# to write a checkpoint while the other process waits for it.
# The agreement polls at an epoch's first step and every 16 steps after it (3 steps an epoch
# here), and at the first validation batch: a signal after step 1 stops the run there, with
# the epoch's training kept.
SIGNAL_POINTS = [
    (("step", 1, 1), {}, (0, 1)),  # the first step: its own poll waits for the answer
    # the last step of an epoch: no poll at steps 2 and 3, so validation's first batch stops it
    # (the next run resumes with no step left in the epoch, at its validation)
    (("step", 1, 3), {"data__num_workers": 2}, (0, 3)),
    # twice, while the epoch's checkpoint is written
    (("checkpoint_write",), {"data__num_workers": 8}, (1, 0)),
]


@pytest.mark.slow
def test_signals_at_chosen_points_then_resumes_end_as_the_uninterrupted_run(full_run, data,
                                                                            tmp_path, monkeypatch):
    """SIGUSR1 sent to the launcher at each point of SIGNAL_POINTS in turn, each run resumed by
    the next: the weights, the metrics, the validation lines and the best checkpoint are those
    of the uninterrupted run (full_run, no loader workers)."""
    out = str(tmp_path / "out")

    def argv(**changes: object) -> list[str]:
        return overrides(data, out, train_params__print_freq=1, train_params__eval_teacher=False,
                         optim__resume_path="auto", dist__timeout_s=600, **changes)

    for plan, changes, position in SIGNAL_POINTS:
        monkeypatch.setattr(train_with_distillation, "run_process",
                            functools.partial(preemption_hooks.run, plan))
        assert train_with_distillation.main(argv(**changes)) == PREEMPTED_EXIT_CODE, plan
        checkpoint = torch.load(os.path.join(out, CHECKPOINT_NAME), weights_only=True)
        assert (checkpoint["epoch"], checkpoint["step"]) == position, plan
        last_line = read_log(out).strip().splitlines()[-1]
        assert last_line.startswith("Stopped by SIGUSR1") and "optim.resume_path=auto" in last_line
    # no half-written file left
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    monkeypatch.undo()
    assert train_with_distillation.main(argv()) == 0
    assert_same_weights(out, full_run)
    assert_same_records(out, full_run)


@pytest.mark.slow
def test_sigterm_at_the_command_line_then_sigkill_after_a_timed_checkpoint(full_run, data,
                                                                           tmp_path):
    """The user's view: SIGTERM to the launcher stops the job with status 75 and says so on the
    last line; a SIGKILL after a time-based checkpoint loses only the steps after it."""
    out = str(tmp_path / "out")
    argv = overrides(data, out, train_params__print_freq=1, train_params__eval_teacher=False,
                     dist__timeout_s=600, optim__resume_path="auto",
                     train_params__checkpoint_every_min=1e-9)  # every step

    def run_until(pattern: str,
                  action: Callable[[subprocess.Popen], None]) -> tuple[int, list[str]]:
        """Start the job; act once when a line of its output starts with pattern; wait for its
        end."""
        proc = subprocess.Popen([sys.executable, "train_with_distillation.py", *argv],
                                cwd=REPO_ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        lines = []
        for line in proc.stdout:
            if line.startswith(pattern) and not any(seen.startswith(pattern) for seen in lines):
                action(proc)
            lines.append(line.rstrip("\n"))
        return proc.wait(timeout=300), lines

    status, lines = run_until("Epoch: [1/2][1/", lambda proc: proc.send_signal(signal.SIGTERM))
    assert status == PREEMPTED_EXIT_CODE, "\n".join(lines[-20:])
    assert lines[-1].startswith("Stopped by SIGTERM ") and "optim.resume_path=auto" in lines[-1]
    assert read_log(out).strip().splitlines()[-1] == lines[-1]
    assert "Traceback" not in "\n".join(lines)
    stopped = torch.load(os.path.join(out, CHECKPOINT_NAME), weights_only=True)
    assert stopped["epoch"] == 0 and stopped["step"] >= 1

    status, lines = run_until("Checkpoint at epoch 2, step 1/",
                              lambda proc: os.killpg(proc.pid, signal.SIGKILL))
    assert status == -signal.SIGKILL
    killed = torch.load(os.path.join(out, CHECKPOINT_NAME), weights_only=True)
    assert (killed["epoch"], killed["step"]) >= (1, 1)

    assert train_with_distillation.main(argv) == 0
    assert_same_weights(out, full_run)
    assert_same_records(out, full_run)


@pytest.mark.slow
def test_kd_on_image_folders_with_a_loader_worker_clipping_and_smoothing(data, tmp_path):
    out = str(tmp_path / "out")
    argv = overrides(data, out, data__data_path=data["images"], data__train_data_type="img",
                     data__val_data_type="img", distill__method="kd", data__num_workers=1,
                     optim__use_grad_clip=True, optim__grad_clip=1.0, optim__label_smooth=True,
                     train_params__epochs=1, train_params__eval_teacher=False, dist__nprocs=1)
    assert train_with_distillation.main(argv) == 0
    assert "KDLoss(temperature=2.0, alpha=2.5, num_classes=4, label_smoothing=0.1)" in read_log(out)
    assert [r["val_images"] for r in read_metrics(os.path.join(out, METRICS_NAME))] == [13]


@pytest.mark.slow
def test_student_alone_from_a_config_module_never_loads_a_teacher(data, tmp_path):
    config_module = tmp_path / "student_only_cfg.py"
    config_module.write_text(f"base = {os.path.join(REPO_ROOT, 'imagenet_train_cfg.py')!r}\n"
                             "overrides = {'distill.method': 'none', "
                             "'train_params.eval_teacher': False}\n")
    out = str(tmp_path / "out")
    argv = overrides(data, out, model__teacher_weights=str(tmp_path / "absent.pth"),
                     train_params__epochs=1, dist__nprocs=1)
    argv = [a for a in argv if not a.startswith("train_params.eval_teacher=")]
    assert train_with_distillation.main(["--cfg", str(config_module), *argv]) == 0
    log = read_log(out)
    assert "Teacher (none)" in log and "Teacher network performance" not in log
    assert os.path.isfile(os.path.join(out, BEST_NAME))
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["distill"]["method"] == "none"


@pytest.mark.slow
def test_the_loop_tells_the_loss_its_epoch_from_one(data, tmp_path, monkeypatch):
    """DKD's warm-up counts epochs from 1, as its official trainer does; a batch-statistics
    teacher trains too. DKD records the regularisation share, and WSLD's weights only WSLD."""
    told: list[int] = []
    set_epoch = knowledge_distiller.WSLDistiller.set_epoch
    monkeypatch.setattr(knowledge_distiller.WSLDistiller, "set_epoch",
                        lambda self, epoch: told.append(epoch) or set_epoch(self, epoch))
    out = str(tmp_path / "out")
    argv = overrides(data, out, dist__nprocs=1, distill__method="dkd",
                     distill__teacher_bn="batch", train_params__max_steps_per_epoch=1)
    assert train_with_distillation.main(argv) == 0
    assert told == [1, 2]
    records = read_metrics(os.path.join(out, METRICS_NAME))
    assert all("train_regularisation_share" in r and "train_mean_weight" not in r
               for r in records)


@pytest.mark.parametrize("schedule, restart, expected", [
    ("step", False, {0: 0.1, 29: 0.1, 30: 0.01, 60: 0.001, 99: 0.0001}),
    ("cosine", False, {0: 0.1, 50: 0.05, 100: 0.0}),
    ("cosine", True, {0: 0.1, 5: 0.05, 10: 0.1, 20: 0.05, 30: 0.1}),
])
def test_learning_rate_schedules(schedule, restart, expected):
    optim = copy.deepcopy(default_cfg.optim)
    optim.lr_schedule, optim.cosine.use_restart = schedule, restart
    for epoch, lr in expected.items():
        assert lr_at_epoch(epoch, optim, epochs=100) == pytest.approx(lr, abs=1e-12)


def test_scheduler_state_survives_weights_only_loading(tmp_path):
    cfg = default_cfg
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.init_lr)
    scheduler = build_scheduler(optimizer, cfg.optim, epochs=100)
    for _ in range(31):
        optimizer.step()
        scheduler.step()
    path = str(tmp_path / "s.pth")
    atomic_save({"scheduler": scheduler.state_dict()}, path)
    restored = build_scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.init_lr), cfg.optim,
        epochs=100)
    restored.load_state_dict(torch.load(path, weights_only=True)["scheduler"])
    assert restored.last_epoch == 31 and restored.get_last_lr() == pytest.approx([0.01])


def test_an_unseeded_run_draws_its_own_seed():
    cfg = copy.deepcopy(default_cfg)
    cfg.train_params.use_seed, cfg.train_params.seed = False, 3
    drawn = {run_seed(cfg.train_params.use_seed, cfg.train_params.seed, torch.device("cpu"))
             for _ in range(3)}
    assert len(drawn) == 3
    cfg.train_params.use_seed = True
    assert run_seed(cfg.train_params.use_seed, cfg.train_params.seed, torch.device("cpu")) == 3


@pytest.mark.parametrize("saved_fp16, resumed_fp16", [(False, True), (True, False), (True, True)])
def test_resume_across_a_change_of_precision(saved_fp16, resumed_fp16, tmp_path):
    """An empty scaler state (bf16 or full precision) must not stop an fp16 resume, nor the
    reverse."""
    def training_state(fp16: bool) -> tuple:
        student = torchvision.models.resnet18(num_classes=NUM_CLASSES)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
        scheduler = build_scheduler(optimizer, default_cfg.optim, epochs=100)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=fp16)
        return student, optimizer, scheduler, scaler

    student, optimizer, scheduler, scaler = training_state(saved_fp16)
    optimizer.step()
    scheduler.step()
    progress = Progress(epochs_done=1, best_top1_err=40.0, best_top5_err=10.0, best_epoch=1, step=2,
                        seed=2 ** 61 + 5, epoch_sums=((1.5, 2, 3, 8, 0.25, 0.125, 1, 0.5),
                                                      (4, 5, 6, 8, 0.5, 0.0625, 2, 1.5)))
    path = str(tmp_path / CHECKPOINT_NAME)
    atomic_save(training_checkpoint(student, "resnet18", optimizer, scheduler, scaler, progress,
                                    default_cfg.to_dict()), path)
    student, optimizer, scheduler, scaler = training_state(resumed_fp16)
    restored = restore_training(torch.load(path, weights_only=True), optimizer, scheduler, scaler,
                                restore_rng=False)
    assert restored == progress and scheduler.last_epoch == 1
    if resumed_fp16:
        assert scaler.get_scale() == 1024.0


@pytest.mark.slow
def test_non_finite_loss_stops_all_processes_and_keeps_the_checkpoint(full_run, data, tmp_path,
                                                                     capfd):
    """One error line naming epoch and step, non-zero exit, the good checkpoint kept (through
    main() in this process: the console is the command line's)."""
    out = tmp_path / "out"
    out.mkdir()
    good = out / CHECKPOINT_NAME
    shutil.copy(os.path.join(full_run, CHECKPOINT_NAME), good)
    before = good.read_bytes()
    argv = overrides(data, str(out), optim__init_lr=1e30, train_params__print_freq=1,
                     train_params__eval_teacher=False)
    capfd.readouterr()
    assert train_with_distillation.main(argv) != 0
    printed, err = capfd.readouterr()
    error_lines = err.strip().splitlines()
    assert len(error_lines) == 1, err
    assert re.match(r"error: non-finite loss at epoch 1, step \d+", error_lines[0])
    assert "Traceback" not in printed + err
    assert good.read_bytes() == before
    assert not (out / BEST_NAME).exists()
    assert "error: non-finite loss" in read_log(str(out))


def _die_or_hang(proc: distributed.ProcessInfo) -> None:
    """Rank 1 dies abruptly; rank 0 stands for a process stuck waiting on it, and never returns."""
    if proc.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Event().wait()


@pytest.mark.slow
def test_a_dead_process_stops_the_whole_job():
    with pytest.raises(distributed.LaunchError, match="rank1 was killed by SIGKILL") as info:
        distributed.launch(_die_or_hang, nprocs=2)
    assert info.value.exit_code != 0


def test_torchrun_environment_places_the_process(monkeypatch):
    """Process 5 of two 4-GPU machines: the second machine's second device, workers shared by 4."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.torchrun_process() is None
    assert distributed.planned_world_size(3) == 3
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    proc = distributed.torchrun_process()
    assert proc == distributed.ProcessInfo(rank=5, world_size=8, local_rank=1, local_world_size=4,
                                           init_method="env://")
    assert not proc.is_main
    assert distributed.planned_world_size(3) == 8  # torchrun's count wins over dist.nprocs


LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                 "SLURM_NODEID")


@pytest.mark.parametrize("slurm, devices, expected", [
    ({"SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "8"}, 8, 8),
    ({"SLURM_LOCALID": "3", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"}, 0, 8),
    ({"SLURM_LOCALID": "3", "SLURM_TASKS_PER_NODE": "6,4(x2)", "SLURM_NODEID": "2"}, 8, 4),
    ({}, 8, 8),  # no launcher count: one process per visible device
    # SLURM's task is not this process
    ({"SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2"}, 8, 8),
    ({}, 0, 16),  # no devices either: every process on this machine
])
def test_local_world_size_without_local_world_size(monkeypatch, slurm, devices, expected):
    """A hand-written SLURM script: two 8-GPU machines, 16 processes, no LOCAL_WORLD_SIZE."""
    for key in LAUNCHER_KEYS:
        monkeypatch.delenv(key, raising=False)
    env = {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "node0",
           "MASTER_PORT": "29500"}
    for key, value in {**env, **slurm}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    proc = distributed.torchrun_process()
    assert proc is not None and (proc.world_size, proc.local_rank) == (16, 3)
    assert proc.local_world_size == expected
    if devices:  # no "16 processes on a machine with 8 devices"
        train_with_distillation.check_config(copy.deepcopy(default_cfg), world_size=16)


@pytest.mark.parametrize("cores, local_processes, setting, expected", [
    (128, 8, "auto", 14), (256, 8, "auto", 30), (16, 8, "auto", 1), (2, 1, "auto", 1),
    (8, 1, "auto", 7), (1, 1, "auto", 1), (128, 8, 32, 4), (128, 8, 0, 0), (2, 1, 5, 5),
])
def test_loader_workers_per_process(monkeypatch, cores, local_processes, setting, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert distributed.loader_workers_per_process(setting, local_processes) == expected


@pytest.mark.parametrize("workers", ["many", -1, 2.5, True])
def test_bad_num_workers_is_a_config_error(workers):
    cfg = copy.deepcopy(default_cfg)
    cfg.data.num_workers = workers
    with pytest.raises(ConfigError,
                       match="data.num_workers must be 'auto' or a non-negative integer"):
        train_with_distillation.check_config(cfg, world_size=1)


def test_evaluation_configures_the_backends_as_training_does(data, tmp_path, monkeypatch, capsys):
    calls = []
    record = lambda device, deterministic: calls.append((device.type, deterministic))  # noqa: E731
    monkeypatch.setattr(train_with_distillation, "configure_backends", record)
    monkeypatch.setattr(device_module, "configure_backends", record)
    argv = overrides(data, str(tmp_path / "out"), data__num_workers="auto")
    assert train_with_distillation.main(["--evaluate", "teacher", *argv]) == 0
    assert last_json_line(capsys.readouterr().out)["images"] == 13
    args = train_with_distillation.build_arg_parser().parse_args(argv)
    cfg = train_with_distillation.load_config(args)
    threads = torch.get_num_threads()
    try:
        configure_process(distributed.ProcessInfo(), torch.device("cpu"), cfg.train_params.use_seed,
                          cfg.dist.backend, cfg.dist.timeout_s)
    finally:
        torch.set_num_threads(threads)
    assert calls == [("cpu", True), ("cpu", True)]


def test_more_torchrun_processes_than_devices_is_a_config_error(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4",
                       "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = train_with_distillation.resolve_config(copy.deepcopy(default_cfg))
    with pytest.raises(ConfigError, match="--nproc_per_node=2"):
        train_with_distillation.check_config(cfg, world_size=4)


@pytest.mark.parametrize("local_rank", [0, 1])
def test_under_torchrun_the_first_process_of_each_machine_checks_the_inputs(local_rank, monkeypatch,
                                                                            tmp_path):
    """Eight processes of a machine must not all open the data and load the teacher at once:
    only local rank 0 checks, and the others wait for it at a barrier."""
    launcher = {"RANK": str(8 + local_rank), "WORLD_SIZE": "16", "LOCAL_RANK": str(local_rank),
                "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    calls: list[str] = []
    module = train_with_distillation
    monkeypatch.setattr(module, "check_inputs", lambda cfg, loss: calls.append("check_inputs"))
    monkeypatch.setattr(module, "configure_process", lambda *args: calls.append("process group"))
    monkeypatch.setattr(module.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(module, "open_imagenet",
                        lambda *args, **kwargs: calls.append("train") or 1 / 0)
    monkeypatch.setattr(module.distributed, "launch",
                        lambda fn, args, nprocs: fn(distributed.torchrun_process(), *args))
    cfg = copy.deepcopy(default_cfg)
    cfg.train_params.output_dir = str(tmp_path)
    with pytest.raises(ZeroDivisionError):  # stops the process right after the barrier
        module.launch_job(cfg)
    expected = ["check_inputs"] if local_rank == 0 else []
    assert calls == [*expected, "process group", "barrier", "train"]


@pytest.mark.slow
def test_a_bug_keeps_its_traceback_while_a_bad_setting_is_one_line(data, tmp_path, capsys):
    """Only the project's UserError becomes one line: a ValueError from inside the code is a bug,
    and the user (or a bug report) needs its whole traceback. (The bad setting goes through
    main() in this process: it fails before any process starts, as at the command line.)"""
    out = str(tmp_path / "out")
    argv = overrides(data, out, **{"dist.nprocs": 1, "train_params.eval_teacher": False})
    program = (
        "import sys, knowledge_distiller, train_with_distillation\n"
        "def broken(self, fc_s, fc_t, label):\n"
        "    raise ValueError('an internal inconsistency')\n"
        "knowledge_distiller.WSLDLoss.forward = broken\n"
        "sys.exit(train_with_distillation.main(sys.argv[1:]))\n")
    bug = subprocess.run([sys.executable, "-c", program, *argv], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bug.returncode == 1, bug.stderr
    assert "Traceback (most recent call last)" in bug.stderr
    assert "ValueError: an internal inconsistency" in bug.stderr
    assert "in forward" in bug.stderr or "in broken" in bug.stderr  # the stack reaches the loss
    assert not any(line.startswith("error: ") for line in bug.stderr.splitlines())

    capsys.readouterr()
    assert train_with_distillation.main([*argv, "optim.init_l=0.1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown config key 'optim.init_l'; did you mean 'optim.init_lr'?"]


def _write_truncated_checkpoint(path: str) -> str:
    atomic_save({"state_dict": {"w": torch.randn(1000)}, "epoch": 1}, path)
    with open(path, "rb") as f:
        head = f.read(200)
    with open(path, "wb") as f:
        f.write(head)
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing_data_path", r"data\.data_path '.*' is not a folder"),
    ("missing_lmdb", r"img2lmdb"),
    ("missing_list", r"mk_img_list"),
    ("unknown_key", r"unknown config key 'optim\.init_l'; did you mean 'optim\.init_lr'"),
    ("indivisible_batch", r"data\.batch_size=7 .* does not divide among 2 processes"),
    ("missing_teacher_weights", r"absent_teacher\.pth"),
    ("unreadable_resume", r"cannot read checkpoint"),
    ("missing_evaluate_checkpoint", r"absent_student\.pth"),
])
def test_bad_input_is_one_line_and_exit_2(case, expected, data, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = overrides(data, out)
    if case == "missing_data_path":
        argv += [f"data.data_path={tmp_path / 'nowhere'}"]
    elif case in ("missing_lmdb", "missing_list"):
        partial = str(tmp_path / "partial")
        shutil.copytree(data["lmdb"], partial)
        if case == "missing_lmdb":
            shutil.rmtree(os.path.join(partial, "train"))
        else:
            os.remove(os.path.join(partial, "val_list.txt"))
        argv += [f"data.data_path={partial}"]
    elif case == "unknown_key":
        argv += ["optim.init_l=0.1"]
    elif case == "indivisible_batch":
        argv += ["data.batch_size=7"]
    elif case == "missing_teacher_weights":
        argv += [f"model.teacher_weights={tmp_path / 'absent_teacher.pth'}"]
    elif case == "unreadable_resume":
        bad = _write_truncated_checkpoint(str(tmp_path / "bad.pth"))
        argv += ["optim.if_resume=True", f"optim.resume_path={bad}"]
    elif case == "missing_evaluate_checkpoint":
        argv = ["--evaluate", str(tmp_path / "absent_student.pth"), *argv]
    assert train_with_distillation.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert re.search(expected, lines[0]), lines[0]
    assert not os.path.exists(os.path.join(out, CHECKPOINT_NAME))


def test_launching_leaves_the_callers_config_as_given(monkeypatch, tmp_path):
    """The demo records the teacher's configuration as it asked for it, to reuse the teacher
    later; the derived values (model names, output folder) are filled in on a copy."""
    monkeypatch.setattr(train_with_distillation, "check_inputs", lambda cfg, loss: None)
    launched = []
    monkeypatch.setattr(train_with_distillation.distributed, "launch",
                        lambda fn, args, nprocs: launched.append(args[0]))
    cfg = copy.deepcopy(default_cfg)
    cfg.dist.nprocs = 1
    given = copy.deepcopy(cfg)
    train_with_distillation.launch_job(cfg)
    assert cfg == given
    assert (launched[0].model.teacher, launched[0].model.student) == ("resnet34", "resnet18")
    assert launched[0].train_params.output_dir == os.path.join("output", "resnet")
