"""MobileNetV2 (Sandler et al., CVPR 2018): inverted residual blocks with depthwise convolutions.

Each block expands its input with a 1x1 convolution (factor ``t``), filters it with a depthwise 3x3
convolution (one filter per channel, ``groups=channels``), and projects it back with a linear 1x1
convolution; blocks of stride 1 whose input and output widths match add their input (the inverted
residual). BatchNorm follows every convolution and ReLU6 every one but the projection.

The block table is the paper's (Table 2), with the strides of the common CIFAR adaptation (the
stem and the 24-channel stage keep the resolution, so a 32x32 image ends at 4x4, not 1x1);
``stem_stride=2`` restores the ImageNet stem, halving the resolution first (4x fewer operations,
what makes the network affordable on a CPU). ``width`` scales every width; ``depth`` scales the
number of blocks per stage (at least one).
"""
from __future__ import annotations

import math
from typing import List, Tuple

from torch import nn

from .registry import register_model

# (expansion t, output channels c, blocks n, stride s) -- the paper's Table 2, CIFAR strides
BLOCKS: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(v: float, divisor: int = 8, minimum: int = 8) -> int:
    """Round a width to a multiple of ``divisor`` (never below 90% of ``v``), as the reference code."""
    out = max(minimum, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> List[nn.Module]:
    layers: List[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: List[nn.Module] = []
        if expand != 1:
            layers += _conv_bn(cin, hidden, 1)  # expand
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)  # depthwise
        layers += _conv_bn(hidden, cout, 1, act=False)  # linear projection
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float, depth: float, last_channels: int,
                 dropout: float, stem_stride: int) -> None:
        super().__init__()
        cin = _divisible(32 * width)
        layers: List[nn.Module] = _conv_bn(in_channels, cin, 3, stem_stride)
        for t, c, n, s in BLOCKS:
            cout = _divisible(c * width)
            for i in range(max(1, math.ceil(n * depth))):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _divisible(last_channels * max(1.0, width))
        layers += _conv_bn(cin, last, 1)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, input_shape: Tuple[int, int, int] = (3, 32, 32), width: float = 1.0,
                depth: float = 1.0, last_channels: int = 1280, dropout: float = 0.0, stem_stride: int = 1) -> MobileNetV2:
    """MobileNetV2 (inverted residuals, depthwise convs); ``width``/``depth`` scale channels/blocks."""
    if not 0 < depth <= 4:
        raise ValueError(f"depth must be in (0, 4], got {depth}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if stem_stride not in (1, 2):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
    return MobileNetV2(num_classes, input_shape[0], width, depth, last_channels, dropout, stem_stride)
