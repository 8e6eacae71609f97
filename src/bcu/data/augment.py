"""Batched image augmentation: pure tensor ops on whole (N, C, H, W) batches, on any device.

Every function takes the batch and an optional ``torch.Generator`` and draws one random choice per
image from it, so the same generator gives the same batch (kornia's style: no per-sample Python).
Crop and flip only move pixels and work on uint8 as on floats; mixup, noise blending and warps
expect floats in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import seeding
from ..errors import ConfigError
from .. import untrusted


def random_crop(x: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop of the original size from a zero-padded batch (one offset per image)."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def random_hflip(x: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def sample_beta(n: int, alpha: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n`` draws from Beta(alpha, alpha), reproducible through ``generator``."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        seeding.manual_seed(seed)
        a = torch._standard_gamma(torch.full((n,), float(alpha)))
        b = torch._standard_gamma(torch.full((n,), float(alpha)))
    return a / (a + b).clamp_min(1e-12)


def mixup(x: torch.Tensor, alpha: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mix every image with a random partner, weight ~ Beta(alpha, alpha) per image (no labels)."""
    if alpha <= 0:
        return x
    n = x.shape[0]
    lam = sample_beta(n, alpha, generator).to(x.device, x.dtype)[:, None, None, None]
    perm = torch.randperm(n, generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm]


def noise_blend(x: torch.Tensor, max_weight: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x + a (u - x)``: each image blended with its own uniform-noise image, ``a ~ U(0, max_weight)``."""
    if max_weight <= 0:
        return x
    n = x.shape[0]
    a = torch.rand(n, generator=generator).to(x.device, x.dtype).mul_(max_weight).view(n, 1, 1, 1)
    u = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
    return x + a * (u - x)


def identity_grid(h: int, w: int) -> torch.Tensor:
    """(1, H, W, 2) sampling grid in grid_sample's (x, y) order, align_corners=True convention."""
    ys = torch.linspace(-1, 1, h)
    xs = torch.linspace(-1, 1, w)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx, yy), dim=2)[None]


def smooth_field(n: int, k: int, h: int, w: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(n, H, W, 2) smooth random displacement fields, WaNet's construction (Nguyen & Tran 2021):
    a ``k x k`` grid of control offsets uniform in [-1, 1], each field normalised to mean magnitude 1,
    upsampled bicubically to H x W."""
    ctrl = torch.rand(n, 2, k, k, generator=generator) * 2 - 1
    ctrl = ctrl / ctrl.abs().mean((1, 2, 3), keepdim=True)
    return F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def random_warp(x: torch.Tensor, max_strength: float, grid: int = 4,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each image resampled through its own smooth random warp (:func:`smooth_field` with a
    ``grid x grid`` control grid) scaled by ``s / size`` with ``s ~ U(0, max_strength)`` per image
    (the displacement convention of WaNet's trigger: s = 1 moves pixels by about half a pixel on
    average). ``max_strength`` 0 returns ``x`` unchanged."""
    if max_strength <= 0:
        return x
    n, _, h, w = x.shape
    flow = smooth_field(n, max(2, min(grid, h, w)), h, w, generator)
    s = torch.rand(n, 1, 1, 1, generator=generator) * max_strength
    coords = (identity_grid(h, w) + flow * s * torch.tensor([1.0 / w, 1.0 / h])).clamp(-1, 1)
    return F.grid_sample(x, coords.to(x.device, x.dtype), align_corners=True).clamp(0, 1)


@dataclass
class AugmentConfig:
    """Batch augmentation used while training or distilling (paper: crop pad 4 + flip)."""

    crop_pad: int = field(default=4, metadata={"help": "random-crop zero padding in pixels (0 = off)"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flip"})

    def __post_init__(self) -> None:
        if not 0 <= self.crop_pad <= untrusted.MAX_SIDE:
            raise ConfigError(f"crop_pad must be in [0, {untrusted.MAX_SIDE}], got {self.crop_pad}")

    def check_images(self, shape: Sequence[int]) -> None:
        """Padding beyond the image size only allocates: it is refused for the images at hand."""
        h, w = int(shape[-2]), int(shape[-1])
        if self.crop_pad > max(h, w):
            raise ConfigError(f"augment.crop_pad {self.crop_pad} is larger than the {h}x{w} images")


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    x = random_crop(x, cfg.crop_pad, generator)
    if cfg.hflip:
        x = random_hflip(x, generator)
    return x
