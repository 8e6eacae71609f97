"""VGG-11 with batch normalisation (Simonyan & Zisserman 2015), CIFAR-style head, width multiplier."""
from __future__ import annotations

from typing import Tuple

from torch import nn

from .registry import register_model

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg, num_classes: int, input_shape: Tuple[int, int, int], width: float) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list = []
        for v in cfg:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                continue
            out = max(1, round(v * width))
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg11-bn")
def vgg11_bn(num_classes: int = 10, input_shape: Tuple[int, int, int] = (3, 32, 32), width: float = 1.0) -> VGG:
    """VGG-11-BN; ``width`` scales every conv layer's channels."""
    return VGG(VGG11, num_classes, input_shape, width)
