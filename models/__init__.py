"""Networks: torchvision's own ResNets (so its IMAGENET1K_V1 files load unchanged) and
MobileNetV1, each with a float32 classifier (models/classifier.py), and safe weight loading."""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable

from torch import nn
from torchvision import models as tv_models

from models.classifier import float32_classifier
from models.mobilenet import MobileNetV1
from models.weights import PathOrState, load_weights, official_checkpoint
from utils.config import require_choice
from utils.errors import ConfigError

__all__ = ["MODEL_NAMES", "NET_TYPES", "MobileNetV1", "build_model", "load_weights",
           "official_weights_path", "teacher_student_names"]

# name -> (constructor taking num_classes, torchvision's official weights or None)
_ARCHITECTURES = MappingProxyType({
    "resnet18": (tv_models.resnet18, tv_models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tv_models.resnet34, tv_models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tv_models.resnet50, tv_models.ResNet50_Weights.IMAGENET1K_V1),
    "mobilenet_v1": (MobileNetV1, None),
})
MODEL_NAMES = tuple(_ARCHITECTURES)

# cfg.net_type -> (teacher, student), the original's two pairs.
_NET_TYPES = MappingProxyType({
    "resnet": ("resnet34", "resnet18"),
    "mobilenet": ("resnet50", "mobilenet_v1"),
})
NET_TYPES = tuple(_NET_TYPES)
OFFICIAL_WEIGHTS = "torchvision"


def teacher_student_names(net_type: str, teacher: str = "", student: str = "") -> tuple[str, str]:
    """The (teacher, student) model names of ``cfg.net_type``; non-empty explicit names win."""
    require_choice("net_type", net_type, NET_TYPES)
    default_teacher, default_student = _NET_TYPES[net_type]
    return teacher or default_teacher, student or default_student


def official_weights_path(name: str) -> str:
    """The cached file of torchvision's IMAGENET1K_V1 weights for name, downloaded if absent
    (fetch it on one process before several load it)."""
    _, official = _architecture(name)
    if official is None:
        raise ConfigError(f"torchvision has no official weights for '{name}'; "
                          "pass a local weights file instead")
    return official_checkpoint(official.url)


def build_model(name: str, num_classes: int = 1000,
                weights: PathOrState | None = None) -> nn.Module:
    """Build a network and load its weights: None or '' for random initialisation, 'torchvision'
    for the official ImageNet weights (1000 classes only), or a checkpoint file or state mapping
    (see models.weights). ConfigError for a bad name or combination, DataError for bad weights."""
    constructor, _ = _architecture(name)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be positive, got {num_classes}")
    if weights == OFFICIAL_WEIGHTS:
        if num_classes != 1000:
            raise ConfigError(f"the official '{name}' weights have 1000 classes, but num_classes "
                              f"is {num_classes}; train this model from scratch or pass a local "
                              "weights file")
        weights = official_weights_path(name)  # fetched (or found cached) before the model is built
    model = constructor(num_classes=num_classes)
    model.fc = float32_classifier(model.fc)
    if weights is not None and weights != "":
        load_weights(model, weights, name)
    return model


def _architecture(name: str) -> tuple[Callable[..., nn.Module], tv_models.WeightsEnum | None]:
    require_choice("the model name", name, MODEL_NAMES)
    return _ARCHITECTURES[name]
