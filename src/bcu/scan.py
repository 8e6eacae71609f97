"""A label-free backdoor scan: evidence of cleanliness without labels and without the trigger.

For every class ``k`` the scan looks for the smallest stamp -- a mask ``m`` in [0, 1] (one channel)
and a pattern ``p`` in [0, 1], ``x' = (1 - m) x + m p`` -- that makes the model predict ``k`` for
at least ``success`` of the unlabeled images it does not already predict as ``k``. This is Neural
Cleanse (Wang et al., S&P 2019) with the model's own predictions in place of labels; all classes are
optimised together in one batched forward pass (the loss separates by class and Adam works element
by element, so this equals K separate runs that share a step count). A backdoor target needs a
stamp far smaller than the other classes: its *size ratio* ``R_k = median(L1) / L1_k`` stands out.

Scores per class (docs/scan.md): ``L1_k`` (mask mass in pixels), ``R_k``, the MAD outlier index of
``log L1`` (``A_k``, NC's statistic on a log scale; NC's own index on raw L1 is reported too, but it
cannot fire when natural class sizes differ tenfold, as on Fashion-MNIST), and the verified success
of the best stamp. A model is flagged when its smallest class has ``R >= ratio_threshold`` and
``A >= index_threshold``; the thresholds are calibrated on clean and backdoored models of the
development grid and frozen (docs/scan.md). After a cleanse, the same scan of the cleansed model
shows whether the flagged class's stamp grew.

A flag may be a natural feature (an easy class), and no flag is not proof: triggers that are not
small stamps (warps, input-specific triggers) are outside what this scan can see.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import seeding
from .config import check
from .errors import DataError
from .train import predict


@dataclass
class ScanConfig:
    """The scan's budget and decision thresholds (calibrated on the development grid, docs/scan.md)."""

    images: int = field(default=512, metadata={"help": "unlabeled images used (a seeded random subset)"})
    batch: int = field(default=32, metadata={"help": "images per class per step"})
    steps: int = field(default=300, metadata={"help": "optimisation steps (every class gets the same number)"})
    lr: float = field(default=0.1, metadata={"help": "Adam learning rate on the mask/pattern logits (NC: 0.1)"})
    init_cost: float = field(default=1e-3, metadata={"help": "initial weight of the mask's L1 norm (NC: 1e-3)"})
    cost_multiplier: float = field(default=2.0, metadata={"help": "cost up x this, down / this^1.5 (NC: 2)"})
    patience: int = field(default=5, metadata={"help": "steps of success (failure) before the cost goes up (down)"})
    success: float = field(default=0.99, metadata={"help": "share of images a stamp must flip (NC: 0.99)"})
    ratio_threshold: float = field(default=3.0, metadata={
        "help": "flag when the smallest class needs a stamp this many times smaller than the median class"})
    index_threshold: float = field(default=2.0, metadata={"help": "... and its log-L1 MAD outlier index is this large"})
    min_pool: int = field(default=16, metadata={"help": "classes predicted for all but fewer images are not scanned"})
    time_budget: Optional[float] = field(default=None, metadata={
        "help": "seconds: cut the step count (the same for every class) to fit, measured after 10 steps"})
    seed: int = field(default=0, metadata={"help": "seed of the subset, the batches and the initial stamps"})

    def __post_init__(self) -> None:
        check(self.images >= 16, f"scan.images must be >= 16, got {self.images}")
        check(1 <= self.batch <= 4096, f"scan.batch must be in 1..4096, got {self.batch}")
        check(1 <= self.steps <= 100_000, f"scan.steps must be in 1..100000, got {self.steps}")
        check(0 < self.lr <= 10 and self.init_cost > 0 and self.cost_multiplier > 1, "scan.lr, init_cost > 0, "
              "cost_multiplier > 1")
        check(0 < self.success <= 1, f"scan.success must be in (0, 1], got {self.success}")
        check(self.patience >= 1 and self.min_pool >= 1, "scan.patience and min_pool must be >= 1")
        check(self.time_budget is None or self.time_budget > 0, "scan.time_budget must be > 0")


