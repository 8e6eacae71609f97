"""NAD: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma; ICLR 2021).

1. Teacher: a copy of the backdoored model fine-tuned with cross-entropy on the clean labelled
   images.
2. Student: the backdoored model, trained with ``CE + sum_i beta_i * AT_i`` where
   ``AT_i = mean((a_s - a_t)^2)`` compares the L2-normalised attention maps
   ``a = sum_c |F_c|^p`` (p = 2) of the student's and teacher's i-th stage outputs.

Stage outputs are found generically (:func:`bcu.defenses.tracing.stage_outputs`): one traced
forward pass records every module's 4-d output in completion order; the *last* output at each
spatial resolution is that stage's output (for a ResNet this is the residual group, for a plain CNN
the activation before the next pooling). The deepest ``len(betas)`` stages are used, as NAD uses
the last three groups of its WideResNet.

Defaults: the authors' code (github.com/bboylyg/NAD, config.py): teacher 10 epochs and student
20 epochs at batch size 64, lr 0.1 dropped to 0.01 after 2 epochs, betas (500, 1000, 1000), p = 2.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check
from ..data.augment import AugmentConfig
from ..errors import ModelError
from ..train import OptimConfig, Step, fit
from .base import DEFENSES, Defense, DefenseResult, Run
from .finetune import finetune, frozen_copy, trainable
from .tracing import FeatureTap, input_shape_of, stage_outputs


@dataclass
class NADTeacherOptim(OptimConfig):
    """Teacher fine-tuning (NAD code: te_epochs 10, lr 0.1 -> 0.01 after epoch 2, batch 64)."""

    epochs: int = field(default=10, metadata={"help": "teacher fine-tuning epochs (NAD: 10)"})
    batch_size: int = field(default=64, metadata={"help": "NAD: 64"})
    lr: float = field(default=0.1, metadata={"help": "NAD: 0.1, divided by 10 after 2 epochs"})
    schedule: Literal["cosine", "step", "constant"] = field(default="step", metadata={
        "help": "step schedule as in NAD's adjust_learning_rate"})
    milestones: Tuple[float, ...] = field(default=(0.2,), metadata={"help": "2 of 10 epochs"})


@dataclass
class NADStudentOptim(OptimConfig):
    """Student distillation (NAD code: 20 epochs, lr 0.1 -> 0.01 after epoch 2, batch 64)."""

    epochs: int = field(default=20, metadata={"help": "attention-distillation epochs (NAD: 20)"})
    batch_size: int = field(default=64, metadata={"help": "NAD: 64"})
    lr: float = field(default=0.1, metadata={"help": "NAD: 0.1, divided by 10 after 2 epochs"})
    schedule: Literal["cosine", "step", "constant"] = field(default="step", metadata={
        "help": "step schedule as in NAD's adjust_learning_rate"})
    milestones: Tuple[float, ...] = field(default=(0.1,), metadata={"help": "2 of 20 epochs"})


@dataclass
class NADConfig:
    """NAD options (defaults: the authors' code)."""

    betas: Tuple[float, ...] = field(default=(500.0, 1000.0, 1000.0), metadata={
        "help": "AT loss weights of the deepest stages, shallow to deep (NAD code: beta1-3 = 500, 1000, 1000)"})
    p: float = field(default=2.0, metadata={"help": "attention map power (NAD: 2)"})
    teacher: NADTeacherOptim = field(default_factory=NADTeacherOptim)
    optim: NADStudentOptim = field(default_factory=NADStudentOptim)
    augment: AugmentConfig = field(default_factory=AugmentConfig, metadata={"help": "NAD code: crop + flip"})

    def __post_init__(self) -> None:
        check(len(self.betas) >= 1, "nad.betas needs at least one weight")
        check(all(b >= 0 for b in self.betas), "nad.betas must be >= 0")
        check(self.p > 0, f"nad.p must be > 0, got {self.p}")


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """NAD's attention: sum_c |F_c|^p, flattened and L2-normalised per image."""
    am = f.float().abs().pow(p).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + 1e-6)


def attention_loss(fs: torch.Tensor, ft: torch.Tensor, p: float) -> torch.Tensor:
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


class NADObjective:
    def __init__(self, teacher: nn.Module, t_tap: FeatureTap, s_tap: FeatureTap, betas: Sequence[float],
                 p: float) -> None:
        self.teacher, self.t_tap, self.s_tap, self.betas, self.p = teacher, t_tap, s_tap, list(betas), p

    def __call__(self, model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], step: Step):
        if y is None:
            raise RuntimeError("nad needs labels")
        with torch.no_grad():
            self.teacher(x)
        t_feats = self.t_tap.take()
        logits = model(x)
        s_feats = self.s_tap.take()
        ce = F.cross_entropy(logits, y)
        at = [attention_loss(s, t.detach(), self.p) for s, t in zip(s_feats, t_feats)]
        at_total = sum(b * a for b, a in zip(self.betas, at))
        loss = ce + at_total
        return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), "at": float(at_total.detach()),
                      "acc": float((logits.argmax(1) == y).float().mean()) * 100}


@DEFENSES.register("nad")
class NAD(Defense):
    """NAD: fine-tune a teacher, then distil its attention maps into the backdoored model."""

    Config = NADConfig
    uses_labels = True

    def repair(self, model, data, run: Run) -> DefenseResult:
        cfg = self.config
        device = run.device
        shape = input_shape_of(model, data)
        teacher = trainable(copy.deepcopy(model))
        t_hist = finetune(teacher, data, cfg.teacher, cfg.augment, seed=run.seed + 1, device=device,
                          progress=run.progress, resume_dir=run.resume("teacher"), desc="nad teacher")
        teacher = frozen_copy(teacher, device)
        student = trainable(model)
        stages = stage_outputs(student, shape)
        if not stages:
            raise ModelError("nad needs a network with 4-d (N, C, H, W) feature maps")
        k = min(len(cfg.betas), len(stages))
        points = stages[-k:]
        betas = list(cfg.betas)[-k:]
        t_tap, s_tap = FeatureTap(teacher, points), FeatureTap(student, points)
        try:
            history = fit(student, data, NADObjective(teacher, t_tap, s_tap, betas, cfg.p), cfg.optim,
                          augment_cfg=cfg.augment, seed=run.seed, device=device, with_labels=True,
                          resume_dir=run.resume("student"), desc="nad", progress=run.progress)
        finally:
            t_tap.remove()
            s_tap.remove()
        info = {"stages": [{"module": n, "call": i, "shape": list(s)} for n, i, s in points],
                "betas": betas, "teacher_history": t_hist, "images": len(data)}
        return DefenseResult(student, history, info)
