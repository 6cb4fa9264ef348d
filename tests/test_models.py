"""Model construction and weight loading: official keys, checkpoint forms, unsafe and broken
files."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import models
from models import (
    MODEL_NAMES,
    MobileNetV1,
    build_model,
    load_weights,
    teacher_student_names,
)
from utils.errors import ConfigError, DataError

OFFICIAL_RESNET18 = "resnet18-f37072fd.pth"


# Tensors this small run faster on one thread than on OpenMP workers woken on a busy machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def resnet18_state() -> OrderedDict:
    """A torchvision ResNet-18 state dict with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net.state_dict()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def expected(resnet18_state, images) -> torch.Tensor:
    """The logits of torchvision's ResNet-18 holding resnet18_state, loaded torchvision's way."""
    net = torchvision.models.resnet18()
    net.load_state_dict(resnet18_state)
    return logits(net, images)


@pytest.fixture()
def hub_dir(tmp_path, monkeypatch) -> str:
    """An empty torch hub cache, and a download that must not be reached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, *args, **kwargs):
        raise OSError(f"network unreachable: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return os.path.join(torch.hub.get_dir(), "checkpoints")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_with_the_asked_classifier_width(name):
    model = build_model(name, num_classes=7)
    assert logits(model, torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v1"])
def test_classifier_runs_in_float32_under_bf16_autocast(name):
    """The logits are the float32 classifier applied to the features, not bf16-rounded."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).eval()
    features = []
    model.fc.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert features[0].dtype == torch.bfloat16  # the layers before it did run in bf16
    assert out.dtype == torch.float32 and model.fc.weight.dtype == torch.float32
    expected = nn.functional.linear(features[0].float(), model.fc.weight, model.fc.bias)
    assert torch.equal(out, expected)


def test_float32_classifier_keeps_torchvisions_keys_and_initialisation():
    torch.manual_seed(0)
    ours = build_model("resnet18", num_classes=10)
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=10)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                 theirs.state_dict().values()))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_unknown_model_names_the_choices():
    with pytest.raises(ConfigError, match="resnet18, resnet34, resnet50"):
        build_model("vgg16")


@pytest.mark.parametrize("num_classes", [0, -1])
def test_a_classifier_without_outputs_is_a_config_error(num_classes):
    with pytest.raises(ConfigError, match=f"num_classes must be positive, got {num_classes}"):
        build_model("resnet18", num_classes=num_classes)


def test_mobilenet_v1_has_the_standard_shape_and_size():
    model = MobileNetV1()
    assert sum(p.numel() for p in model.parameters()) == 4_231_976  # "4.2M" in the paper
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert model.eval().features(x).shape == (1, 1024, 7, 7)  # 13 blocks, overall stride 32
        assert model(x).shape == (1, 1000)
    assert sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules()) == 13


def test_mobilenet_v1_uses_kaiming_initialisation():
    torch.manual_seed(0)
    model = MobileNetV1()
    pointwise = model.features[12][1][0]  # 512 -> 1024, 1 x 1
    assert pointwise.weight.std().item() == pytest.approx((2 / 1024) ** 0.5, rel=0.05)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))


def test_torchvision_state_dict_gives_identical_logits(tmp_path, resnet18_state, images, expected):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    model = build_model("resnet18", weights=str(path))
    assert torch.equal(logits(model, images), expected)


@pytest.mark.parametrize("form",
                         ["state_dict", "model", "module_prefix", "nested_module_prefix",
                          "compiled"])
def test_common_checkpoint_forms_load(tmp_path, resnet18_state, images, expected, form):
    prefixed = OrderedDict((f"module.{k}", v) for k, v in resnet18_state.items())
    checkpoint = {
        "state_dict": {"epoch": 3, "state_dict": resnet18_state, "best_err1": 30.0},
        "model": {"model": resnet18_state, "optimizer": {"state": {}}},
        "module_prefix": prefixed,
        "nested_module_prefix": {"state_dict": prefixed, "arch": "resnet18"},
        "compiled": OrderedDict((f"module._orig_mod.{k}", v) for k, v in resnet18_state.items()),
    }[form]
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    model = build_model("resnet18", weights=path)
    assert torch.equal(logits(model, images), expected)


