"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warping-based backdoor.

A fixed smooth warping field is built from a ``k x k`` grid of random control offsets in
[-1, 1] (normalised to mean absolute value 1), upsampled to the image size with bicubic
interpolation, scaled by ``s / size`` and added to the identity sampling grid; the trigger is
``grid_sample(x, grid)``. Training poisons every batch on the fly: a fraction ``poison_rate`` of
the batch is warped and relabelled, a further ``cross_ratio * poison_rate`` ("noise mode") is
warped with the grid plus random noise and keeps its labels, so that the model learns the exact
warp rather than any warp. The warp grid is saved in the artifact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from ..config import check
from ..data.augment import identity_grid, smooth_field
from ..errors import DataError
from ..train import Objective, OptimConfig, Step
from .base import ATTACKS, Attack, AttackConfig, Training


@dataclass
class WaNetConfig(AttackConfig):
    k: int = field(default=4, metadata={"help": "control grid size k x k (Nguyen & Tran 2021: k=4)"})
    s: float = field(default=0.5, metadata={"help": "warping strength (paper: s=0.5)"})
    grid_rescale: float = field(default=1.0, metadata={"help": "grid rescale factor (paper code: 1)"})
    cross_ratio: float = field(default=2.0, metadata={
        "help": "noise-mode samples per backdoor sample, rho_n = cross_ratio * poison_rate (paper: 2)"})
    noise: bool = field(default=True, metadata={"help": "train with noise-mode (cross) samples (paper: on)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.k >= 2, f"k must be >= 2, got {self.k}")
        check(self.s > 0, f"s must be > 0, got {self.s}")
        check(self.grid_rescale > 0, f"grid_rescale must be > 0, got {self.grid_rescale}")
        check(self.cross_ratio >= 0, f"cross_ratio must be >= 0, got {self.cross_ratio}")
        check(self.poison_rate * (1 + (self.cross_ratio if self.noise else 0)) <= 1,
              "poison_rate * (1 + cross_ratio) must be <= 1")


@ATTACKS.register("wanet")
class WaNet(Attack):
    """WaNet: a fixed smooth warp (k x k control grid, bicubic upsampling) applied with grid_sample."""

    kind = "dirty-label"
    poisoning = "per-batch"
    Config = WaNetConfig
    config: WaNetConfig

    def setup(self) -> None:
        c, h, w = self.image_shape
        k = self.config.k
        check(k <= min(h, w), f"k={k} is larger than the {h}x{w} image")
        noise_grid = smooth_field(1, k, h, w, seeding.generator(self.config.seed))
        self.buffers = {"noise_grid": noise_grid.contiguous(), "grid": self._grid(noise_grid)}

    def _scale(self, device=None, dtype=None) -> torch.Tensor:
        _, h, w = self.image_shape
        return torch.tensor([1.0 / w, 1.0 / h], device=device, dtype=dtype)  # per-axis 1/size (paper: 1/H)

    def _grid(self, noise_grid: torch.Tensor) -> torch.Tensor:
        _, h, w = self.image_shape
        grid = (identity_grid(h, w) + self.config.s * noise_grid * self._scale()) * self.config.grid_rescale
        return grid.clamp(-1, 1).contiguous()

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(x.device, x.dtype)
        if grid.shape[0] != x.shape[0]:
            grid = grid.expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.warp(x, self.buffers["grid"])

    def cross(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise mode: warp with the backdoor grid plus uniform noise of one pixel (labels kept)."""
        self.check_shape(x.shape[1:])
        _, h, w = self.image_shape
        noise = (torch.rand(x.shape[0], h, w, 2, generator=generator) * 2 - 1).to(x.device, x.dtype)
        grid = self.buffers["grid"].to(x.device, x.dtype) + noise * self._scale(x.device, x.dtype)
        return self.warp(x, grid.clamp(-1, 1))

    # -- training ---------------------------------------------------------------------------------
    def batch_counts(self, n: int) -> Tuple[int, int]:
        num_bd = int(n * self.config.poison_rate)
        num_cross = int(num_bd * self.config.cross_ratio) if self.config.noise else 0
        return num_bd, min(num_cross, n - num_bd)

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor,
                     generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """The paper's per-batch recipe on an (already shuffled) batch: backdoor, cross, clean."""
        num_bd, num_cross = self.batch_counts(x.shape[0])
        parts = [self.apply(x[:num_bd])] if num_bd else []
        if num_cross:
            parts.append(self.cross(x[num_bd:num_bd + num_cross], generator))
        parts.append(x[num_bd + num_cross:])
        labels = torch.cat([self.target_labels(y[:num_bd]), y[num_bd:]])
        return torch.cat(parts), labels

    def objective(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor],
                  step: Step) -> Tuple[torch.Tensor, Dict[str, float]]:
        if y is None:
            raise DataError("wanet training needs labels")
        xb, yb = self.poison_batch(x, y, step.generator)
        logits = model(xb.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) else xb)
        loss = F.cross_entropy(logits, yb)
        num_bd, _ = self.batch_counts(x.shape[0])
        pred = logits.detach().argmax(1)
        metrics = {"loss": float(loss.detach()), "acc": float((pred[num_bd:] == yb[num_bd:]).float().mean()) * 100}
        if num_bd:
            metrics["asr"] = float((pred[:num_bd] == yb[:num_bd]).float().mean()) * 100
        return loss, metrics

    def batch_objective(self, optim: OptimConfig, run: Training) -> Objective:
        """Cross-entropy on every (shuffled, augmented) batch poisoned by :meth:`poison_batch`."""
        return self.objective
