"""CIFAR-style ResNet-18 (3x3 stem, no max-pool) with a width multiplier."""
from __future__ import annotations

from typing import Tuple

import torch.nn.functional as F
from torch import nn

from .registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: Tuple[int, ...], num_classes: int, in_channels: int, width: float) -> None:
        super().__init__()
        planes = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        cin = planes[0]
        stages = []
        for i, (p, n) in enumerate(zip(planes, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, p, 2 if (j == 0 and i > 0) else 1))
                cin = p
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("resnet18")
def resnet18(num_classes: int = 10, input_shape: Tuple[int, int, int] = (3, 32, 32), width: float = 1.0) -> ResNet:
    """CIFAR ResNet-18 (He et al. 2016); ``width`` scales every stage's channels."""
    return ResNet((2, 2, 2, 2), num_classes, input_shape[0], width)