@dataclass
class ClassScan:
    cls: int
    name: str
    predicted: float          # share of the images the model predicts as this class
    l1: Optional[float]       # mass of the smallest successful mask, in pixels (None: not scanned)
    area: Optional[float]     # l1 / (H * W), percent
    flip: Optional[float]     # verified success of that stamp on the whole pool, percent
    reached: bool             # the success threshold was reached during the optimisation
    ratio: Optional[float] = None
    index: Optional[float] = None
    nc_index: Optional[float] = None


@dataclass
class ScanResult:
    classes: List[ClassScan]
    flagged: Optional[int]
    suspect: Optional[int]    # the class with the largest ratio, flagged or not
    steps: int
    images: int
    seconds: float
    config: Dict[str, Any]
    masks: Optional[torch.Tensor] = field(default=None, repr=False)     # (K, 1, H, W) best masks
    patterns: Optional[torch.Tensor] = field(default=None, repr=False)  # (K, C, H, W) best patterns

    def as_dict(self) -> Dict[str, Any]:
        return {"classes": [asdict(c) for c in self.classes], "flagged": self.flagged, "suspect": self.suspect,
                "steps": self.steps, "images": self.images, "seconds": self.seconds, "config": self.config}

    def by_class(self, k: int) -> ClassScan:
        return self.classes[k]

    def summary(self) -> str:
        if self.flagged is None:
            c = self.classes[self.suspect] if self.suspect is not None else None
            tail = f" (largest size ratio {c.ratio:.1f}, class {c.name})" if c is not None and c.ratio else ""
            return "no class flagged" + tail
        c = self.classes[self.flagged]
        return (f"class {c.name} flagged: a {c.l1:.1f}-pixel stamp ({c.area:.2f}% of the image) flips "
                f"{c.flip:.0f}% of the other images to it, {c.ratio:.1f}x smaller than the median class "
                f"(log-L1 outlier index {c.index:.2f})")


def _mad_index(values: torch.Tensor) -> torch.Tensor:
    """One-sided MAD outlier index (median - v) / (1.4826 MAD), NC's statistic."""
    med = values.median()
    mad = 1.4826 * (values - med).abs().median()
    return (med - values) / mad.clamp_min(1e-12)


