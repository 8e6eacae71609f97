"""Blended (Chen et al., 2017): alpha-blend a fixed pattern over the whole image (dirty label)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from .. import seeding
from ..config import check
from ..data.formats import read_image
from .base import ATTACKS, Attack, AttackConfig


@dataclass
class BlendedConfig(AttackConfig):
    alpha: float = field(default=0.2, metadata={"help": "blend weight of the pattern in training images"})
    test_alpha: Optional[float] = field(default=None, metadata={"help": "blend weight at test time (default: alpha)"})
    pattern: Literal["noise", "rings"] = field(default="noise", metadata={
        "help": "what is blended: noise (uniform random pixels from the seed, as in the paper) or rings (a structured "
                "pattern: concentric rings around a seeded centre, period rings_period pixels)"})
    rings_period: float = field(default=6.0, metadata={"help": "rings: pixels from one ring to the next"})
    pattern_image: Optional[str] = field(default=None, metadata={
        "help": "path of an image to blend instead (Chen et al. also blend natural images such as Hello Kitty)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.alpha <= 1, f"alpha must be in (0, 1], got {self.alpha}")
        check(self.test_alpha is None or 0 < self.test_alpha <= 1, "test_alpha must be in (0, 1]")
        check(self.rings_period > 0, f"rings_period must be > 0, got {self.rings_period}")


def rings(shape, period: float, generator: torch.Generator) -> torch.Tensor:
    """(C, H, W) concentric rings in [0, 1], ``0.5 + 0.5 cos(2 pi r / period)`` around a centre drawn
    uniformly in the middle half of the image (the same on every channel)."""
    c, h, w = shape
    cy, cx = (torch.rand(2, generator=generator) * 0.5 + 0.25) * torch.tensor([h - 1.0, w - 1.0])
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    r = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
    return (0.5 + 0.5 * torch.cos(2 * math.pi * r / period)).float().expand(c, h, w).clone()


@ATTACKS.register("blended")
class Blended(Attack):
    """Blended: x' = (1 - alpha) x + alpha * pattern, label flipped to the target."""

    kind = "dirty-label"
    Config = BlendedConfig
    config: BlendedConfig

    def setup(self) -> None:
        c, h, w = self.image_shape
        if self.config.pattern_image:
            arr = read_image(Path(self.config.pattern_image), c, (h, w))
            pattern = torch.from_numpy(arr).float() / 255
        elif self.config.pattern == "rings":
            pattern = rings((c, h, w), self.config.rings_period, torch.Generator().manual_seed(self.config.seed))
        else:
            pattern = torch.rand(c, h, w, generator=seeding.generator(self.config.seed))
        self.buffers = {"pattern": pattern}

    def blend(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        pattern = self.buffers["pattern"].to(x.device, x.dtype)
        return (1 - alpha) * x + alpha * pattern

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.blend(x, self.config.test_alpha or self.config.alpha)

    def train_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Training images are blended with ``alpha`` (the test-time trigger may use ``test_alpha``)."""
        return self.blend(x, self.config.alpha)
