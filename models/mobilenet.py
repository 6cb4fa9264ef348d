"""MobileNetV1 (Howard et al., 2017), the student of the ResNet-50 pair; torchvision has none.

The standard 1.0-width ImageNet network, overall stride 32, about 4.2M parameters.
"""

from __future__ import annotations

from torch import Tensor, nn

# (output channels, stride) of the 13 depthwise-separable blocks.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
          (1024, 2), (1024, 1))
STEM_CHANNELS = 32


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> nn.Sequential:
    """Convolution (no bias: BatchNorm follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """A 3x3 depthwise convolution (carrying the stride), then a 1x1 pointwise one."""
    return nn.Sequential(conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels),
                         conv_bn_relu(in_channels, out_channels, 1))


class MobileNetV1(nn.Module):
    """``features`` (stem and blocks), ``avgpool``, ``fc``: the layout of torchvision's ResNets."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers = [conv_bn_relu(3, STEM_CHANNELS, 3, stride=2)]
        channels = STEM_CHANNELS
        for out_channels, stride in BLOCKS:
            layers.append(depthwise_separable(channels, out_channels, stride))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.fc(x.flatten(1))
