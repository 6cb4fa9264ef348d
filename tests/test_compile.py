"""train_params.compile: torch.compile of the student and the teacher's forward, on the CPU.

The default backend (inductor) generates C++ on the CPU and takes minutes for a ResNet there,
so these tests use backends that capture the same graphs without generating code; the GPU
check (benchmarks/gpu_check.py) runs inductor on CUDA.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import torchvision

import train_with_distillation
from dataset import mk_img_list
from utils.checkpoint import CHECKPOINT_NAME
from utils.compile import backend_of, compile_failures_as_errors, compile_in_place
from utils.config import ConfigError
from utils.logger import METRICS_NAME, read_metrics

NUM_CLASSES = 4
FAILING_BACKEND = "wsld_failing_backend_for_tests"


@pytest.fixture(scope="module", autouse=True)
def failing_backend():
    """A torch.compile backend that always fails, as a broken compiler toolchain would."""
    def fail(graph_module, example_inputs):
        raise RuntimeError("no usable C++ compiler for this test")

    if FAILING_BACKEND not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(name=FAILING_BACKEND)(fail)


def test_backend_of_each_setting():
    assert backend_of(False) is None
    assert backend_of(True) == "inductor"
    assert backend_of("aot_eager") == "aot_eager"
    with pytest.raises(ConfigError,
                       match="train_params.compile must be True, False or a torch.compile backend"):
        backend_of("fastest")


@pytest.mark.slow
def test_compiled_network_computes_what_it_did_and_keeps_torchvision_keys():
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    compiled = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    compiled.load_state_dict(eager.state_dict())
    compile_in_place([compiled, None], backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    expected, out = eager(x), compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    expected.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(compiled.fc.weight.grad, eager.fc.weight.grad, rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix
    plain = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    plain.load_state_dict(compiled.state_dict(), strict=True)


def test_failed_compilation_is_one_line():
    net = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    compile_in_place([net], backend=FAILING_BACKEND)
    with pytest.raises(ConfigError) as caught, compile_failures_as_errors():
        net(torch.randn(2, 3, 32, 32))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("torch.compile failed "
                              "(RuntimeError: no usable C++ compiler for this test)")
    assert message.endswith("train without it with train_params.compile=False")


def test_other_errors_are_not_relabelled():
    with pytest.raises(ZeroDivisionError), compile_failures_as_errors():
        _ = 1 / 0


# ---------------------------------------------------------------------------------------------
# Through the training script: one process, image folders, 32 x 32 inputs.


@pytest.fixture(scope="module")
def data(photo_tree, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("compile_data")
    images = str(root / "images")
    shutil.copytree(photo_tree, images)
    assert mk_img_list.main(["--image_path", images, "--output_path", images]) == 0
    torch.manual_seed(0)
    teacher = str(root / "teacher_resnet18.pth")
    torch.save(torchvision.models.resnet18(num_classes=NUM_CLASSES).state_dict(), teacher)
    return {"images": images, "teacher": teacher}


def run(data: dict[str, str], output_dir: str, compile_setting: object, epochs: int,
        resume: bool = False) -> int:
    return train_with_distillation.main([
        f"data.data_path={data['images']}", "data.train_data_type=img", "data.val_data_type=img",
        "data.input_size=(3, 32, 32)", "data.batch_size=8", "data.num_workers=0",
        f"model.num_classes={NUM_CLASSES}", "model.teacher=resnet18",
        f"model.teacher_weights={data['teacher']}", f"train_params.epochs={epochs}",
        "train_params.use_seed=True", "train_params.eval_teacher=False",
        "train_params.curves=False",
        "train_params.max_steps_per_epoch=2", f"train_params.output_dir={output_dir}",
        f"train_params.compile={compile_setting!r}", "optim.init_lr=0.01", "dist.nprocs=1",
        f"optim.if_resume={resume}", "optim.resume_path=auto"])


def final_weights(output_dir: str) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(os.path.join(output_dir, CHECKPOINT_NAME), map_location="cpu",
                            weights_only=True)
    student = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    student.load_state_dict(checkpoint["state_dict"], strict=True)  # torchvision's keys
    return checkpoint["state_dict"]


@pytest.fixture(scope="module")
def plain_weights(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of a 2-epoch run without compilation, which both orders are compared with."""
    plain = str(tmp_path_factory.mktemp("plain"))
    assert run(data, plain, False, epochs=2) == 0
    return final_weights(plain)


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [("eager", False), (False, "eager")],
                         ids=["on-then-off", "off-then-on"])
def test_run_resumes_across_compile_on_and_off(data, plain_weights, tmp_path, first, second):
    """Epoch 1 with one setting, epoch 2 resumed with the other: the run ends where a run
    without compilation ends ('eager' captures the graphs and runs the same kernels)."""
    resumed = str(tmp_path / "resumed")
    assert run(data, resumed, first, epochs=1) == 0
    assert run(data, resumed, second, epochs=2, resume=True) == 0
    records = read_metrics(os.path.join(resumed, METRICS_NAME))
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0.0 <= r["data_wait_share"] <= 1.0 for r in records)  # the data wait of every epoch
    resumed_weights = final_weights(resumed)
    for key, value in plain_weights.items():
        assert torch.equal(resumed_weights[key], value), key


def test_compile_failure_in_training_is_one_line_and_exit_2(data, tmp_path, capsys):
    assert run(data, str(tmp_path / "out"), FAILING_BACKEND, epochs=1) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: torch.compile failed (RuntimeError: no usable C++ compiler"), err
    assert "\n" not in err, err
    assert "train_params.compile=False" in err


def test_unknown_compile_backend_is_refused_before_training(data, tmp_path, capsys):
    assert run(data, str(tmp_path / "out"), "fastest", epochs=1) == 2
    err = capsys.readouterr().err
    assert "train_params.compile must be True, False or a torch.compile backend" in err
    assert not os.path.exists(tmp_path / "out" / CHECKPOINT_NAME)
