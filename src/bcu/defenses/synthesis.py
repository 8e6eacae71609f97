"""Images synthesized from the teacher itself, for a cleanse with few or no unlabeled images.

Model inversion in the manner of data-free distillation (DeepInversion, Yin et al., CVPR 2020): a
batch of images starts as noise and is optimised so that (1) the teacher assigns each image a chosen
class (classes drawn evenly, so every class is taught), (2) the mean and variance of every
BatchNorm layer's input over the batch match the running statistics the teacher stored in
training, and (3) the images are smooth (total variation) and bounded (L2). Term (2) is what makes
the images look like the training data to the network; a model without BatchNorm gets only (1)
and (3). The synthesized images are returned as uint8, like any unlabeled set, and need no label:
the classes only steer the synthesis, distillation then uses the teacher's soft outputs.

A backdoored teacher may put its trigger into the images of its target class; the cleanse's own
defences (re-initialisation, the perturbation adversary, noise blending) apply to them as to real
images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from ..config import check
from ..progress import progress_bar


@dataclass
class SynthesisConfig:
    """Model inversion (used with --data none, or mixed in with `mix`)."""

    images: int = field(default=5000, metadata={"help": "images to synthesize when there is no unlabeled data"})
    mix: float = field(default=0.0, metadata={
        "help": "with unlabeled data: add this many synthesized images per real one (0 = none)"})
    batch: int = field(default=250, metadata={"help": "images optimised together (BatchNorm statistics are per batch)"})
    steps: int = field(default=200, metadata={"help": "Adam steps per batch"})
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate on the image logits"})
    bn_weight: float = field(default=1.0, metadata={"help": "weight of the BatchNorm statistics loss (DeepInversion)"})
    tv_weight: float = field(default=1e-3, metadata={"help": "weight of the total-variation prior"})
    l2_weight: float = field(default=1e-4, metadata={"help": "weight of the L2 prior on the centred images"})

    def __post_init__(self) -> None:
        check(1 <= self.images <= 1_000_000, f"synthesis.images must be in 1..1000000, got {self.images}")
        check(0 <= self.mix <= 100, f"synthesis.mix must be in [0, 100], got {self.mix}")
        check(2 <= self.batch <= 4096, f"synthesis.batch must be in 2..4096, got {self.batch}")
        check(1 <= self.steps <= 100_000, f"synthesis.steps must be in 1..100000, got {self.steps}")
        check(0 < self.lr <= 10, f"synthesis.lr must be in (0, 10], got {self.lr}")
        check(min(self.bn_weight, self.tv_weight, self.l2_weight) >= 0, "synthesis weights must be >= 0")


class _BNStats:
    """Forward pre-hooks that add, per BatchNorm layer, ||mu_b - mu_r|| + ||var_b - var_r|| of its input."""

    def __init__(self, model: nn.Module) -> None:
        self.losses: List[torch.Tensor] = []
        self.handles = []
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                self.handles.append(m.register_forward_pre_hook(self._hook))

    def _hook(self, m, inp) -> None:
        x = inp[0]
        dims = [0] + list(range(2, x.dim()))
        mu = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self.losses.append(torch.norm(mu - m.running_mean, 2) + torch.norm(var - m.running_var, 2))

    def take(self) -> torch.Tensor:
        out = torch.stack(self.losses).sum() if self.losses else torch.zeros(())
        self.losses = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def synthesize(teacher: nn.Module, shape: Tuple[int, int, int], num_classes: int, cfg: SynthesisConfig,
               n: Optional[int] = None, seed: int = 0, device: str = "cpu",
               progress: Optional[bool] = None) -> torch.Tensor:
    """``n`` (default ``cfg.images``) uint8 images of ``shape`` inverted from ``teacher``; see the module docstring."""
    n = int(n or cfg.images)
    g = seeding.generator(seed + 31)
    dev = torch.device(device)
    was = teacher.training
    teacher.eval()
    flags = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    stats = _BNStats(teacher)
    out = []
    bar = progress_bar(total=n, desc="synthesize", unit="img", disable=None if progress is None else not progress)
    try:
        done = 0
        while done < n:
            b = min(cfg.batch, n - done)
            if b < 2:  # BatchNorm statistics need two images; pad the last batch
                b = 2
            y = (torch.arange(done, done + b) % num_classes)[torch.randperm(b, generator=g)].to(dev)
            z = (torch.randn(b, *shape, generator=g) * 0.5).to(dev).requires_grad_(True)  # logits of the images
            opt = torch.optim.Adam([z], lr=cfg.lr, betas=(0.5, 0.9))
            for step in range(cfg.steps):
                lr = cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(step / cfg.steps * 3.141592653589793)).item())
                for group in opt.param_groups:
                    group["lr"] = lr
                x = torch.sigmoid(z)
                logits = teacher(x)
                loss = F.cross_entropy(logits, y) + cfg.bn_weight * stats.take() + cfg.tv_weight * _tv(x) \
                    + cfg.l2_weight * (x - 0.5).pow(2).sum() / b
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            stats.take()
            with torch.no_grad():
                imgs = (torch.sigmoid(z) * 255).round().clamp(0, 255).to(torch.uint8).cpu()
            keep = min(b, n - done)
            out.append(imgs[:keep])
            done += keep
            bar.update(keep)
    finally:
        bar.close()
        stats.remove()
        for p, f in zip(teacher.parameters(), flags):
            p.requires_grad_(f)
        teacher.train(was)
    return torch.cat(out)
