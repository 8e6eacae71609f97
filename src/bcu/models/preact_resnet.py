"""PreAct-ResNet18 (He et al., "Identity mappings", 2016), the backbone of the BCU paper."""
from __future__ import annotations

from typing import Tuple

import torch.nn.functional as F
from torch import nn

from .registry import register_model


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActResNet(nn.Module):
    def __init__(self, blocks: Tuple[int, ...], num_classes: int, in_channels: int, width: float) -> None:
        super().__init__()
        planes = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        cin = planes[0]
        stages = []
        for i, (p, n) in enumerate(zip(planes, blocks)):
            layers = []
            for j in range(n):
                layers.append(PreActBlock(cin, p, 2 if (j == 0 and i > 0) else 1))
                cin = p
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.relu(self.bn(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int = 10, input_shape: Tuple[int, int, int] = (3, 32, 32),
                    width: float = 1.0) -> PreActResNet:
    """PreAct-ResNet18; ``width`` scales every stage's channels."""
    return PreActResNet((2, 2, 2, 2), num_classes, input_shape[0], width)