def scan(model: nn.Module, images: torch.Tensor, cfg: Optional[ScanConfig] = None, device: str = "cpu",
         classes: Optional[List[str]] = None, num_classes: Optional[int] = None) -> ScanResult:
    """Scan ``model`` with uint8 (N, C, H, W) unlabeled ``images``; see the module docstring."""
    cfg = cfg or ScanConfig()
    t0 = time.time()
    if images.dim() != 4 or images.shape[0] < 16:
        raise DataError("the scan needs at least 16 unlabeled images of shape (N, C, H, W)")
    g = seeding.generator(cfg.seed)
    if images.shape[0] > cfg.images:
        images = images[torch.randperm(images.shape[0], generator=g)[:cfg.images].sort().values]
    dev = torch.device(device)
    x_all = (images.float() / 255 if images.dtype == torch.uint8 else images.float()).to(dev)
    n, c, h, w = x_all.shape
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        pred = predict(model, images, 1024, device).argmax(1).to(dev)
        k = int(num_classes or int(predict(model, images[:1], 1, device).shape[1]))
        names = [classes[i] if classes and i < len(classes) else str(i) for i in range(k)]
        pools = [torch.nonzero(pred != i).flatten() for i in range(k)]
        active = [i for i in range(k) if len(pools[i]) >= cfg.min_pool]
        if len(active) < 3:
            raise DataError(f"the model predicts almost every scan image as one class; the scan needs images it "
                            f"assigns to at least 3 classes (got {len(active)})")
        ka = len(active)
        eps = 1e-7
        a = torch.atanh((torch.rand(ka, 1, h, w, generator=g) - 0.5) * (2 - eps)).to(dev).requires_grad_(True)
        b = torch.atanh((torch.rand(ka, c, h, w, generator=g) - 0.5) * (2 - eps)).to(dev).requires_grad_(True)
        opt = torch.optim.Adam([a, b], lr=cfg.lr, betas=(0.5, 0.9))
        cost = torch.full((ka,), cfg.init_cost, device=dev)
        up = torch.zeros(ka, dtype=torch.long, device=dev)
        down = torch.zeros(ka, dtype=torch.long, device=dev)
        best = torch.full((ka,), math.inf, device=dev)
        best_m = torch.zeros(ka, 1, h, w, device=dev)
        best_p = torch.zeros(ka, c, h, w, device=dev)
        target = torch.tensor(active, device=dev).repeat_interleave(cfg.batch)
        steps = cfg.steps
        for step in range(steps):
            if step == 10 and cfg.time_budget is not None:
                per = (time.time() - t0) / 10
                steps = max(11, min(steps, int(0.85 * cfg.time_budget / max(per, 1e-6))))
            if step >= steps:
                break
            idx = torch.stack([pools[i][torch.randint(0, len(pools[i]), (cfg.batch,), generator=g).to(dev)]
                               for i in active])                         # (ka, B)
            m = torch.tanh(a) / (2 - eps) + 0.5
            p = torch.tanh(b) / (2 - eps) + 0.5
            x = x_all[idx]                                                # (ka, B, C, H, W)
            xs = (1 - m[:, None]) * x + m[:, None] * p[:, None]
            logits = model(xs.reshape(-1, c, h, w))
            ce = F.cross_entropy(logits, target, reduction="none").view(ka, cfg.batch).mean(1)
            reg = m.flatten(1).sum(1)
            loss = (ce + cost * reg).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                hit = (logits.argmax(1) == target).float().view(ka, cfg.batch).mean(1)
                ok = hit >= cfg.success
                better = ok & (reg < best)
                best = torch.where(better, reg, best)
                best_m[better] = m[better].detach()
                best_p[better] = p[better].detach()
                up = torch.where(ok, up + 1, torch.zeros_like(up))
                down = torch.where(ok, torch.zeros_like(down), down + 1)
                raise_ = up >= cfg.patience
                lower = down >= cfg.patience
                cost = torch.where(raise_, cost * cfg.cost_multiplier, cost)
                cost = torch.where(lower, cost / cfg.cost_multiplier ** 1.5, cost)
                up = torch.where(raise_, torch.zeros_like(up), up)
                down = torch.where(lower, torch.zeros_like(down), down)
        with torch.no_grad():
            reached = torch.isfinite(best)
            m_last = torch.tanh(a) / (2 - eps) + 0.5
            p_last = torch.tanh(b) / (2 - eps) + 0.5
            best_m = torch.where(reached.view(-1, 1, 1, 1), best_m, m_last)
            best_p = torch.where(reached.view(-1, 1, 1, 1), best_p, p_last)
            l1 = best_m.flatten(1).sum(1)
            flips = []
            for j, i in enumerate(active):  # verification of each best stamp on its whole pool
                xv = x_all[pools[i]]
                xv = (1 - best_m[j]) * xv + best_m[j] * best_p[j]
                out = torch.cat([model(xv[s:s + 512]).argmax(1) for s in range(0, xv.shape[0], 512)])
                flips.append(float((out == i).float().mean()) * 100)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    share = torch.bincount(pred.cpu(), minlength=k).float() / n
    rows = [ClassScan(i, names[i], float(share[i]), None, None, None, False) for i in range(k)]
    l1c = l1.cpu().clamp_min(1e-3)
    ratio = l1c.median() / l1c
    index = _mad_index(l1c.log())
    nc_index = _mad_index(l1c)
    masks = torch.zeros(k, 1, h, w)
    patterns = torch.zeros(k, c, h, w)
    for j, i in enumerate(active):
        rows[i] = ClassScan(i, names[i], float(share[i]), float(l1[j]), float(l1[j]) / (h * w) * 100, flips[j],
                            bool(reached[j]), float(ratio[j]), float(index[j]), float(nc_index[j]))
        masks[i], patterns[i] = best_m[j].cpu(), best_p[j].cpu()
    valid = [j for j, i in enumerate(active) if rows[i].reached and rows[i].flip >= 90.0]
    suspect = active[max(range(ka), key=lambda j: (float(ratio[j]), float(index[j])))]
    flagged = None
    if valid:
        j = max(valid, key=lambda j: (float(ratio[j]), float(index[j])))
        if float(ratio[j]) >= cfg.ratio_threshold and float(index[j]) >= cfg.index_threshold:
            flagged = active[j]
    return ScanResult(rows, flagged, suspect, steps, n, time.time() - t0, asdict(cfg), masks, patterns)
