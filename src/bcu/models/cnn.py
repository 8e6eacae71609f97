"""Small CNNs for 28x28 (and 32x32) images: fast enough to train on two CPU cores."""
from __future__ import annotations

from typing import Sequence, Tuple

from torch import nn

from .registry import register_model


def _conv_bn(cin: int, cout: int) -> list:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, each followed by 2x2 max-pooling, then a two-layer MLP head."""

    def __init__(self, num_classes: int, input_shape: Tuple[int, int, int], channels: Sequence[int],
                 hidden: int, pool_every: Sequence[bool]) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list = []
        for cout, pool in zip(channels, pool_every):
            layers += _conv_bn(c, cout)
            if pool:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = cout
        if h < 1 or w < 1:
            raise ValueError(f"input {input_shape} is too small for {len(channels)} pooling stages")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("cnn-small")
def cnn_small(num_classes: int = 10, input_shape: Tuple[int, int, int] = (1, 28, 28), width: float = 1.0,
              hidden: int = 128) -> SmallCNN:
    """3 conv layers (16-32-64 x width), each pooled, + 2 linear layers (~100k params on 1x28x28)."""
    ch = [max(1, round(c * width)) for c in (16, 32, 64)]
    return SmallCNN(num_classes, input_shape, ch, hidden, [True, True, True])


@register_model("cnn4")
def cnn4(num_classes: int = 10, input_shape: Tuple[int, int, int] = (1, 28, 28), width: float = 1.0,
         hidden: int = 128) -> SmallCNN:
    """4 conv layers (16-32-64-64 x width, pooled after 2-4) + 2 linear layers (the core issue's probe)."""
    ch = [max(1, round(c * width)) for c in (16, 32, 64, 64)]
    return SmallCNN(num_classes, input_shape, ch, hidden, [False, True, True, True])
