"""MCR: Mode Connectivity Repair (Zhao, Chen, Das, Ramamurthy, Lin; ICLR 2020).

With one backdoored model, the paper's recipe is: fine-tune it on the clean labelled data to get
the second endpoint, connect the two endpoints ``w0`` (backdoored) and ``w1`` (fine-tuned) by a
quadratic Bezier curve ``phi(t) = (1-t)^2 w0 + 2t(1-t) theta + t^2 w1``, train the control point
``theta`` (initialised at the midpoint) to minimise ``E_{t ~ U(0,1)} CE(phi(t))`` on the clean
data, and return the model at ``t`` (the paper picks t around 0.3-0.4; default 0.4) with its
BatchNorm statistics recomputed on the same data (as in Garipov et al.'s curve code the paper
builds on; :func:`bcu.train.recalibrate_batchnorm`). Every floating parameter lies on the curve; buffers do not.

Curve training runs through :func:`bcu.train.fit` (``t`` is drawn per batch from the loop's
generator). Defaults: endpoint fine-tuning as the ft baseline; curve training SGD lr 0.015,
momentum 0.9, wd 5e-4 (the defaults of Garipov et al.'s dnn-mode-connectivity code, on which the
MCR code is built); 100 curve epochs is our default for the limited-data setting (not a number
restated from the paper) -- lower it for a quick benchmark.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..config import check
from ..data.augment import AugmentConfig
from ..train import OptimConfig, Step, fit, recalibrate_batchnorm
from .base import DEFENSES, Defense, DefenseResult, Run
from .finetune import FinetuneOptim, finetune, trainable


@dataclass
class CurveOptim(OptimConfig):
    """Curve training (dnn-mode-connectivity defaults used by MCR: lr 0.015, momentum 0.9, wd 5e-4)."""

    epochs: int = field(default=100, metadata={"help": "curve training epochs (bcu's default for limited data)"})
    batch_size: int = field(default=128, metadata={"help": "images per step (curve code: 128)"})
    lr: float = field(default=0.015, metadata={"help": "curve code default: 0.015"})


@dataclass
class MCRConfig:
    """Mode connectivity repair options."""

    t: float = field(default=0.4, metadata={"help": "point on the curve returned (0: backdoored, 1: fine-tuned; "
                                                   "paper: ~0.3-0.4)"})
    endpoint: FinetuneOptim = field(default_factory=FinetuneOptim, metadata={
        "help": "fine-tuning that makes the second endpoint (paper: fine-tune the backdoored model)"})
    optim: CurveOptim = field(default_factory=CurveOptim)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check(0.0 <= self.t <= 1.0, f"mcr.t must be in [0, 1], got {self.t}")


def bezier_weights(t: float):
    return (1 - t) ** 2, 2 * t * (1 - t), t ** 2


class BezierCurve(nn.Module):
    """A quadratic Bezier curve in the parameter space of ``base`` with a trainable control point."""

    def __init__(self, base: nn.Module, end0: Dict[str, torch.Tensor], end1: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.names = [n for n, p in base.named_parameters() if p.is_floating_point()]
        self.keys = [n.replace(".", "__") for n in self.names]
        for k, n in zip(self.keys, self.names):
            self.register_buffer(f"w0__{k}", end0[n].detach().clone(), persistent=False)
            self.register_buffer(f"w1__{k}", end1[n].detach().clone(), persistent=False)
        self.control = nn.ParameterDict({k: nn.Parameter((end0[n].detach() + end1[n].detach()) / 2)
                                         for k, n in zip(self.keys, self.names)})
        self.t: Optional[float] = None

    def params_at(self, t: float) -> Dict[str, torch.Tensor]:
        a, b, c = bezier_weights(t)
        return {n: a * getattr(self, f"w0__{k}") + b * self.control[k] + c * getattr(self, f"w1__{k}")
                for k, n in zip(self.keys, self.names)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.t is not None, "set curve.t before calling"
        return functional_call(self.base, self.params_at(self.t), (x,))


class CurveObjective:
    def __call__(self, curve: BezierCurve, x: torch.Tensor, y: Optional[torch.Tensor], step: Step):
        if y is None:
            raise RuntimeError("mcr needs labels")
        curve.t = float(torch.rand((), generator=step.generator))
        logits = curve(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"loss": float(loss.detach()), "acc": float((logits.argmax(1) == y).float().mean()) * 100,
                      "t": curve.t}


@DEFENSES.register("mcr")
class MCR(Defense):
    """MCR: train a Bezier curve between the backdoored and a fine-tuned model; take the model at t."""

    Config = MCRConfig
    uses_labels = True

    def repair(self, model, data, run: Run) -> DefenseResult:
        cfg = self.config
        device = run.device
        end1 = trainable(copy.deepcopy(model))
        ft_hist = finetune(end1, data, cfg.endpoint, cfg.augment, seed=run.seed + 1, device=device,
                           progress=run.progress, resume_dir=run.resume("endpoint"), desc="mcr endpoint")
        w0 = dict(model.named_parameters())
        w1 = dict(end1.named_parameters())
        base = copy.deepcopy(model)
        curve = BezierCurve(base, w0, w1).to(device)
        history = fit(curve, data, CurveObjective(), cfg.optim, augment_cfg=cfg.augment, seed=run.seed, device=device,
                      with_labels=True, params=list(curve.control.parameters()),
                      resume_dir=run.resume("curve"), desc="mcr curve", progress=run.progress)
        out = model  # the backdoored endpoint, untouched so far, becomes the point at t
        with torch.no_grad():
            point = curve.params_at(cfg.t)
            for n, p in out.named_parameters():
                if n in point:
                    p.copy_(point[n])
        n_bn = recalibrate_batchnorm(out, data.images, 256, device, channels_last=False)
        info = {"t": cfg.t, "bn_layers_recomputed": n_bn, "endpoint_history": ft_hist, "images": len(data)}
        return DefenseResult(out, history, info)
