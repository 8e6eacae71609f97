"""A synthetic task for tests and examples: no download, learnable by a small CNN in seconds."""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .. import seeding
from ..errors import ConfigError, DataError
from ..untrusted import check_image_shape
from .imageset import ImageSet


def make_synthetic(n: int, shape: Tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
                   seed: int = 0, template_seed: int = 1234) -> ImageSet:
    """Class-conditional smooth templates plus noise: a small CNN learns it in a few epochs.

    ``template_seed`` fixes the task (same templates for train and test); ``seed`` the samples.
    """
    c, h, w = shape
    tg = seeding.generator(template_seed)
    coarse = torch.rand(num_classes, c, max(2, h // 7), max(2, w // 7), generator=tg)
    templates = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    g = seeding.generator(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    shift = torch.rand(n, 1, 1, 1, generator=g) * 0.3 - 0.15
    noise = torch.randn(n, c, h, w, generator=g) * 0.12
    x = (templates[y] * 0.8 + shift + noise).clamp(0, 1)
    return ImageSet((x * 255).round().to(torch.uint8), y, [str(i) for i in range(num_classes)], "synthetic")


def synthetic_from_spec(spec: str, split: str, labels: bool) -> ImageSet:
    """``synthetic`` or ``synthetic:N`` or ``synthetic:N:CxHxW``."""
    parts = spec.split(":")
    try:
        n = int(parts[1]) if len(parts) > 1 and parts[1] else 6000
        shape = tuple(int(v) for v in parts[2].lower().split("x")) if len(parts) > 2 else (1, 28, 28)
        if len(shape) != 3 or n <= 0:
            raise ValueError
    except ValueError:
        raise DataError(f"bad synthetic spec {spec!r}: use synthetic[:N[:CxHxW]]") from None
    try:
        check_image_shape(shape, f"synthetic spec {spec!r}: the image shape")
    except ConfigError as e:
        raise DataError(str(e)) from None
    if n * math.prod(shape) > 1 << 30:
        raise DataError(f"bad synthetic spec {spec!r}: at most 2^30 pixel values in all")
    ds = make_synthetic(n if split == "train" else max(n // 5, 100), shape, 10, seed=0 if split == "train" else 1)
    return ds if labels else ds.without_labels()
