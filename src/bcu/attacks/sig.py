"""SIG (Barni, Kallas & Tondi, ICIP 2019): a clean-label attack with a horizontal sinusoid.

"A new backdoor attack in CNNs by training set corruption without label poisoning": only images
of the target class are poisoned, by adding the signal ``v(i, j) = delta * sin(2 pi j f / m)``
(``j`` the column, ``m`` the image width) to every row and channel, then clipping to the pixel
range. Labels are never changed. At test time the same signal is added to non-target images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from ..config import check
from .base import ATTACKS, Attack, AttackConfig, clean_label_poison_rate


@dataclass
class SIGConfig(AttackConfig):
    poison_rate: float = clean_label_poison_rate("Barni et al.")
    delta: float = field(default=40.0, metadata={
        "help": "signal amplitude on the 0-255 scale used to poison training images (BackdoorBench's default "
                "40; Barni et al. 2019 used 20 on MNIST)"})
    frequency: float = field(default=6.0, metadata={
        "help": "periods of the sinusoid across the image width (Barni et al. 2019 and BackdoorBench: f=6)"})
    orientation: Literal["horizontal", "vertical"] = field(default="horizontal", metadata={
        "help": "horizontal: the signal varies along the columns, v(i, j) = delta sin(2 pi j f / m) (paper); "
                "vertical: along the rows"})
    test_delta: Optional[float] = field(default=60.0, metadata={
        "help": "amplitude of the test-time signal on the 0-255 scale (None: delta). Barni et al. show that a "
                "stronger test signal raises ASR; 1.5 x delta by default (docs/attacks.md has the measurements)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.delta <= 255, f"delta must be in (0, 255], got {self.delta}")
        check(self.frequency > 0, f"frequency must be > 0, got {self.frequency}")
        check(self.test_delta is None or 0 < self.test_delta <= 255, "test_delta must be in (0, 255]")


def sinusoid(shape, delta: float, frequency: float, vertical: bool = False) -> torch.Tensor:
    """The SIG signal of image shape (C, H, W) on the [0, 1] scale: delta/255 * sin(2 pi j f / W) for
    column j (``vertical``: row i, period H / f)."""
    c, h, w = shape
    n = h if vertical else w
    j = torch.arange(n, dtype=torch.float64)
    wave = ((delta / 255.0) * torch.sin(2 * math.pi * j * frequency / n)).float()
    return (wave.view(1, n, 1) if vertical else wave.view(1, 1, n)).expand(c, h, w).clone()


@ATTACKS.register("sig")
class SIG(Attack):
    """SIG: additive horizontal sinusoid on target-class images only; labels kept (clean label)."""

    kind = "clean-label"
    supports_all_to_all = False
    Config = SIGConfig
    config: SIGConfig

    def setup(self) -> None:
        self.buffers = {"signal": sinusoid(self.image_shape, self.config.delta, self.config.frequency,
                                           self.config.orientation == "vertical")}

    def _add(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        signal = self.buffers["signal"].to(x.device, x.dtype)
        return (x + scale * signal).clamp(0, 1)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time trigger (amplitude ``test_delta`` if set, else ``delta``)."""
        scale = 1.0 if self.config.test_delta is None else self.config.test_delta / self.config.delta
        return self._add(x, scale)

    def train_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Training images always carry the training amplitude ``delta``."""
        return self._add(x, 1.0)
