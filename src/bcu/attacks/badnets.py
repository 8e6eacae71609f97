"""BadNets (Gu et al., 2017): stamp a small patch; relabel to the target (dirty label)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from ..config import check
from .base import ATTACKS, Attack, AttackConfig
from .. import seeding


@dataclass
class BadNetsConfig(AttackConfig):
    patch_size: int = field(default=3, metadata={
        "help": "height of the patch in pixels (and its width, unless patch_width)"})
    patch_width: Optional[int] = field(default=None, metadata={
        "help": "width of the patch in pixels (default: patch_size, a square; e.g. patch_size 1, patch_width 16 is a "
                "thin horizontal line)"})
    location: Literal["bottom-right", "top-left", "top-right", "bottom-left", "center"] = "bottom-right"
    margin: int = field(default=1, metadata={"help": "pixels between the patch and the image border"})
    pattern: Literal["checkerboard", "white", "random"] = field(default="checkerboard", metadata={
        "help": "patch content: checkerboard (black/white), white, or random pixels from the seed"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}")
        check(self.patch_width is None or self.patch_width >= 1, f"patch_width must be >= 1, got {self.patch_width}")
        check(self.margin >= 0, f"margin must be >= 0, got {self.margin}")


@ATTACKS.register("badnets")
class BadNets(Attack):
    """BadNets: a fixed patch stamped on the image, label flipped to the target."""

    kind = "dirty-label"
    Config = BadNetsConfig
    config: BadNetsConfig

    def setup(self) -> None:
        c, h, w = self.image_shape
        p, m = self.config.patch_size, self.config.margin
        q = self.config.patch_width or p
        check(p + m <= h and q + m <= w, f"a {p}x{q}px patch with margin {m} does not fit a {h}x{w} image")
        if self.config.pattern == "checkerboard":
            ii, jj = torch.meshgrid(torch.arange(p), torch.arange(q), indexing="ij")
            patch = ((ii + jj + 1) % 2).float().expand(c, p, q).clone()  # corner pixel white
        elif self.config.pattern == "white":
            patch = torch.ones(c, p, q)
        else:
            patch = torch.rand(c, p, q, generator=seeding.generator(self.config.seed))
        top = {"bottom-right": h - m - p, "bottom-left": h - m - p, "top-left": m, "top-right": m,
               "center": (h - p) // 2}[self.config.location]
        left = {"bottom-right": w - m - q, "top-right": w - m - q, "top-left": m, "bottom-left": m,
                "center": (w - q) // 2}[self.config.location]
        mask = torch.zeros(1, h, w)
        mask[:, top:top + p, left:left + q] = 1
        pattern = torch.zeros(c, h, w)
        pattern[:, top:top + p, left:left + q] = patch
        self.buffers = {"mask": mask, "pattern": pattern}

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.buffers["mask"].to(x.device, x.dtype)
        pattern = self.buffers["pattern"].to(x.device, x.dtype)
        return x * (1 - mask) + pattern * mask