def test_load_weights_takes_a_state_mapping(resnet18_state, images, expected):
    model = load_weights(torchvision.models.resnet18(), {"state_dict": resnet18_state})
    assert torch.equal(logits(model, images), expected)


def test_official_weights_load_from_the_hub_cache(hub_dir, resnet18_state, images, expected):
    os.makedirs(hub_dir)
    torch.save(resnet18_state, os.path.join(hub_dir, OFFICIAL_RESNET18))
    model = build_model("resnet18", weights="torchvision")
    assert torch.equal(logits(model, images), expected)


def test_official_weights_offline_name_the_file_and_folder(hub_dir):
    with pytest.raises(DataError) as error:
        build_model("resnet34", weights="torchvision")
    message = str(error.value)
    assert "resnet34-b627a593.pth" in message and hub_dir in message and "\n" not in message
    assert not os.path.exists(os.path.join(hub_dir, "resnet34-b627a593.pth"))


def test_official_weights_are_downloaded_into_the_cache(hub_dir, resnet18_state, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        torch.save(resnet18_state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    build_model("resnet18", weights="torchvision")
    build_model("resnet18", weights="torchvision")  # the second time from the cache
    assert calls == [(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, "f37072fd")]
    assert os.path.isfile(os.path.join(hub_dir, OFFICIAL_RESNET18))


@pytest.mark.parametrize(("name", "num_classes"), [("resnet18", 10), ("mobilenet_v1", 1000)])
def test_official_weights_only_for_torchvision_models_with_1000_classes(hub_dir, name, num_classes):
    with pytest.raises(ConfigError, match="official"):
        build_model(name, num_classes=num_classes, weights="torchvision")


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_model("resnet18", weights=str(tmp_path / "absent.pth"))


def test_code_carrying_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(DataError, match="refused.*posix.mkdir") as error:
        build_model("resnet18", weights=str(path))
    assert "\n" not in str(error.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "directory"])
def test_unreadable_files_are_weights_errors(tmp_path, resnet18_state, damage):
    path = tmp_path / "broken.pth"
    if damage == "truncated":
        torch.save(resnet18_state, path)
        path.write_bytes(path.read_bytes()[: 1 << 20])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.mkdir()
    with pytest.raises(DataError) as error:
        build_model("resnet18", weights=str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("content", [[1, 2, 3], {"epoch": 3, "arch": "resnet18"}, {}])
def test_checkpoint_without_a_state_dict_is_refused(tmp_path, content):
    path = tmp_path / "not_weights.pth"
    torch.save(content, path)
    with pytest.raises(DataError, match="state dict"):
        build_model("resnet18", weights=str(path))


def test_key_mismatch_lists_keys_and_leaves_the_model_untouched(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    model = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError) as error:
        load_weights(model, path, "resnet18")
    message = str(error.value)
    assert "does not fit resnet18" in message and "0 missing" not in message
    assert "unexpected keys (layer1.2.conv1.weight" in message and "more)" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_classifier_width_mismatch_names_the_shapes(resnet18_state):
    with pytest.raises(DataError, match=r"fc.weight \(1000, 512\) vs \(10, 512\).*num_classes"):
        build_model("resnet18", num_classes=10, weights=resnet18_state)


def test_missing_keys_are_listed(resnet18_state):
    partial = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}
    with pytest.raises(DataError, match=r"2 missing keys \(fc.weight, fc.bias\)"):
        load_weights(torchvision.models.resnet18(), partial)


def test_net_types_map_to_the_original_pairs():
    assert teacher_student_names("resnet") == ("resnet34", "resnet18")
    assert teacher_student_names("mobilenet") == ("resnet50", "mobilenet_v1")
    assert teacher_student_names("resnet", teacher="resnet50") == ("resnet50", "resnet18")
    assert teacher_student_names("mobilenet", student="resnet18") == ("resnet50", "resnet18")
    with pytest.raises(ConfigError, match="resnet, mobilenet"):
        teacher_student_names("vgg")


def test_official_weights_path_is_in_the_hub_cache(hub_dir, resnet18_state):
    os.makedirs(hub_dir)
    torch.save(resnet18_state, os.path.join(hub_dir, OFFICIAL_RESNET18))
    assert models.official_weights_path("resnet18") == os.path.join(hub_dir, OFFICIAL_RESNET18)
