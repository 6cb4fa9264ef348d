"""A classifier layer that computes in float32 under autocast, where bf16 would round the logits
to steps of 0.06 to 0.125 (for logits of 8 to 32) before the loss, the WSLD weight and the top-k
counts see them. It is one small matmul, so float32 costs nothing measurable."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Float32Linear(nn.Linear):
    """``nn.Linear`` with the same parameters and state-dict keys, computed in its weights' dtype
    (float32 in training) whatever autocast region it runs in."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


def float32_classifier(linear: nn.Linear) -> Float32Linear:
    """A Float32Linear holding linear's own parameters (no new initialisation, no random draws)."""
    layer = Float32Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          device="meta")
    layer.weight = linear.weight
    layer.bias = linear.bias
    return layer
