"""Perturbations trained *against* the student while it is distilled (part of bcu's method).

A backdoor the student still carries is a small input change that moves almost every image to one
class: the easiest universal perturbation there is. bcu keeps a *bank* of universal perturbations
and moves each of them, after every training step, up the gradient of the distillation loss (the
student's disagreement with the teacher's answer for the clean image), using the gradient that the
step's own backward pass leaves on them: no extra forward or backward pass (free universal
adversarial training, Shafahi et al., AAAI 2020). A share of every batch is shown to the student with
a perturbation of the bank applied, while the teacher answers for the clean view, so the student
learns to ignore exactly the changes that would trigger it. No label and no knowledge of the trigger
is used.

Two families, for the two shapes triggers take:

* ``patch``: ``x' = (1 - m) x + m p`` with a mask ``m`` in [0, 1] of at most ``budget`` pixels of
  mass and a pattern ``p`` in [0, 1] (the shape of BadNets-style patches, lines and corner stamps,
  which overwrite a few pixels); each mask starts as a random square of ``budget`` pixels;
* ``l2``: ``x' = x + d`` with ``||d||_2 <= radius`` (dense additive patterns).

Both are clamped to [0, 1]. Each bank member is updated from the images that used it in the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Literal, Optional, Tuple

import torch

from ..config import check


@dataclass
class AdversaryConfig:
    """The bank of universal perturbations trained against the student (off in the paper preset)."""

    kind: Literal["none", "patch", "l2"] = field(default="none", metadata={
        "help": "none; patch: masks of at most `budget` pixels with their own patterns; l2: additive perturbations "
                "of L2 norm at most `radius`"})
    bank: int = field(default=8, metadata={"help": "perturbations trained side by side"})
    fraction: float = field(default=0.5, metadata={"help": "share of each batch shown with a perturbation"})
    budget: float = field(default=16.0, metadata={"help": "patch: mask mass in pixels (a 4x4 square is 16)"})
    radius: float = field(default=2.0, metadata={"help": "l2: L2 radius in [0, 1] pixel units"})
    step: float = field(default=0.1, metadata={
        "help": "ascent step: a fraction of the budget (mask) or radius (l2) per training step; patterns move by "
                "this much per pixel (signed gradient)"})

    def __post_init__(self) -> None:
        check(1 <= self.bank <= 1024, f"adversary.bank must be in 1..1024, got {self.bank}")
        check(0 < self.fraction <= 1, f"adversary.fraction must be in (0, 1], got {self.fraction}")
        check(self.budget > 0, f"adversary.budget must be > 0, got {self.budget}")
        check(self.radius > 0, f"adversary.radius must be > 0, got {self.radius}")
        check(0 < self.step <= 1, f"adversary.step must be in (0, 1], got {self.step}")


def project_mask(m: torch.Tensor, budget: float, iters: int = 40) -> torch.Tensor:
    """Euclidean projection of each mask (n, 1, H, W) onto {0 <= m <= 1, sum(m) <= budget}."""
    flat = m.flatten(1)
    box = flat.clamp(0, 1)
    over = box.sum(1) > budget
    if over.any():
        lo = torch.zeros(int(over.sum()), dtype=flat.dtype)
        hi = flat[over].max(1).values.clamp_min(0)
        sub = flat[over]
        for _ in range(iters):  # bisection on the shift tau: sum(clamp(m - tau, 0, 1)) == budget
            mid = (lo + hi) / 2
            big = (sub - mid[:, None]).clamp(0, 1).sum(1) > budget
            lo = torch.where(big, mid, lo)
            hi = torch.where(big, hi, mid)
        box[over] = (sub - hi[:, None]).clamp(0, 1)
    return box.view_as(m)


class Bank:
    """A bank of universal perturbations with free ascent (see the module docstring)."""

    def __init__(self, cfg: AdversaryConfig, shape: Tuple[int, int, int], seed: int) -> None:
        self.cfg = cfg
        c, h, w = shape
        g = torch.Generator().manual_seed(seed)
        n = cfg.bank
        if cfg.kind == "patch":
            side = max(1, min(h, w, round(math.sqrt(cfg.budget))))
            self.mask = torch.zeros(n, 1, h, w)
            tops = torch.randint(0, h - side + 1, (n,), generator=g)
            lefts = torch.randint(0, w - side + 1, (n,), generator=g)
            for i in range(n):
                self.mask[i, :, tops[i]:tops[i] + side, lefts[i]:lefts[i] + side] = 1
            self.mask = project_mask(self.mask, cfg.budget)
            self.pattern = torch.rand(n, c, h, w, generator=g)
        else:
            d = torch.randn(n, c, h, w, generator=g)
            self.delta = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12) * (0.1 * cfg.radius)
        self._pending: Optional[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = None

    # -- the training step's side ------------------------------------------------------------------
    def apply(self, x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """``x`` with a random member of the bank applied to its first ``n`` images; the gradient the
        loss leaves on the perturbation is kept for the next ascent step. ``n`` beyond the batch
        (a share of a full batch asked of its perturbable head) perturbs every image of ``x``."""
        self.ascend()
        n = min(int(n), x.shape[0])
        if n <= 0:
            return x
        idx = torch.randint(0, self.cfg.bank, (n,), generator=generator)
        grads: Dict[str, torch.Tensor] = {}
        self._pending = (idx, grads)

        def keep(name: str):
            def hook(grad: torch.Tensor) -> None:
                grads[name] = grad.detach().float().cpu()
            return hook

        head = x[:n]
        if self.cfg.kind == "patch":
            m = self.mask[idx].to(x.device, x.dtype).requires_grad_(True)
            p = self.pattern[idx].to(x.device, x.dtype).requires_grad_(True)
            m.register_hook(keep("mask"))
            p.register_hook(keep("pattern"))
            head = (1 - m) * head + m * p
        else:
            d = self.delta[idx].to(x.device, x.dtype).requires_grad_(True)
            d.register_hook(keep("delta"))
            head = (head + d).clamp(0, 1)
        return torch.cat([head, x[n:]])

    @torch.no_grad()
    def ascend(self) -> None:
        """Move every member that was used in the last step up the gradient of the loss."""
        if self._pending is None:
            return
        idx, grads = self._pending
        self._pending = None
        if not grads:
            return
        cfg = self.cfg

        def gather(name: str, like: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(like).index_add_(0, idx, grads[name].to(like.dtype))

        if cfg.kind == "patch":
            gm = gather("mask", self.mask)
            norm = gm.flatten(1).abs().sum(1).view(-1, 1, 1, 1)
            self.mask = project_mask(self.mask + torch.where(norm > 0, gm / norm.clamp_min(1e-12), 0)
                                     * (cfg.step * cfg.budget), cfg.budget)
            gp = gather("pattern", self.pattern)
            self.pattern = (self.pattern + cfg.step * gp.sign()).clamp(0, 1)
        else:
            gd = gather("delta", self.delta)
            norm = gd.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = self.delta + torch.where(norm > 0, gd / norm.clamp_min(1e-12), 0) * (cfg.step * cfg.radius)
            self.delta = d * (cfg.radius / d.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(-1, 1, 1, 1)

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        self.ascend()
        if self.cfg.kind == "patch":
            return {"mask": self.mask.clone(), "pattern": self.pattern.clone()}
        return {"delta": self.delta.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if not hasattr(self, k) or tuple(getattr(self, k).shape) != tuple(v.shape):
                raise ValueError(f"adversary state {k!r} does not match this bank")
            setattr(self, k, v.clone().float())
